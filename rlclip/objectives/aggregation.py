"""Aggregation of a per-token quantity ``[B, T]`` to a scalar, and masked reductions.

Shared by every objective and kept apart from the surrogate (as verl's
``agg_loss``, unlike TRL's ``loss_type``); :meth:`Objective.aggregate` applies
:func:`aggregate` with the objective's ``agg`` mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


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


def aggregate(values: Tensor, mask: Tensor, mode: str = "token_mean", num_tokens: Any = None,
              num_sequences: Any = None, norm_len: int | None = None) -> Tensor:
    """Reduce a per-token loss ``values [B, T]`` to a scalar.

    - ``token_mean``: sum(L * mask) / N, N = ``num_tokens`` or mask.sum().
    - ``seq_mean_token_mean``: mean over sequences of each sequence's token mean.
    - ``seq_mean_token_sum``: mean over sequences of each sequence's token sum.
    - ``seq_mean_token_sum_norm`` (Dr. GRPO, arXiv 2503.20783): each sequence's
      token sum divided by a constant ``norm_len`` (default: T), then the mean
      over sequences.

    Sequence means divide by ``num_sequences`` when given, else by the number
    of rows with at least one counted token. The trainer passes the global
    counts of the optimizer step so that micro-batching and data parallelism
    leave the update unchanged.
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        denom = mask.sum().clamp_min(1) if num_tokens is None else num_tokens
        return (values * mask).sum() / denom
    token_sum = (values * mask).sum(-1)  # [B]
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

