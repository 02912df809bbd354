"""TROLL's sparse top-K supports (``rlclip.objectives.troll``), read off the output layer's logits.

Behaviour pass (``record_support``): per completion token, the old policy's top
set -- the smallest set of tokens whose probability reaches 1 - tail_mass,
capped at top_k -- as ``indices`` / ``logprobs`` / ``mask`` padded to top_k,
plus ``token_logprobs`` (log pi_old of the sampled token, which may lie
outside the top set).

Update pass (``support`` + ``old_support``): the support is the sampled token
(slot 0), then the old top set, then the current policy's top set (same rule,
chosen without grad), deduplicated and compacted to the front; unused slots
have ``support_mask`` 0 and log-prob -inf. ``support_logprobs`` is the
full-vocabulary log-softmax gathered on the support (grad flows through the
normaliser, so the mass outside the support gets gradient).
``old_support_logprobs`` is log pi_old on the same slots: recorded values on
the old top set, the exact old log-prob of the sampled token, and, for slots
only in the current top set, the old rest mass (1 - old top set - sampled
token) spread uniformly over the V - |old top set| - 1 tokens it belongs to
(the maximum-entropy completion of what was recorded; TROLL's authors fill
such entries with a small constant probability). The old distribution over
the support plus a tail bucket then still sums to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rlclip.policy.head import (
    _chunk_slices,
    _gathered,
    _logsumexp_,
    _lse_and_entropy,
    _scaled_logits,
    head_backward,
)
from rlclip.types import SupportSpec

_TINY_MASS = 1e-30  # floor of the old rest mass before its log (an exactly covered vocabulary)


def _top_mask(values: Tensor, spec: SupportSpec) -> Tensor:
    """``[n, k]`` which of the top log-probs ``values`` (sorted, decreasing) belong to the top set: a rank is kept
    while the mass of the ranks above it is below 1 - tail_mass, so the top token is always kept."""
    mass = values.double().exp()
    return torch.cumsum(mass, dim=-1) - mass < 1.0 - spec.tail_mass


def _top_set(logp: Tensor, spec: SupportSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Smallest top set reaching ``1 - tail_mass`` (capped at ``top_k``) of ``logp [n, V]``, no grad: indices,
    log-probs and mask ``[n, k]`` with k = min(top_k, V), sorted by decreasing probability."""
    with torch.no_grad():
        values, indices = torch.topk(logp, min(spec.top_k, logp.shape[-1]), dim=-1)  # [n, k]
        return indices, values, _top_mask(values, spec)


