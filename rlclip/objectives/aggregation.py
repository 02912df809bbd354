"""Aggregation of a per-token quantity ``[B, T]`` to a scalar, and masked reductions.

Shared by every objective and kept apart from the surrogate (as verl's
``agg_loss``, unlike TRL's ``loss_type``); :meth:`Objective.aggregate` applies
:func:`aggregate` with the objective's ``agg`` mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "token_sum",
             "prompt_mean")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when nothing is selected)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def masked_min(values: Tensor, mask: Tensor) -> Tensor:
    """Minimum of ``values`` where ``mask`` is 1 (0 when nothing is selected)."""
    if not bool(mask.any()):
        return values.new_zeros(())
    return values.masked_fill(mask == 0, float("inf")).min()


def masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Maximum of ``values`` where ``mask`` is 1 (0 when nothing is selected)."""
    if not bool(mask.any()):
        return values.new_zeros(())
    return values.masked_fill(mask == 0, float("-inf")).max()


def prompt_counts(mask: Tensor, group_ids: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """Denominators of ``prompt_mean``: each row's prompt-group token count ``[B]`` and the number of groups.

    ``group_ids [B]`` names the prompt group of each row (the G completions of one prompt share an id);
    rows may come in any order and a group may be split over micro-batches. n_g = sum of ``mask`` over
    the rows of group g; the count of groups is that of groups with n_g > 0 (as a sequence mean leaves
    out rows without tokens). ``group_ids`` None gives ``(None, 0)``. The trainer calls this on the
    optimizer step's rows and sums the group count over processes (a prompt's G completions are always
    sampled on one process, so n_g is local).
    """
    if group_ids is None:
        return None, mask.new_zeros(())
    ids, inverse = torch.unique(group_ids, return_inverse=True)  # [g], [B]
    per_group = mask.new_zeros(ids.shape[0]).index_add_(0, inverse, mask.sum(-1))  # [g]
    return per_group[inverse], (per_group > 0).sum().to(mask.dtype)  # [B], 0-d


def aggregate(values: Tensor, mask: Tensor, mode: str = "token_mean", num_tokens: Any = None,
              num_sequences: Any = None, norm_len: int | None = None, group_ids: Tensor | None = None,
              prompt_tokens: Tensor | None = None, num_prompts: Any = None) -> Tensor:
    """Reduce a per-token loss ``values [B, T]`` to a scalar.

    - ``token_mean``: sum(L * mask) / N, N = ``num_tokens`` or mask.sum().
    - ``token_sum``: sum(L * mask), no denominator (verl's ``loss_agg_mode="token-sum"``): the
      gradient grows with the number of tokens in the optimizer step.
    - ``seq_mean_token_mean``: mean over sequences of each sequence's token mean.
    - ``seq_mean_token_sum``: mean over sequences of each sequence's token sum.
    - ``seq_mean_token_sum_norm`` (Dr. GRPO, arXiv 2503.20783): each sequence's
      token sum divided by a constant ``norm_len`` (default: T), then the mean
      over sequences.
    - ``prompt_mean`` (SkyRL's ``loss_reduction="prompt_mean"``): the token mean within each prompt
      group, then the mean over prompts: (1 / P) sum_g (sum_{i in g, t} L_it m_it) / n_g, with n_g the
      counted tokens of group g and P the number of groups with n_g > 0. Needs ``prompt_tokens [B]``
      (n_g of each row's group) and ``num_prompts`` (P), or ``group_ids [B]`` to count them in this batch
      (:func:`prompt_counts`).

    Sequence means divide by ``num_sequences`` when given, else by the number
    of rows with at least one counted token. The trainer passes the global
    counts of the optimizer step so that micro-batching and data parallelism
    leave the update unchanged.
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        denom = mask.sum().clamp_min(1) if num_tokens is None else num_tokens
        return (values * mask).sum() / denom
    if mode == "token_sum":  # a sum over the step's tokens: each micro-batch adds its own share
        return (values * mask).sum()
    token_sum = (values * mask).sum(-1)  # [B]
    if mode == "prompt_mean":
        return _prompt_mean(token_sum, mask, group_ids, prompt_tokens, num_prompts)
    if mode == "seq_mean_token_mean":
        per_seq = token_sum / mask.sum(-1).clamp_min(1)
    elif mode == "seq_mean_token_sum":
        per_seq = token_sum
    elif mode == "seq_mean_token_sum_norm":
        per_seq = token_sum / float(norm_len or values.shape[-1])
    else:
        raise ConfigError(f"unknown aggregation {mode!r}; choose one of {', '.join(AGG_MODES)}")
    denom = (mask.sum(-1) > 0).sum().clamp_min(1) if num_sequences is None else num_sequences
    return per_seq.sum() / denom


def _prompt_mean(token_sum: Tensor, mask: Tensor, group_ids: Tensor | None, prompt_tokens: Tensor | None,
                 num_prompts: Any) -> Tensor:
    """sum_i token_sum_i / (P * n_g(i)) over rows ``[B]``; P and n_g from the arguments or from ``group_ids``."""
    if prompt_tokens is None or num_prompts is None:
        if group_ids is None:
            raise ValueError("agg='prompt_mean' needs the prompt group of each row: PolicyBatch.group_ids "
                             "(or prompt_tokens and num_prompts); the trainer fills them")
        local_tokens, local_prompts = prompt_counts(mask, group_ids)
        prompt_tokens = local_tokens if prompt_tokens is None else prompt_tokens
        num_prompts = local_prompts if num_prompts is None else num_prompts
    per_row = token_sum / prompt_tokens.to(token_sum.dtype).clamp_min(1)  # [B]
    return per_row.sum() / torch.as_tensor(num_prompts, dtype=token_sum.dtype).clamp_min(1)
