"""The only place that touches logits.

Log-probs of sampled completion tokens, the policy's entropy and sparse
top-K supports are computed from the final hidden states in chunks of
positions, so no ``[B, T, V]`` tensor is ever held for the batch: each chunk's
logits are made, reduced and dropped (and, with grad, recomputed in backward
through activation checkpointing).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024


@dataclass
class SupportSpec:
    """How to build TROLL's sparse support (see ``rlclip.objectives.troll``)."""

    top_k: int = 64
    """Cap on the size of each policy's top set."""
    tail_mass: float = 1e-5
    """Each top set is the smallest set of tokens reaching 1 - tail_mass of probability."""


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
                             completion_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """Final hidden states ``[B, T, H]`` at the positions that predict each completion token.

    The forward runs through ``model`` itself (so DDP/FSDP hooks fire) with
    ``logits_to_keep=1``: the full-vocabulary logits are never made here.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+T]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
    with _capture_final_hidden(model) as store:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=position_ids_from_mask(attention_mask), logits_to_keep=1, use_cache=False)
    prompt_len, comp_len = prompt_ids.shape[1], completion_ids.shape[1]
    return store["hidden"][:, prompt_len - 1: prompt_len - 1 + comp_len]  # [B, T, H]


def _token_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float,
                 need_entropy: bool) -> tuple[Tensor, Tensor]:
    """Log-prob of ``tokens`` and entropy for one chunk of positions ``hidden [n, H]``."""
    logits = F.linear(hidden, weight, bias).float() / temperature  # [n, V]
    logp = torch.log_softmax(logits, dim=-1)  # [n, V]
    token_logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [n]
    if need_entropy:
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)  # [n]
    else:
        entropy = token_logp.new_zeros(())
    return token_logp, entropy




def _chunked(hidden: Tensor, tokens: Tensor, lm_head: nn.Module, temperature: float, need_entropy: bool,
             chunk_size: int) -> tuple[Tensor, Tensor | None]:
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # [B*T, H]
    flat_t = tokens.reshape(-1)  # [B*T]
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    logps, ents = [], []
    for start in range(0, flat_h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (flat_h[sl], weight, bias, flat_t[sl], temperature, need_entropy)
        if torch.is_grad_enabled() and flat_h.requires_grad:
            # Recompute the chunk's logits in backward instead of keeping [n, V] alive.
            lp, ent = checkpoint(_token_stats, *args, use_reentrant=False)
        else:
            lp, ent = _token_stats(*args)
        logps.append(lp)
        ents.append(ent)
    logprobs = torch.cat(logps).view(tokens.shape)  # [B, T]
    entropy = torch.cat(ents).view(tokens.shape) if need_entropy else None  # [B, T]
    return logprobs, entropy


def completion_logprobs(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, *, temperature: float = 1.0, need_entropy: bool = False,
                        chunk_size: int = DEFAULT_CHUNK_SIZE, record_support: SupportSpec | None = None,
                        support: SupportSpec | None = None,
                        old_support: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Log-probs (and optionally entropy) of the completion tokens under ``model``.

    Returns ``{"logprobs": [B, T], "entropy": [B, T]}`` (entropy only when
    asked, always detached). Logits are divided by the sampling
    ``temperature`` so the log-probs are those of the distribution sampled
    from. Runs with or without grad, following the caller's grad mode.
    """
    hidden = completion_hidden_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    lm_head = unwrap(model).get_output_embeddings()
    logprobs, entropy = _chunked(hidden, completion_ids, lm_head, temperature, need_entropy, chunk_size)
    out = {"logprobs": logprobs}
    if entropy is not None:
        out["entropy"] = entropy.detach()
    return out
