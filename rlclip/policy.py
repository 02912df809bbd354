"""The only place that touches logits.

Log-probs of sampled completion tokens, the policy's entropy and sparse
top-K supports are computed from the final hidden states in chunks of
positions (``_chunk_slices``), so no ``[B, T, V]`` tensor is ever held for the
batch: each chunk's logits are made, reduced and dropped, and with grad
recomputed in backward (by ``_TokenLogProb`` for the log-probs, through
activation checkpointing for TROLL's supports).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rlclip.shared_prompt import pack, packed_mask_kind, prompt_groups, worth_packing
from rlclip.types import SupportSpec

DEFAULT_CHUNK_SIZE = 1024



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
    if kind is None or int(groups.max()) + 1 == len(groups):
        return None
    if not worth_packing(inner, groups, prompt_mask, completion_mask):
        return None
    dtype = inner.get_input_embeddings().weight.dtype if kind == "eager" else None
    batch = pack(prompt_ids, prompt_mask, completion_ids, completion_mask, groups, pad_token_id=0,
                 additive_dtype=dtype)
    with _capture_final_hidden(model) as store:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              logits_to_keep=1, use_cache=False)
    hidden = store["hidden"]  # [G, L, H]
    flat = hidden.reshape(-1, hidden.shape[-1])[batch.index.reshape(-1)]  # [B*T, H]
    return flat.view(*batch.index.shape, -1) * batch.valid[..., None].to(hidden.dtype)  # [B, T, H]


def _chunk_slices(total: int, chunk_size: int) -> list[slice]:
    """The chunks of positions every pass below walks through (the one chunking rule)."""
    return [slice(start, start + chunk_size) for start in range(0, total, chunk_size)]


def _gathered(*params: Tensor | None):
    """DeepSpeed ZeRO-3 empties every weight outside its module's forward; the chunk loops below multiply by
    the output layer's weight directly, so they gather it while they do (forward, and again where backward
    recomputes). A null context without ZeRO-3."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(*[p for p in params if p is not None and hasattr(p, "ds_status")])


def _scaled_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """``(h W^T + b) / T`` in float32 whatever the model dtype, in one ``[n, V]`` buffer: the division is in
    place (``/`` would hold a second buffer of the size of the logits while it runs) and skipped at T = 1."""
    z = F.linear(hidden, weight, bias).float()  # [n, V]
    return z if temperature == 1.0 else z.div_(temperature)


def _logsumexp_(z: Tensor) -> Tensor:
    """``logsumexp(z, -1)`` ``[n]`` that overwrites ``z`` with ``exp(z - max)``.

    torch.logsumexp holds two more ``[n, V]`` buffers (``z - max`` and its exp) beside ``z``: 192 MiB for a
    512-position chunk of a 49k vocabulary, at the forward's peak."""
    peak = z.amax(-1, keepdim=True)  # [n, 1]
    return z.sub_(peak).exp_().sum(-1).log_().add_(peak.squeeze(-1))


