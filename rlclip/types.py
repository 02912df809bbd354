"""Batches passed between the stages of a training step.

Shapes: B = sequences, P = prompt length, T = completion length,
S = sparse-support size. A ``mask`` is 1 where a token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from rlclip.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class SupportSpec:
    """How to build TROLL's sparse support (see ``rlclip.objectives.troll``)."""

    top_k: int = 64
    """Cap on the size of each policy's top set."""
    tail_mass: float = 1e-5
    """Each top set is the smallest set of tokens reaching 1 - tail_mass of probability."""


@dataclass
class PolicyBatch:
    """What an objective sees (contract 1). All ``[B, T]`` over completion tokens."""

    logprobs: Tensor
    """log pi_theta(a_t) of the sampled tokens; carries grad."""
    old_logprobs: Tensor
    """log pi_old(a_t) under the behaviour policy; no grad."""
    advantages: Tensor
    """Per-token advantage (sequence advantages broadcast over the response)."""
    mask: Tensor
    """1 where a completion token counts, 0 on padding."""
    ref_logprobs: Tensor | None = None
    """log pi_ref(a_t) of the reference model; only when an objective needs it."""
    entropy: Tensor | None = None
    """Entropy of pi_theta at each position (detached); only when needed."""
    support_logprobs: Tensor | None = None
    """``[B, T, S]`` log pi_theta on a sparse support, index 0 = sampled token (grad)."""
    old_support_logprobs: Tensor | None = None
    """``[B, T, S]`` log pi_old on the same support."""
    support_mask: Tensor | None = None
    """``[B, T, S]`` 1 where a support slot is used."""
    num_tokens: float | Tensor | None = None
    """Global token count of the optimizer step (token-mean denominator)."""
    num_sequences: float | Tensor | None = None
    """Global sequence count of the optimizer step (sequence-mean denominator)."""
    truncated: Tensor | None = None
    """``[B]`` bool: the completion hit the length limit without EOS (for ``mask_truncated``)."""
    step_stats: dict[str, Tensor] | None = None
    """Statistics of the whole optimizer step from ``Objective.step_statistics`` (rows sliced to this
    batch); None: the objective computes them from this batch alone."""
    token_weights: Tensor | None = None
    """``[B, T]`` per-token weights applied to the per-token loss before aggregation (the importance-sampling
    correction of a vLLM sampler, rlclip/is_correction.py; not to the KL penalty); None: 1."""
    group_ids: Tensor | None = None
    """``[B]`` the prompt group of each row (the G completions of a prompt share an id), for ``agg: prompt_mean``."""
    prompt_tokens: Tensor | None = None
    """``[B]`` counted tokens of each row's prompt group over the optimizer step (``prompt_mean``'s n_g)."""
    num_prompts: float | Tensor | None = None
    """Global count of the optimizer step's prompt groups with counted tokens (``prompt_mean``'s P)."""


@dataclass
class ObjectiveOutput:
    """A differentiable 0-d ``loss`` and float / 0-d tensor ``metrics``."""

    loss: Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutBatch:
    """Completions sampled for a set of prompts, on one process.

    Row ``i`` belongs to prompt group ``i // group_size``.
    """

    prompt_ids: Tensor
    """``[B, P]`` left-padded prompt token ids."""
    prompt_mask: Tensor
    """``[B, P]`` 1 on real prompt tokens."""
    completion_ids: Tensor
    """``[B, T]`` right-padded completion token ids (EOS included when emitted)."""
    completion_mask: Tensor
    """``[B, T]`` 1 on completion tokens up to and including the first EOS."""
    truncated: Tensor
    """``[B]`` bool: the completion hit ``max_new_tokens`` without EOS."""
    prompts: list[Any]
    """The prompts as given to the reward functions (strings or chat messages)."""
    completions: list[Any]
    """Decoded completions (strings, or assistant message lists for chat prompts)."""
    columns: dict[str, list[Any]] = field(default_factory=dict)
    """Other dataset columns, repeated per completion (for reward functions)."""
    rewards: Tensor | None = None
    """``[B]`` weighted total reward."""
    advantages: Tensor | None = None
    """``[B, T]`` per-token advantages."""
    old_logprobs: Tensor | None = None
    """``[B, T]`` behaviour-policy log-probs of the completion tokens."""
    ref_logprobs: Tensor | None = None
    """``[B, T]`` reference-model log-probs, when KL needs them."""
    old_values: Tensor | None = None
    """``[B, T]`` critic values at rollout time (PPO mode)."""
    returns: Tensor | None = None
    """``[B, T]`` value targets (PPO mode)."""
    old_support: dict[str, Tensor] | None = None
    """Old policy's sparse top set per token (``indices``, ``logprobs``, ``mask``)."""
    prompts_truncated: int = 0
    """Prompts of this rollout cut from the left to ``rollout.max_prompt_length``."""
    sampler_logprobs: Tensor | None = None
    """``[B, T]`` log mu(a_t): the log-prob of each sampled token under the distribution it was drawn from, after
    temperature, top-k and top-p (the HF decoding loop's, or vLLM's processed log-probs); 0 off the mask, NaN
    where the sampler gave none. Filled by every backend (None only for a hand-built batch)."""
    policy_version: int = 0
    """The policy version that sampled this rollout (a version counts rollouts consumed; see rollout.staleness)."""
    rejection_keep: Tensor | None = None
    """``[B, T]`` 1 where the rollout correction's rejection masks kept a token (``rollout.rejection``); the trainer
    takes the others out of ``completion_mask`` after the advantages. None: nothing rejected."""
    is_weights: Tensor | None = None
    """``[B, T]`` importance-sampling weights of the sampler mismatch (rlclip/is_correction.py); None: 1."""
    group_ids: Tensor | None = None
    """``[B]`` the prompt group of each row, ``i // group_size`` when scored; kept through ``select``."""
    rewards_per_func: Tensor | None = None
    """``[B, F]`` each reward function's unweighted score (NaN: none, or the row is unscored), for
    ``advantage.multi_reward: normalize_then_sum``."""

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, index: Tensor) -> RolloutBatch:
        """Rows ``index`` of every tensor field (lists and columns included)."""
        idx = index.tolist()
        updates: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                updates[f.name] = value[index.to(value.device)]
            elif isinstance(value, list):
                updates[f.name] = [value[i] for i in idx]
            elif f.name == "columns":
                updates[f.name] = {k: [v[i] for i in idx] for k, v in value.items()}
            elif isinstance(value, dict):
                updates[f.name] = {k: v[index.to(v.device)] for k, v in value.items()}
        return replace(self, **updates)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor field of a dataclass batch to ``device``."""
    updates = {f.name: getattr(batch, f.name).to(device) for f in fields(batch)
               if isinstance(getattr(batch, f.name), Tensor)}
    return replace(batch, **updates)