def _union_support(tokens: Tensor, old_idx: Tensor, old_mask: Tensor, new_idx: Tensor,
                   new_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Deduplicated union [sampled token, old top set, new top set], used slots first.

    Returns ``indices [n, S]`` (unused slots hold 0), ``mask [n, S]`` and
    ``origin [n, S]``: each slot's position in the candidate list
    ``[token, old_idx..., new_idx...]`` (0 = sampled token, 1..K_old = old set).
    A token in several lists keeps its first position, so slot 0 is always
    the sampled token. S is the largest union size in the chunk.
    """
    cand = torch.cat([tokens[:, None], old_idx.masked_fill(~old_mask, -1),
                      new_idx.masked_fill(~new_mask, -1)], dim=1)  # [n, C]
    n, width = cand.shape
    sorted_vals, order = cand.sort(dim=1, stable=True)  # equal ids stay in candidate order
    first = torch.ones_like(cand, dtype=torch.bool)
    first[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    keep = torch.empty_like(first).scatter_(1, order, first) & (cand >= 0)  # [n, C]
    pos = torch.arange(width, device=cand.device).expand(n, width)
    origin = torch.where(keep, pos, pos + width).argsort(dim=1)  # kept slots first, in candidate order
    size = int(keep.sum(1).max()) if n else 1
    origin = origin[:, :size]
    return cand.gather(1, origin).clamp_min(0), keep.gather(1, origin), origin


def _old_on_support(origin: Tensor, mask: Tensor, tokens: Tensor, old: dict[str, Tensor],
                    vocab_size: int) -> Tensor:
    """log pi_old on the union slots (see the section comment); unused slots -inf."""
    old_idx, old_lp, old_mask, old_tok = old["indices"], old["logprobs"], old["mask"], old["token_logprobs"]
    k_old = old_lp.shape[1]
    recorded = old_lp.gather(1, (origin - 1).clamp(0, k_old - 1))  # [n, S]
    from_old = (origin >= 1) & (origin <= k_old)
    tok_in_top = ((old_idx == tokens[:, None]) & old_mask).any(1)  # [n]
    top_mass = (old_lp.double().exp() * old_mask).sum(1)
    rest = 1.0 - top_mass - torch.where(tok_in_top, 0.0, old_tok.double().exp())  # [n]
    n_rest = vocab_size - old_mask.sum(1) - (~tok_in_top).long()  # tokens sharing the rest mass
    spread = (rest.clamp_min(_TINY_MASS).log() - n_rest.clamp_min(1).double().log()).to(old_lp.dtype)
    out = torch.where(from_old, recorded, spread[:, None])
    out[:, 0] = old_tok
    return out.masked_fill(~mask, float("-inf"))


def _chunk_logp(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    return torch.log_softmax(_scaled_logits(hidden, weight, bias, temperature), dim=-1)  # [n, V]


def _chunk_entropy(logp: Tensor, need_entropy: bool) -> Tensor:
    """``-sum p log p`` per position ``[n]``, with grad when ``logp`` has one (an entropy bonus may use it)."""
    if not need_entropy:
        return logp.new_zeros(())
    return -(logp.exp() * logp).sum(-1)  # [n]


def _record_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float,
                  need_entropy: bool, spec: SupportSpec) -> tuple[Tensor, ...]:
    """Behaviour pass, one chunk: token log-prob, entropy, and the top set padded to ``top_k``."""
    logp = _chunk_logp(hidden, weight, bias, temperature)
    token_logp = logp.gather(-1, tokens[:, None]).squeeze(-1)  # [n]
    idx, values, mask = _top_set(logp, spec)  # [n, k]
    pad = spec.top_k - idx.shape[1]  # vocabulary smaller than top_k
    if pad:
        idx, values, mask = F.pad(idx, (0, pad)), F.pad(values, (0, pad)), F.pad(mask, (0, pad))
    return token_logp, _chunk_entropy(logp, need_entropy), idx, values.masked_fill(~mask, float("-inf")), mask


def _run_chunk(fn, *args):
    """``fn(*args)``, through activation checkpointing when a grad is needed (no [n, V] kept for backward)."""
    if torch.is_grad_enabled() and args[0].requires_grad:
        return checkpoint(_head_call, fn, *args, use_reentrant=False)
    return fn(*args)


def _head_call(fn, hidden: Tensor, weight: Tensor, bias: Tensor | None, *rest):
    """``fn`` on a chunk with the output layer gathered (its recomputation in backward gathers it again)."""
    with _gathered(weight, bias):
        return fn(hidden, weight, bias, *rest)


def _chunked_record(hidden: Tensor, tokens: Tensor, lm_head: nn.Module, temperature: float, need_entropy: bool,
                    chunk_size: int, spec: SupportSpec) -> dict[str, Tensor]:
    """Behaviour pass over all positions: log-probs (+ entropy) and the old top sets ``[B, T, top_k]``."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    parts = [_run_chunk(_record_stats, flat_h[sl], weight, bias, flat_t[sl], temperature, need_entropy, spec)
             for sl in _chunk_slices(flat_h.shape[0], chunk_size)]
    token_lp, ent, idx, lp, mask = (list(col) for col in zip(*parts))
    token_lp, idx, lp, mask = torch.cat(token_lp), torch.cat(idx), torch.cat(lp), torch.cat(mask)
    shape = tokens.shape
    out = {"logprobs": token_lp.view(shape),
           "old_support": {"indices": idx.view(*shape, -1), "logprobs": lp.view(*shape, -1),
                           "mask": mask.view(*shape, -1), "token_logprobs": token_lp.detach().view(shape)}}
    if need_entropy:
        out["entropy"] = torch.cat(ent).view(shape)
    return out


def _pad_slots(parts: list[Tensor], width: int, value: float | bool) -> Tensor:
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=value) for p in parts])


