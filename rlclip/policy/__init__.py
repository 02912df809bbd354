"""The only place that touches logits (this package: the forward here, the output layer in ``head.py``,
TROLL's sparse supports in ``support.py``).

Log-probs of sampled completion tokens, the policy's entropy and sparse
top-K supports are computed from the final hidden states in chunks of
positions (``head._chunk_slices``), so no ``[B, T, V]`` tensor is ever held for
the batch: each chunk's logits are made, reduced and dropped, and with grad
recomputed in backward (``head.head_backward``, for the sampled token and for
a support of tokens alike).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from rlclip.policy.head import DEFAULT_CHUNK_SIZE, _chunked, _gathered, _TokenLogProb
from rlclip.policy.support import _chunked_record, _chunked_support
from rlclip.shared_prompt import pack, packed_mask_kind, prompt_groups, worth_packing
from rlclip.types import SupportSpec

__all__ = ["DEFAULT_CHUNK_SIZE", "SupportSpec", "_TokenLogProb", "completion_hidden_states", "completion_logprobs",
           "position_ids_from_mask", "unwrap"]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # [B, L]


@contextmanager
def _capture_final_hidden(model: nn.Module):
    """Record the decoder's last hidden state (after its final norm) during a forward."""
    store: dict[str, Tensor] = {}
    decoder = unwrap(model).get_decoder()

    def hook(_module, _args, output):
        store["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / compile wrappers (PEFT models are kept: they delegate)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def completion_hidden_states(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                             completion_ids: Tensor, completion_mask: Tensor, shared_prompt: bool = False) -> Tensor:
    """Final hidden states ``[B, T, H]`` at the positions that predict each completion token.

    The forward runs through ``model`` itself (so DDP/FSDP hooks fire) with
    ``logits_to_keep=1``: the full-vocabulary logits are never made here.
    ``shared_prompt``: rows with the same prompt share one forward of it, where that is cheaper
    (rlclip/shared_prompt.py); the hidden states at masked completion positions are then 0.
    """
    if shared_prompt and completion_ids.shape[0] > 1:
        packed = _packed_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        if packed is not None:
            return packed
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+T]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
    with _capture_final_hidden(model) as store:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=position_ids_from_mask(attention_mask), logits_to_keep=1, use_cache=False)
    prompt_len, comp_len = prompt_ids.shape[1], completion_ids.shape[1]
    return store["hidden"][:, prompt_len - 1: prompt_len - 1 + comp_len]  # [B, T, H]


def _packed_forward(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                    completion_mask: Tensor) -> Tensor | None:
    """The shared-prompt forward's hidden states ``[B, T, H]``, or None where the plain forward is the one to
    run (no shared prompt, an attention without 4D masks, or not cheaper)."""
    inner = unwrap(model)
    kind = packed_mask_kind(inner)
    groups = prompt_groups(prompt_ids, prompt_mask)  # [B]
    if kind is None or int(groups.max()) + 1 == len(groups) or not bool(prompt_mask.any(1).all()):
        return None  # nothing shared, no 4D mask, or an empty prompt (no token to predict the first one from)
    if not worth_packing(inner, groups, prompt_mask, completion_mask):
        return None
    dtype = inner.get_input_embeddings().weight.dtype if kind == "eager" else None
    positions = position_ids_from_mask(torch.cat([prompt_mask, completion_mask], dim=1))  # [B, P+T]
    batch = pack(prompt_ids, prompt_mask, completion_ids, completion_mask, positions, groups, pad_token_id=0,
                 additive_dtype=dtype)
    with _capture_final_hidden(model) as store:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              logits_to_keep=1, use_cache=False)
    hidden = store["hidden"]  # [G, L, H]
    flat = hidden.reshape(-1, hidden.shape[-1])[batch.index.reshape(-1)]  # [B*T, H]
    return flat.view(*batch.index.shape, -1) * batch.valid[..., None].to(hidden.dtype)  # [B, T, H]


def completion_logprobs(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, *, temperature: float = 1.0, need_entropy: bool = False,
                        entropy_grad: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        record_support: SupportSpec | None = None, support: SupportSpec | None = None,
                        old_support: dict[str, Tensor] | None = None, shared_prompt: bool = False) -> dict[str, Tensor]:
    """Log-probs (and optionally entropy) of the completion tokens under ``model``.

    Returns ``{"logprobs": [B, T], "entropy": [B, T]}`` (entropy only when
    asked; detached unless ``entropy_grad``, which an entropy bonus sets --
    objectives always see it detached). Logits are divided by the sampling
    ``temperature`` so the log-probs are those of the distribution sampled
    from. Runs with or without grad, following the caller's grad mode.

    Sparse supports (TROLL, see the section comment above ``_top_set``):

    - ``record_support=spec`` (behaviour pass) adds ``"old_support"``: a dict
      of ``indices`` / ``logprobs`` / ``mask`` ``[B, T, top_k]`` (the old top
      set, padded to exactly ``top_k``) and ``token_logprobs [B, T]``; pass it
      back as ``old_support`` in the update pass.
    - ``support=spec`` with ``old_support`` (update pass) adds
      ``"support_logprobs"`` (grad), ``"old_support_logprobs"`` and
      ``"support_mask"``, all ``[B, T, S]`` with the sampled token in slot 0,
      and ``"support_indices"`` (the token id of each slot).

    ``shared_prompt``: one forward per distinct prompt where cheaper (:func:`completion_hidden_states`);
    values at masked completion positions then differ from the plain forward's (consumers mask them).
    """
    if record_support is not None and support is not None:
        raise ValueError("pass either record_support (behaviour pass) or support (update pass), not both")
    if support is not None and old_support is None:
        raise ValueError("support needs old_support: the dict recorded by a record_support pass")
    hidden = completion_hidden_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask, shared_prompt)
    lm_head = unwrap(model).get_output_embeddings()
    with _gathered(lm_head.weight, getattr(lm_head, "bias", None)):
        out = _head_outputs(hidden, completion_ids, lm_head, temperature, need_entropy, chunk_size, record_support,
                            support, old_support)
    if "entropy" in out and not entropy_grad:
        out["entropy"] = out["entropy"].detach()
    return out


def _head_outputs(hidden: Tensor, completion_ids: Tensor, lm_head: nn.Module, temperature: float,
                  need_entropy: bool, chunk_size: int, record_support: SupportSpec | None,
                  support: SupportSpec | None, old_support: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """The chunked head passes of ``completion_logprobs`` (behaviour, update with support, or plain)."""
    if record_support is not None:
        out = _chunked_record(hidden, completion_ids, lm_head, temperature, need_entropy, chunk_size,
                              record_support)
    elif support is not None:
        out = _chunked_support(hidden, completion_ids, lm_head, temperature, need_entropy, chunk_size,
                               support, old_support)
    else:
        logprobs, entropy = _chunked(hidden, completion_ids, lm_head, temperature, need_entropy, chunk_size)
        out = {"logprobs": logprobs} if entropy is None else {"logprobs": logprobs, "entropy": entropy}
    return out