class _TokenLogProb(torch.autograd.Function):
    """``log softmax(h W^T + b) / T`` at the sampled tokens, one chunk of positions at a time.

    The forward keeps only each position's log-normaliser ``lse``. The backward
    recomputes a chunk's logits ``z`` and turns them in place into
    ``dL/dz = g (onehot(token) - softmax(z)) / T``, so one ``[n, V]`` buffer is
    alive at a time (activation checkpointing of a log-softmax + gather holds
    about four: logits, log-probs and both their gradients) and no pass over
    ``[n, V]`` is spent on a separate log-softmax. Entropy, when asked, is
    ``H = lse - sum(softmax(z) z)``; its gradient (for an entropy bonus) is
    ``dH/dz = -p (log p + H)``, added in the same recomputed buffer (then a
    second ``[n, V]`` buffer holds ``p``). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float,
                chunk_size: int, need_entropy: bool) -> tuple[Tensor, Tensor]:
        total = hidden.shape[0]
        logprobs = torch.empty(total, dtype=torch.float32, device=hidden.device)  # [N]
        lse = torch.empty_like(logprobs)  # [N]
        entropy = torch.empty_like(logprobs) if need_entropy else logprobs.new_zeros(0)  # [N] or unused
        for sl in _chunk_slices(total, chunk_size):
            z = _scaled_logits(hidden[sl], weight, bias, temperature)  # [n, V]
            picked = z.gather(-1, tokens[sl, None]).squeeze(-1)  # [n]
            if need_entropy:
                lse[sl] = torch.logsumexp(z, dim=-1)
                probs = (z - lse[sl, None]).exp_()  # [n, V]
                entropy[sl] = lse[sl] - probs.mul_(z).sum(-1)
            else:
                lse[sl] = _logsumexp_(z)  # z is not needed after this
            logprobs[sl] = picked - lse[sl]
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        if not need_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)  # an output nobody used gets None, and no [n, V] work
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = lse.new_zeros(lse.shape)  # [N]
        with _gathered(weight, bias):
            return _TokenLogProb._backward_chunks(ctx, hidden, weight, bias, tokens, lse, entropy, grad_logprobs,
                                                  grad_entropy)

    @staticmethod
    def _backward_chunks(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, lse: Tensor,
                         entropy: Tensor, grad_logprobs: Tensor, grad_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        temperature = ctx.temperature
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for i, sl in enumerate(_chunk_slices(hidden.shape[0], ctx.chunk_size)):
            scale = grad_logprobs[sl].float() / temperature  # [n]
            dz = _scaled_logits(hidden[sl], weight, bias, temperature)  # [n, V], becomes dL/dz in place
            dz.sub_(lse[sl, None])  # log p
            if grad_entropy is None:
                dz.exp_().mul_(-scale[:, None])
            else:  # -p (g_lp + g_H (log p + H)) / T
                probs = dz.exp()  # [n, V]
                g_ent = grad_entropy[sl].float() / temperature  # [n]
                dz.add_(entropy[sl, None]).mul_(g_ent[:, None]).add_(scale[:, None]).mul_(probs).neg_()
                del probs
            dz.scatter_add_(-1, tokens[sl, None], scale[:, None])
            dz = dz.to(hidden.dtype)
            if need_hidden:
                grad_hidden[sl] = dz @ weight
            if need_weight:
                _accumulate_product(grad_weight, dz.t(), hidden[sl], first=i == 0)
            if need_bias:
                grad_bias += dz.float().sum(0)
        return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None, None, None, None, None)


def _accumulate_product(out: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """``out = a @ b`` (first chunk) or ``out += a @ b`` into the float32 accumulator ``out``.

    In float32 the product goes straight into ``out`` (``out += a @ b`` would hold a temporary the size of
    the output layer, 113 MB for a 49k x 576 head, at every chunk); in lower precision the product runs in
    the model's dtype and is added in float32."""
    if a.dtype == torch.float32:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif first:
        out.copy_(a @ b)
    else:
        out.add_(a @ b)


def _chunked(hidden: Tensor, tokens: Tensor, lm_head: nn.Module, temperature: float, need_entropy: bool,
             chunk_size: int) -> tuple[Tensor, Tensor | None]:
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # [B*T, H]
    logprobs, entropy = _TokenLogProb.apply(flat_h, lm_head.weight, getattr(lm_head, "bias", None),
                                            tokens.reshape(-1), temperature, chunk_size, need_entropy)
    return logprobs.view(tokens.shape), entropy.view(tokens.shape) if need_entropy else None  # [B, T]


# ---------------------------------------------------------------- sparse top-K supports (TROLL)
#
# Behaviour pass (``record_support``): per completion token, the old policy's top
# set -- the smallest set of tokens whose probability reaches 1 - tail_mass,
# capped at top_k -- as ``indices`` / ``logprobs`` / ``mask`` padded to top_k,
# plus ``token_logprobs`` (log pi_old of the sampled token, which may lie
# outside the top set).
#
# Update pass (``support`` + ``old_support``): the support is the sampled token
# (slot 0), then the old top set, then the current policy's top set (same rule,
# chosen without grad), deduplicated and compacted to the front; unused slots
# have ``support_mask`` 0 and log-prob -inf. ``support_logprobs`` is the
# full-vocabulary log-softmax gathered on the support (grad flows through the
# normaliser, so the mass outside the support gets gradient).
# ``old_support_logprobs`` is log pi_old on the same slots: recorded values on
# the old top set, the exact old log-prob of the sampled token, and, for slots
# only in the current top set, the old rest mass (1 - old top set - sampled
# token) spread uniformly over the V - |old top set| - 1 tokens it belongs to
# (the maximum-entropy completion of what was recorded; TROLL's authors fill
# such entries with a small constant probability). The old distribution over
# the support plus a tail bucket then still sums to one.