class _SupportLogProb(torch.autograd.Function):
    """Update pass of TROLL: ``log softmax(h W^T + b) / T`` on each position's union support, chunked.

    One logits pass per chunk does everything: the current top set (``topk`` on the logits, whose order is the
    log-probs'), the logits at every candidate (sampled token, old top set, new top set) gathered before the
    log-normaliser ``lse`` overwrites the buffer, the union, and log pi_old on it. Only ``lse`` (and the slots'
    ids) is kept; the backward is ``head_backward`` with S ids per position, as for the sampled token alone
    (activation checkpointing of a log-softmax, gather and top-k held four ``[n, V]`` buffers and ran the
    log-softmax twice). Outputs: support log-probs ``[N, S]`` (0 in unused slots; grad), entropy ``[N]``,
    then without grad the slot ids, mask and log pi_old ``[N, S]``.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float,
                chunk_size: int, need_entropy: bool, spec: SupportSpec, old: dict[str, Tensor]) -> tuple[Tensor, ...]:
        total = hidden.shape[0]
        lse = torch.empty(total, dtype=torch.float32, device=hidden.device)  # [N]
        entropy = torch.empty_like(lse) if need_entropy else lse.new_zeros(0)  # [N] or unused
        parts = []
        for sl in _chunk_slices(total, chunk_size):
            chunk_old = {k: v[sl] for k, v in old.items()}
            lp, ent, rest = _support_chunk(hidden[sl], weight, bias, tokens[sl], temperature, need_entropy, spec,
                                           chunk_old, lse[sl])
            if need_entropy:
                entropy[sl] = ent
            parts.append((lp, *rest))
        width = max(p[0].shape[1] for p in parts)
        lp, idx, mask, old_lp = (_pad_slots([p[i] for p in parts], width, fill)
                                 for i, fill in enumerate((0.0, 0, False, float("-inf"))))
        ctx.save_for_backward(hidden, weight, bias, idx, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(idx, mask, old_lp, *([] if need_entropy else [entropy]))
        ctx.set_materialize_grads(False)
        return lp, entropy, idx, mask, old_lp

    @staticmethod
    def backward(ctx, grad_lp: Tensor | None, grad_entropy: Tensor | None, *_unused) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, idx, lse, entropy = ctx.saved_tensors
        if grad_lp is None:
            grad_lp = lse.new_zeros(idx.shape)  # [N, S]
        grads = head_backward(ctx.needs_input_grad[:3], ctx.temperature, ctx.chunk_size, hidden, weight, bias, idx,
                              lse, entropy, grad_lp, grad_entropy)
        return (*grads, None, None, None, None, None, None)


def _support_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float,
                   need_entropy: bool, spec: SupportSpec, old: dict[str, Tensor],
                   lse_out: Tensor) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor, Tensor]]:
    """One chunk of :class:`_SupportLogProb`'s forward; writes the chunk's ``lse`` into ``lse_out``."""
    z = _scaled_logits(hidden, weight, bias, temperature)  # [n, V]
    values, new_idx = torch.topk(z, min(spec.top_k, z.shape[-1]), dim=-1)  # [n, k]
    candidates = torch.cat([tokens[:, None], old["indices"].masked_fill(~old["mask"], 0), new_idx], dim=1)
    candidate_z = z.gather(1, candidates)  # [n, C], taken before the lse below overwrites z
    ent = None
    if need_entropy:
        lse, ent = _lse_and_entropy(z)
        lse_out.copy_(lse)
    else:
        lse_out.copy_(_logsumexp_(z))
    new_mask = _top_mask(values - lse_out[:, None], spec)  # [n, k]
    idx, mask, origin = _union_support(tokens, old["indices"], old["mask"], new_idx, new_mask)
    lp = candidate_z.gather(1, origin) - lse_out[:, None]  # [n, S]
    return lp, ent, (idx, mask, _old_on_support(origin, mask, tokens, old, z.shape[-1]))


def _chunked_support(hidden: Tensor, tokens: Tensor, lm_head: nn.Module, temperature: float, need_entropy: bool,
                     chunk_size: int, spec: SupportSpec, old_support: dict[str, Tensor]) -> dict[str, Tensor]:
    """Update pass over all positions: log-probs, the union support ``[B, T, S]`` and log pi_old on it."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    old = {k: old_support[k].reshape(flat_t.shape[0], *old_support[k].shape[2:]).to(flat_t.device)
           for k in ("indices", "logprobs", "mask", "token_logprobs")}
    lp, entropy, idx, mask, old_lp = _SupportLogProb.apply(flat_h, lm_head.weight, getattr(lm_head, "bias", None),
                                                           flat_t, temperature, chunk_size, need_entropy, spec, old)
    shape, width = tokens.shape, lp.shape[1]
    support_lp = lp.masked_fill(~mask, float("-inf")).view(*shape, width)
    out = {"logprobs": support_lp[..., 0], "support_logprobs": support_lp,
           "old_support_logprobs": old_lp.view(*shape, width), "support_mask": mask.view(*shape, width),
           "support_indices": idx.view(*shape, width)}
    if need_entropy:
        out["entropy"] = entropy.view(shape)
    return out
