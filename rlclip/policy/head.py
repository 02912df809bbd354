"""The output layer, chunked: log-probs of chosen tokens (and the entropy) from final hidden states, with no
``[B, T, V]`` tensor ever held (``_chunk_slices``): each chunk's logits are made, reduced and dropped, and
recomputed in backward (``head_backward``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_CHUNK_SIZE = 1024

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


def _lse_and_entropy(z: Tensor) -> tuple[Tensor, Tensor]:
    """``logsumexp(z)`` and the entropy ``H = lse - sum(softmax(z) z)`` ``[n]`` each, with one ``[n, V]`` buffer
    beside ``z`` (``e = exp(z - max)``; ``sum(e z)`` as a batched dot product, not a product buffer then a sum).
    torch.logsumexp then a softmax held three."""
    peak = z.amax(-1, keepdim=True)  # [n, 1]
    e = torch.sub(z, peak).exp_()  # [n, V]
    total = e.sum(-1)  # [n]
    dot = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # [n]: sum_v e_v z_v
    lse = total.log().add_(peak.squeeze(-1))
    return lse, lse - dot / total


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
                lse[sl], entropy[sl] = _lse_and_entropy(z)
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
        grads = head_backward(ctx.needs_input_grad[:3], ctx.temperature, ctx.chunk_size, hidden, weight, bias,
                              tokens[:, None], lse, entropy, grad_logprobs[:, None], grad_entropy)
        return (*grads, None, None, None, None)


def head_backward(needs: tuple[bool, ...], temperature: float, chunk_size: int, hidden: Tensor, weight: Tensor,
                  bias: Tensor | None, index: Tensor, lse: Tensor, entropy: Tensor, grad: Tensor,
                  grad_entropy: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for ``hidden [N, H]``, ``weight`` and ``bias`` (where ``needs`` says) of log-probs taken at
    ``index [N, S]`` (``grad [N, S]``) and of the entropy (``grad_entropy [N]`` or None), recomputing each chunk's
    logits: ``dL/dz = (onehot-sum of g at index - p sum(g) - g_H p (log p + H)) / T`` built in place in one
    ``[n, V]`` buffer (a second holds ``p`` only when the entropy has a gradient)."""
    need_hidden, need_weight, need_bias = needs
    grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
    grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
    with _gathered(weight, bias):
        for i, sl in enumerate(_chunk_slices(hidden.shape[0], chunk_size)):
            scale = grad[sl].float() / temperature  # [n, S]
            total = scale.sum(-1, keepdim=True)  # [n, 1]
            dz = _scaled_logits(hidden[sl], weight, bias, temperature)  # [n, V], becomes dL/dz in place
            dz.sub_(lse[sl, None])  # log p
            if grad_entropy is None:
                dz.exp_().mul_(-total)
            else:  # -p (sum g + g_H (log p + H)) / T
                probs = dz.exp()  # [n, V]
                g_ent = grad_entropy[sl].float() / temperature  # [n]
                dz.add_(entropy[sl, None]).mul_(g_ent[:, None]).add_(total).mul_(probs).neg_()
                del probs
            dz.scatter_add_(-1, index[sl], scale)
            dz = dz.to(hidden.dtype)
            if need_hidden:
                grad_hidden[sl] = dz @ weight
            if need_weight:
                _accumulate_product(grad_weight, dz.t(), hidden[sl], first=i == 0)
            if need_bias:
                grad_bias += dz.float().sum(0)
    return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None)


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

