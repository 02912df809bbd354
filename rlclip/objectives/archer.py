"""Archer: entropy-aware dual-token constraints (arXiv 2507.15778).

"Stabilizing Knowledge, Promoting Reasoning: Dual-Token Constraints for RLVR"
(Wang et al. 2025). Within each response, tokens whose entropy is at most the
response's q-quantile are "knowledge" tokens (low entropy: keep them close to
the reference, tight clip); the rest are "reasoning" tokens (high entropy:
wider clip, weaker or no KL). Everything is the PPO/GRPO clipped surrogate of
``ratio_clip`` apart from the per-token clip range and the split KL penalty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import (
    LOG_RATIO_CLAMP,
    Objective,
    Reducer,
    masked_mean,
    register_objective,
)
from rlclip.objectives.ratio_clip import check_dual_clip, clipped_surrogate, ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

THRESHOLDS = ("response", "batch")


def masked_row_quantile(values: Tensor, mask: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """The q-quantile of each row's counted entries, vectorised over rows.

    Linear interpolation between order statistics, exactly as
    ``torch.nanquantile(values.where(mask, nan), q, dim=-1)`` (the authors'
    call): with n counted entries sorted ascending as v, position
    p = q * (n - 1), result lerp(v[floor p], v[ceil p], p - floor p).
    Unlike ``torch.quantile`` it has no input-size limit and returns 0 rather
    than NaN for rows without a counted entry.

    Returns ``(quantile [B], has_tokens [B] bool)``.
    """
    counted = mask.bool()
    n = counted.sum(-1)  # [B]
    ordered = values.masked_fill(~counted, float("inf")).sort(dim=-1).values  # counted entries first
    pos = q * (n - 1).clamp_min(0).to(values.dtype)  # [B]
    below = pos.to(torch.long)  # floor, pos >= 0
    above = pos.ceil().to(torch.long)
    weight = pos - below.to(values.dtype)
    v_below = ordered.gather(-1, below.unsqueeze(-1)).squeeze(-1)
    v_above = ordered.gather(-1, above.unsqueeze(-1)).squeeze(-1)
    has_tokens = n > 0
    v_below = torch.where(has_tokens, v_below, torch.zeros_like(v_below))  # no inf in lerp
    v_above = torch.where(has_tokens, v_above, torch.zeros_like(v_above))
    return torch.lerp(v_below, v_above, weight), has_tokens


@register_objective("archer")
class Archer(Objective):
    """Archer's dual-token constrained clipped surrogate (arXiv 2507.15778).

    Per response i (``threshold="response"``), tau_i is the q-quantile of the
    entropy over its counted tokens (linear interpolation, as
    ``torch.nanquantile``); ``threshold="batch"`` uses one quantile over all
    counted tokens of the batch instead. Knowledge tokens: entropy <= tau;
    reasoning tokens: entropy > tau.

    rho = exp(clamp(logprobs - old_logprobs, -20, 20)); eps_t = eps_knowledge
    or eps_reasoning (both sides);
    L_t = max(-A rho, -A clip(rho, 1 - eps_t, 1 + eps_t)), and where A < 0,
    L_t = min(L_t, -dual_clip * A).

    loss = agg(L) + kl_knowledge * mean_{knowledge}(KL) + kl_reasoning * mean_{reasoning}(KL)
    (+ the shared ``kl_coef * agg(KL)`` when kl_coef > 0), each class's KL
    averaged over that class's counted tokens, KL the per-token
    ``kl_estimator`` (k3 by default) against ``ref_logprobs``, clamped to
    [-kl_clamp, kl_clamp].

    Defaults are the authors' released training script
    (github.com/wizard-III/ArcherCodeR, scripts/train/run_archer_qwen2.5_1.5b_code.sh
    and verl/workers/actor/dp_actor.py): token_entropy_quantile=0.8,
    low_entropy_clip_ratio_{low,high}=0.2, high_entropy_clip_ratio_{low,high}=0.5,
    kl_loss_coef=0.001 (knowledge tokens), high_entropy_kl_loss_scale_coef=0.0
    (reasoning tokens), clip_ratio_c=10.0, kl_loss_type=low_var_kl (k3 clamped
    to [-10, 10]).

    Args:
        q: entropy quantile in [0, 1] that splits knowledge from reasoning tokens.
        eps_knowledge: clip range (both sides) of knowledge tokens.
        eps_reasoning: clip range (both sides) of reasoning tokens.
        kl_knowledge: weight of the knowledge tokens' mean KL to the reference.
        kl_reasoning: weight of the reasoning tokens' mean KL to the reference.
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c * A; None disables.
        threshold: ``response`` (one quantile per response, as the authors) or
            ``batch`` (one quantile over the batch's counted tokens).
        kl_clamp: clamp of the per-token KL value (verl's low_var_kl uses 10);
            None disables.
        kl_per_response: average each class's KL per response, then over
            responses, instead of over the step's class tokens (see below).
            With ``agg: seq_mean_token_mean`` this is the authors' released run
            (``ppo_micro_batch_size_per_gpu=1`` with ``loss_agg_mode=token-mean``,
            so every loss term is a per-response mean); docs/conventions.md.

    Per-class KL. Default (``kl_per_response=False``), with K the step's
    knowledge tokens: KL_k = sum_{t in K} KL_t / |K|. With ``kl_per_response``,
    with K_i the knowledge tokens of response i and N the step's number of
    responses with counted tokens (``PolicyBatch.num_sequences``):
    KL_k = (1/N) sum_i [sum_{t in K_i} KL_t / |K_i|], a response without a token
    of the class adding 0 (as verl's ``masked_mean`` in the authors' actor,
    verl/workers/actor/dp_actor.py of ArcherCodeR, which then divides by the
    gradient-accumulation count, the number of responses). Same for reasoning.

    The token classes, the class token counts and (``threshold="batch"``) the
    quantile are step statistics (:meth:`step_statistics`): computed once over
    the whole optimizer step, across processes, from the current policy's
    entropy before the micro-batch forwards. Each micro-batch adds
    ``kl_k * sum(KL over its knowledge tokens) / N_knowledge(step)`` (same for
    reasoning), so the update is invariant to micro-batching and the number
    of processes.
    """

    needs = frozenset({"entropy"})
    step_needs = frozenset({"entropy"})

    def __init__(self, *, q: float = 0.8, eps_knowledge: float = 0.2, eps_reasoning: float = 0.5,
                 kl_knowledge: float = 0.001, kl_reasoning: float = 0.0, dual_clip: float | None = 10.0,
                 threshold: str = "response", kl_clamp: float | None = 10.0, kl_per_response: bool = False,
                 **shared: Any) -> None:
        super().__init__(**shared)
        if not 0.0 <= q <= 1.0:
            raise ConfigError(f"archer: q must be in [0, 1], got {q}")
        if not (eps_knowledge >= 0 and eps_reasoning >= 0):
            raise ConfigError(f"archer: eps_knowledge and eps_reasoning must be >= 0, "
                              f"got {eps_knowledge}, {eps_reasoning}")
        if not (kl_knowledge >= 0 and kl_reasoning >= 0):
            raise ConfigError(f"archer: kl_knowledge and kl_reasoning must be >= 0, "
                              f"got {kl_knowledge}, {kl_reasoning}")
        if threshold not in THRESHOLDS:
            raise ConfigError(f"archer: threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
        if kl_clamp is not None and not kl_clamp > 0:
            raise ConfigError(f"archer: kl_clamp must be > 0 (or null to disable), got {kl_clamp}")
        check_dual_clip(dual_clip)
        self.q, self.threshold = float(q), threshold
        self.eps_knowledge, self.eps_reasoning = float(eps_knowledge), float(eps_reasoning)
        self.kl_knowledge, self.kl_reasoning = float(kl_knowledge), float(kl_reasoning)
        self.dual_clip, self.kl_clamp = dual_clip, kl_clamp
        self.kl_per_response = bool(kl_per_response)
        if self.kl_knowledge > 0 or self.kl_reasoning > 0:
            self.needs = self.needs | {"ref"}
        # step-wide statistics matter only for the per-class KL means and the batch quantile
        if not (self.kl_knowledge > 0 or self.kl_reasoning > 0 or threshold == "batch"):
            self.step_needs = frozenset()

    def step_statistics(self, batch: PolicyBatch, reduce: Reducer) -> dict[str, Tensor]:
        """Entropy, per-row threshold and the step's knowledge / reasoning token counts.

        ``entropy [B, T]`` is kept so that every micro-batch classifies its
        tokens with exactly the values the counts were made from.
        """
        if batch.entropy is None:
            raise ValueError("archer needs PolicyBatch.entropy")
        entropy, counted = batch.entropy.detach(), batch.mask.bool()  # [B, T]
        if self.threshold == "response":
            tau, _ = masked_row_quantile(entropy, counted, self.q)  # [B]
        else:
            pooled = reduce.cat(entropy[counted])  # [n_step]
            tau, _ = masked_row_quantile(pooled.unsqueeze(0), torch.ones_like(pooled, dtype=torch.bool)[None], self.q)
            tau = tau.expand(entropy.shape[0]).contiguous()  # [B]
        low = entropy <= tau.unsqueeze(-1)  # [B, T]
        counts = torch.stack([(low & counted).sum(), (~low & counted).sum()]).to(torch.float64)
        n_knowledge, n_reasoning = reduce.sum(counts)
        return {"entropy": entropy, "tau": tau, "n_knowledge": n_knowledge, "n_reasoning": n_reasoning}

    def token_classes(self, batch: PolicyBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Split the counted tokens: ``(knowledge [B, T], reasoning [B, T], tau [B], has_tokens [B])``.

        The masks are boolean and only ever true on counted tokens; tau is the
        per-row threshold (0 on rows without a counted token).
        """
        stats = batch.step_stats
        if stats is None:
            stats = self.step_statistics(batch, Reducer())
        counted = batch.mask.bool()
        tau = stats["tau"]  # [B]
        low = stats["entropy"] <= tau.unsqueeze(-1)  # [B, T]
        return low & counted, ~low & counted, tau, counted.any(-1)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        knowledge, reasoning, tau, has_tokens = self.token_classes(batch)
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T]
        eps = torch.where(reasoning, ratio.new_tensor(self.eps_reasoning), ratio.new_tensor(self.eps_knowledge))
        loss, active = clipped_surrogate(ratio, batch.advantages, eps, eps, self.dual_clip)
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, active)
        for name, cls in (("knowledge", knowledge), ("reasoning", reasoning)):
            for side in ("low", "high"):
                metrics[f"clip_frac_{side}_{name}"] = masked_mean(active[side].to(ratio.dtype), cls)
        metrics["reasoning_frac"] = masked_mean(reasoning.to(ratio.dtype), batch.mask)
        metrics["entropy_threshold"] = masked_mean(tau.to(ratio.dtype), has_tokens)
        return loss, metrics

    def kl_penalty(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        """The shared ``kl_coef`` penalty plus Archer's per-class KL terms."""
        penalty, metrics = super().kl_penalty(batch)
        weighted = self.kl_knowledge > 0 or self.kl_reasoning > 0
        if batch.ref_logprobs is None:
            if weighted:
                raise ValueError("archer with kl_knowledge or kl_reasoning > 0 needs PolicyBatch.ref_logprobs")
            return penalty, metrics
        knowledge, reasoning, _, _ = self.token_classes(batch)
        kl = self.kl_terms(batch)  # [B, T]
        if self.kl_clamp is not None:
            kl = kl.clamp(-self.kl_clamp, self.kl_clamp)
        kl = torch.where(batch.mask.bool(), kl, torch.zeros_like(kl))  # inf on padding never reaches a mean
        metrics = {**metrics, "kl_knowledge": masked_mean(kl.detach(), knowledge),
                   "kl_reasoning": masked_mean(kl.detach(), reasoning)}
        if weighted:
            if self.kl_per_response:
                kl_k, kl_r = self.class_kl_per_response(kl, knowledge, batch), \
                    self.class_kl_per_response(kl, reasoning, batch)
            else:
                kl_k, kl_r = self.class_kl_per_token(kl, knowledge, reasoning, batch)
            penalty = penalty + self.kl_knowledge * kl_k + self.kl_reasoning * kl_r
        return penalty, metrics

    def class_kl_per_token(self, kl: Tensor, knowledge: Tensor, reasoning: Tensor,
                           batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        """Each class's KL summed over this batch, divided by the class's token count over the whole step.

        KL_c = sum_{t in c} KL_t / N_c(step), N_c a step statistic, so micro-batches add up to the step's mean.
        """
        stats = batch.step_stats if batch.step_stats is not None else self.step_statistics(batch, Reducer())
        kl_k = (kl * knowledge).sum() / stats["n_knowledge"].clamp_min(1).to(kl.dtype)
        kl_r = (kl * reasoning).sum() / stats["n_reasoning"].clamp_min(1).to(kl.dtype)
        return kl_k, kl_r

    @staticmethod
    def class_kl_per_response(kl: Tensor, cls: Tensor, batch: PolicyBatch) -> Tensor:
        """Mean over responses of each response's class-mean KL (``kl_per_response``).

        KL_c = (1/N) sum_i sum_{t in c_i} KL_t / max(|c_i|, 1), with ``kl [B, T]`` zero off
        the counted tokens and ``cls [B, T]`` the class mask. |c_i| is per row (a micro-batch
        holds whole rows, so it needs no reduction); N is the step's number of responses with
        counted tokens (``batch.num_sequences``, a global count from the trainer), else this
        batch's, so micro-batches add up to the step's value.
        """
        cls = cls.to(kl.dtype)
        per_row = (kl * cls).sum(-1) / cls.sum(-1).clamp_min(1)  # [B]
        n = batch.num_sequences
        if n is None:
            n = batch.mask.bool().any(-1).sum().clamp_min(1)
        return per_row.sum() / torch.as_tensor(n, dtype=kl.dtype, device=kl.device)