_TINY_MASS = 1e-30  # floor of the old rest mass before its log (an exactly covered vocabulary)


def _top_set(logp: Tensor, spec: SupportSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Smallest top set reaching ``1 - tail_mass`` (capped at ``top_k``) of ``logp [n, V]``, no grad.

    Returns indices, log-probs and mask ``[n, k]`` with k = min(top_k, V),
    sorted by decreasing probability; a rank is kept while the mass of the
    ranks above it is below 1 - tail_mass, so the top token is always kept.
    """
    with torch.no_grad():
        values, indices = torch.topk(logp, min(spec.top_k, logp.shape[-1]), dim=-1)  # [n, k]
        mass_before = torch.cumsum(values.double().exp(), dim=-1) - values.double().exp()  # [n, k]
        mask = mass_before < 1.0 - spec.tail_mass
    return indices, values, mask


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


def _support_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float,
                   need_entropy: bool, spec: SupportSpec, old: dict[str, Tensor],
                   cache: dict[str, tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Update pass, one chunk: log pi_theta on the union support (grad), entropy, mask, log pi_old, ids.

    The support is chosen without grad and kept in ``cache``, so the
    recomputation of this chunk in backward (activation checkpointing) skips
    the top-K selection and reuses the same slots.
    """
    logp = _chunk_logp(hidden, weight, bias, temperature)  # [n, V]
    if "support" not in cache:
        with torch.no_grad():
            new_idx, _, new_mask = _top_set(logp, spec)
            idx, mask, origin = _union_support(tokens, old["indices"], old["mask"], new_idx, new_mask)
            cache["support"] = (idx, mask, _old_on_support(origin, mask, tokens, old, logp.shape[-1]))
    idx, mask, old_lp = cache["support"]
    support_lp = logp.gather(-1, idx).masked_fill(~mask, float("-inf"))  # [n, S]
    return support_lp, _chunk_entropy(logp, need_entropy), mask, old_lp, idx


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


def _chunked_support(hidden: Tensor, tokens: Tensor, lm_head: nn.Module, temperature: float, need_entropy: bool,
                     chunk_size: int, spec: SupportSpec, old_support: dict[str, Tensor]) -> dict[str, Tensor]:
    """Update pass over all positions: log-probs, the union support ``[B, T, S]`` and log pi_old on it."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    old_flat = {k: old_support[k].reshape(flat_t.shape[0], *old_support[k].shape[2:]).to(flat_t.device)
                for k in ("indices", "logprobs", "mask", "token_logprobs")}
    parts = [_run_chunk(_support_stats, flat_h[sl], weight, bias, flat_t[sl], temperature, need_entropy, spec,
                        {k: v[sl] for k, v in old_flat.items()}, {})
             for sl in _chunk_slices(flat_h.shape[0], chunk_size)]
    sup, ent, mask, old_lp, idx = (list(col) for col in zip(*parts))
    width = max(p.shape[1] for p in sup)
    shape = tokens.shape
    support_lp = _pad_slots(sup, width, float("-inf")).view(*shape, width)
    out = {"logprobs": support_lp[..., 0], "support_logprobs": support_lp,
           "old_support_logprobs": _pad_slots(old_lp, width, float("-inf")).view(*shape, width),
           "support_mask": _pad_slots(mask, width, False).view(*shape, width),
           "support_indices": _pad_slots(idx, width, 0).view(*shape, width)}
    if need_entropy:
        out["entropy"] = torch.cat(ent).view(shape)
    return out


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
