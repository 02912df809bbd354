"""The GRPO/PPO training loop: rollout -> reward -> advantage -> objective -> optimizer step.

One rollout samples G completions for each prompt, scores them, turns the
rewards into advantages and records the behaviour policy's log-probs with a
no-grad pass. It is then used for ``num_iterations`` passes of
``mini_batches`` optimizer steps each; a mini-batch is accumulated over
micro-batches, and its loss is normalised by the *global* token count of
the optimizer step so that micro-batching and data parallelism leave the
update unchanged.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from rlclip import advantages as adv_lib
from rlclip.behaviour import BehaviourPass
from rlclip.checkpoint import Checkpointer, claim_output_dir, resume_run, save_run
from rlclip.config import (
    TrainConfig,
    build_clipper_from_config,
    build_objective_from_config,
)
from rlclip.console import ZeroAdvantageWatch, run_summary, start_banner
from rlclip.critic import gae_advantages, value_loss
from rlclip.data import check_records, load_records
from rlclip.entropy_bonus import EntropyBonus
from rlclip.generation import build_generator
from rlclip.grad_clip import build_clipper
from rlclip.gradient_step import GradientStep
from rlclip.guard import NonFiniteGuard
from rlclip.interrupt import StopRequest
from rlclip.kl_control import end_objective_step
from rlclip.memory import FreeMemoryRelease
from rlclip.model_setup import build_optimizer, critic_and_optimizer, prepare_policy, reference_model
from rlclip.modeling import load_model_and_tokenizer, quiet_saving
from rlclip.objectives.aggregation import prompt_counts
from rlclip.optim_in_backward import build_in_backward
from rlclip.parallel import Layout, build_accelerator
from rlclip.periodic_eval import PeriodicEval
from rlclip.policy import completion_logprobs
from rlclip.rollout import SamplingSettings, limit_prompts
from rlclip.run_log import RunLog
from rlclip.scoring import reward_functions, score_rollout
from rlclip.staleness import BackgroundRolloutQueue, RolloutQueue, staleness_metrics
from rlclip.step_statistics import own_step_statistics, whole_step_statistics
from rlclip.telemetry import TrustTelemetry
from rlclip.types import PolicyBatch, RolloutBatch
from rlclip.utils import (
    MetricAccumulator,
    ProcessReducer,
    all_reduce,
    rows_of,
    split_indices,
)


class Trainer:
    """Trains ``config.model`` with the objective named in ``config.objective``.

    Args:
        config: the resolved training config.
        reward_funcs: Python reward functions (TRL signature); when given they
            replace ``config.reward.funcs``.
        reward_weights: weights of ``reward_funcs`` (default 1 each).
        train_dataset: records (dicts with a ``prompt``) or a ``datasets.Dataset``;
            default: the data source in ``config.data``.
    """

    def __init__(self, config: TrainConfig, reward_funcs: Sequence[Callable[..., Any]] | None = None,
                 reward_weights: Sequence[float] | None = None, train_dataset: Any = None) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        report_to = None if config.logging.report_to == "none" else config.logging.report_to
        self.accelerator = build_accelerator(report_to, config.output_dir)
        self.lock = claim_output_dir(self.accelerator, self.output_dir, bool(config.resume_from_checkpoint),
                                     config.overwrite_output_dir)  # before anything heavy: a bad output_dir fails in a second
        try:
            self._set_up(reward_funcs, reward_weights, train_dataset)
        except BaseException:
            if self.lock is not None:  # a failed construction must not keep the directory locked
                self.lock.release()
            raise

    def _set_up(self, reward_funcs: Sequence[Callable[..., Any]] | None, reward_weights: Sequence[float] | None,
                train_dataset: Any) -> None:
        """Objective, clipper, data, model, reference, optimizer, critic: everything after the output_dir."""
        config = self.config
        set_seed(config.seed)
        self.objective = build_objective_from_config(config)
        self.layout = Layout(self.accelerator)  # DDP, DeepSpeed or FSDP: who reduces, clips and steps
        self.layout.configure(config)
        self.generator = build_generator(config, self.accelerator)  # hf, or vLLM (a missing vllm fails here)
        self.clipper = build_clipper_from_config(config)
        self.guard = NonFiniteGuard(self.accelerator, config.train.max_consecutive_skips)
        self.entropy_bonus = EntropyBonus(config.entropy)
        self.zero_advantage = ZeroAdvantageWatch(self._say, config.rollout.temperature)
        self.telemetry = TrustTelemetry() if config.logging.trust_metrics else None
        self.stop = StopRequest()
        self.behaviour = BehaviourPass(config, self.objective, self.accelerator, self._logprobs, self.needs_reference,
                                       self.generator.corrects)
        self.reward_funcs, self.reward_weights = reward_functions(config.reward.funcs, reward_funcs, reward_weights)
        self.records = list(train_dataset) if train_dataset is not None else load_records(config.data, config.seed)
        check_records(self.records, "the training data set")
        self.evaluator = PeriodicEval(config, self.accelerator, self.records)  # its held-out problems load before the model
        model, self.tokenizer = load_model_and_tokenizer(
            config.model.name_or_path, config.model.dtype, config.model.gguf_file,
            config.model.trust_remote_code, config.model.attn_implementation)
        self._base_path = model.name_or_path
        self.max_prompt_length, self.records = limit_prompts(self.records, self.tokenizer, model.config,
                                                             config.rollout, self._say)
        single = self.layout.fused_optimizer and self.accelerator.num_processes == 1
        model = self.layout.shard(prepare_policy(model, config, single))  # FSDP shards before the optimizer holds the weights
        self.ref_model = reference_model(config, self._base_path, self.layout) \
            if self.needs_reference and not config.lora.enabled else None  # LoRA: the adapter off is the reference
        self.optimizer = build_optimizer(model, config.train, self.layout.fused_optimizer)
        self.scheduler = get_scheduler(config.train.lr_scheduler, self.optimizer,
                                       num_warmup_steps=config.train.warmup_steps,
                                       num_training_steps=config.max_steps)
        # The scheduler is stepped by hand once per optimizer step (accelerate's
        # wrapper would step it once per process) and only registered for checkpoints.
        self.in_backward = build_in_backward(config.train.optimizer_in_backward, self.optimizer, model, self.layout)
        self.release_memory = FreeMemoryRelease(config.train.release_free_memory)
        self.release_memory.watch_backward(model)  # after the in-backward hooks: it counts what they freed
        self.model, self.optimizer = self.layout.prepare(model, self.optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.critic, self.critic_optimizer = critic_and_optimizer(config, self._base_path, self.accelerator)
        self.gradient_step = GradientStep(
            self.layout, self.guard, self.clipper, self.optimizer, self.scheduler, self.generator.policy_changed,
            self.in_backward, build_clipper("norm", max_norm=config.critic.max_grad_norm), self.critic_optimizer)
        set_seed(config.seed, device_specific=True)  # different samples on each process
        self.step = 0
        self.rollout_index = 0
        self.pending: tuple[RolloutBatch, dict[str, float], int] | None = None  # a rollout cut short by a signal
        self.queue = BackgroundRolloutQueue(config.rollout.staleness, self.sample, self.launch_sample,
                                            self.finish_sample) if self.overlaps else \
            RolloutQueue(config.rollout.staleness, self.sample)
        self.stopped_by: str | None = None  # the signal that stopped train() early
        self.run_log = RunLog(self.accelerator, self.output_dir)
        self.checkpointer = Checkpointer(self.accelerator, self.output_dir, config.keep_last, self.save_model,
                                         self.layout.state_io(self.model, self.optimizer))

    def _say(self, message: str) -> None:
        """A one-line notice on the main process (stderr, so it never mixes with results on stdout)."""
        if self.accelerator.is_main_process:
            tqdm.write(f"rlclip: {message}", file=sys.stderr)

    @property
    def overlaps(self) -> bool:
        """Generation overlaps the update: a vLLM server, one process (the engine's gathers are collectives)."""
        return self.config.rollout.backend == "vllm_server" and self.accelerator.num_processes == 1

    @property
    def needs_reference(self) -> bool:
        return "ref" in self.objective.needs or self.config.advantage.kl_in_reward > 0

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, Any]]:
        """Train for ``max_steps`` optimizer steps; returns the logged metrics.

        SIGINT / SIGTERM stop after the current optimizer step with a
        checkpoint (``self.stopped_by`` names the signal); a run that cannot
        go on raises :class:`TrainingError` and leaves the last checkpoint intact.
        """
        try:
            with self.stop:
                return self._train()
        finally:
            self.queue.close()
            self.generator.close()  # a vLLM server rlclip launched stops with the run
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> list[dict[str, Any]]:
        cfg, acc = self.config, self.accelerator
        resume_run(self)
        if self.step:  # resumed: the policy is not the checkpoint a vLLM engine loads at start
            self.generator.policy_changed()
        self.run_log.start(cfg)
        self._say(start_banner(self))
        started, history = time.perf_counter(), []
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.logging.progress_bar))
        try:
            self._loop(bar, history)
        finally:
            bar.close()  # an error message then starts on its own line
        if history and not self.stopped_by:
            self._say(run_summary(history, cfg.output_dir, time.perf_counter() - started, cfg.logging.report_to))
        return history

    def _loop(self, bar: tqdm, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg, acc = self.config, self.accelerator
        while self.step < cfg.max_steps:
            start = time.perf_counter()
            rollout, rollout_metrics, done = self.pending or self.rollout()
            self.pending = None
            for metrics in self.update(rollout, skip=done):
                metrics = {"step": self.step, **metrics, **rollout_metrics,
                           "time/step_s": time.perf_counter() - start}
                if self.evaluator.due(self.step, last=self.step >= cfg.max_steps):
                    started = time.perf_counter()
                    metrics.update(self.evaluator.run(self.model, self.tokenizer), **{"time/eval_s": time.perf_counter() - started})
                start = time.perf_counter()
                self.run_log.write(metrics, self.step)
                history.append(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", loss=f"{metrics['loss']:.4f}")
                done += 1
                if self.stop.requested(acc) and self.step < cfg.max_steps:
                    return self._stop_gracefully(rollout, rollout_metrics, done, history)
            self.rollout_index += 1
            if cfg.save_steps and self.step // cfg.save_steps > (self.step - self._steps_per_rollout()) // cfg.save_steps:
                save_run(self)
        bar.close()
        self.save_model(self.output_dir)
        if self.critic is not None:
            self.save_model(self.output_dir / "critic", self.critic)
        for tracker in acc.trackers:  # not end_training(): it would tear down the process group
            tracker.finish()
        return history

    def rollout(self) -> tuple[RolloutBatch, dict[str, float], int]:
        """The next rollout to train on, prepared: the queue's oldest (``rollout.staleness`` versions old)."""
        start = time.perf_counter()
        rollout, metrics = self.queue.pop()  # samples with the current weights first (rlclip/staleness.py)
        metrics = {**metrics, **self.prepare(rollout)}
        metrics["time/rollout_s"] = time.perf_counter() - start  # sampling the newest rollout + preparing this one
        return rollout, metrics, 0

    def sample(self, index: int) -> tuple[RolloutBatch, dict[str, float]]:
        """rollout -> reward: rollout number ``index`` sampled with the current weights, scored."""
        return self.finish_sample(self.launch_sample(index)())

    def launch_sample(self, index: int) -> Callable[[], RolloutBatch]:
        """Copy the weights to the sampler if they moved; the generation of rollout ``index``, to run now or in
        the background (a vLLM server: rlclip/staleness.py)."""
        records, version, settings = self.next_prompts(index), self.rollout_index, self.sampling_settings()
        if hasattr(self.generator, "sync"):  # a vLLM engine: copy here, sample on that copy (never copy there)
            engine = self.generator.sync(self.model, self.tokenizer, records, settings)
            sample = partial(self.generator.sample, engine, self.model, self.tokenizer, records, settings)
        else:
            sample = partial(self.generate, records)

        def generate() -> RolloutBatch:
            rollout = sample()
            rollout.policy_version = version
            return rollout

        return generate

    def finish_sample(self, rollout: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]:
        """Reward (in the trainer's thread: scoring and its metrics are collectives)."""
        self.release_memory()  # generation's caches and logits are freed: hand their pages back
        metrics = self.score(rollout)
        metrics["rollout/prompts_truncated"] = all_reduce(
            self.accelerator, torch.tensor(float(rollout.prompts_truncated), device=self.accelerator.device), "sum").item()
        return rollout, metrics

    def prepare(self, rollout: RolloutBatch) -> dict[str, float]:
        """At train time: behaviour log-probs (pi_prox) and rollout correction, then the advantages."""
        metrics = self.record_behaviour(rollout)
        metrics.update(self.estimate_advantages(rollout))
        if rollout.rejection_keep is not None:  # rejected tokens leave the loss and its token counts (verl)
            rollout.completion_mask = rollout.completion_mask * rollout.rejection_keep.to(rollout.completion_mask.dtype)
        largest = (rollout.advantages.abs() * rollout.completion_mask).max()  # 0: nothing to learn from
        self.zero_advantage.observe(bool(all_reduce(self.accelerator, largest, "max") == 0))
        if self.config.rollout.staleness:
            metrics.update(staleness_metrics(self.rollout_index, rollout.policy_version,
                                             ProcessReducer(self.accelerator), self.accelerator.device))
        return metrics

    def _stop_gracefully(self, rollout: RolloutBatch, rollout_metrics: dict[str, float], done: int,
                         history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Save a checkpoint (with the unfinished rollout, so a resume is exact) and say how to resume."""
        if done >= self._steps_per_rollout():
            self.rollout_index += 1
            self.pending = None
        else:
            self.pending = (rollout, rollout_metrics, done)
        path = save_run(self)
        self.stopped_by = self.stop.signal_name or "a signal on another process"
        self._say(f"stopped by {self.stopped_by} after step {self.step}; checkpoint saved to {path}. Resume with "
                  f"the same command plus --resume_from_checkpoint latest")
        return history

    def next_prompts(self, index: int | None = None) -> list[dict[str, Any]]:
        """This process's share of rollout number ``index``'s prompts (a seeded pass over the data); None: the
        next rollout to be sampled."""
        cfg, acc = self.config, self.accelerator
        index = self.queue.sampled if index is None else index
        per_rollout = cfg.rollout.prompts_per_step * acc.num_processes
        start = index * per_rollout + acc.process_index * cfg.rollout.prompts_per_step
        orders: dict[int, Tensor] = {}  # one shuffle per epoch; a rollout spans at most a few
        picked = []
        for position in range(start, start + cfg.rollout.prompts_per_step):
            epoch, offset = divmod(position, len(self.records))
            if epoch not in orders:
                orders[epoch] = torch.randperm(len(self.records),
                                               generator=torch.Generator().manual_seed(cfg.seed + epoch))
            picked.append(self.records[int(orders[epoch][offset])])
        return picked

    def sampling_settings(self) -> SamplingSettings:
        r = self.config.rollout
        return SamplingSettings(r.group_size, r.max_new_tokens, r.temperature, r.top_p, r.top_k,
                                self.max_prompt_length, r.min_new_tokens)

    def generate(self, records: list[dict[str, Any]]) -> RolloutBatch:
        """Rollout: G completions per prompt from the current policy (rlclip/generation.py: hf or vLLM)."""
        return self.generator.generate(self.model, self.tokenizer, records, self.sampling_settings())

    def score(self, rollout: RolloutBatch) -> dict[str, float]:
        """Reward: the weighted reward functions (rlclip/scoring.py); the rollout's metrics over all processes."""
        metrics, any_scored = score_rollout(rollout, self.reward_funcs, self.reward_weights,
                                            self.config.reward.on_error, self.config.rollout.group_size,
                                            self.accelerator)
        if not any_scored:
            self._say(f"rollout {self.rollout_index}: no completion got a reward (every reward function returned "
                      "None or failed); nothing is learned from it")
        return metrics

    def estimate_advantages(self, rollout: RolloutBatch) -> dict[str, float]:
        """Advantage: group baselines (grpo, dr_grpo, rloo) or GAE on the critic's values."""
        cfg = self.config.advantage
        if cfg.name != "gae":  # advantage.multi_reward: sum the rewards first, or each function's advantage
            seq_adv = adv_lib.group_advantages(rollout.rewards.float(), self.config.rollout.group_size, cfg,
                                               rollout.rewards_per_func, self.reward_weights,
                                               partial(all_reduce, self.accelerator, op="sum"))  # [N]
            rollout.advantages = seq_adv.unsqueeze(1).expand_as(rollout.completion_ids).contiguous()  # [N, T]
            return {}
        return gae_advantages(rollout, cfg, self.accelerator)  # PPO mode: GAE on the critic's values

    def record_behaviour(self, rollout: RolloutBatch) -> dict[str, float]:
        """No-grad passes after generation (rlclip/behaviour.py): behaviour, reference and value estimates."""
        return self.behaviour.record(rollout, self.model, self.ref_model, self.critic)

    def _logprobs(self, model: torch.nn.Module, micro: RolloutBatch, need_entropy: bool = False,
                  record_support: bool = False, with_support: bool = False,
                  entropy_grad: bool = False) -> dict[str, Tensor]:
        """Log-probs of ``micro``'s completions; optionally entropy, the old top set, or the update-time support."""
        spec = getattr(self.objective, "support_spec", None) if (record_support or with_support) else None
        return completion_logprobs(model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                                   micro.completion_mask, temperature=self.config.rollout.temperature or 1.0,
                                   need_entropy=need_entropy, entropy_grad=entropy_grad,
                                   chunk_size=self.config.train.logprob_chunk_size,
                                   record_support=spec if record_support else None,
                                   support=spec if with_support else None,
                                   old_support=micro.old_support if with_support else None,
                                   shared_prompt=self.config.train.shared_prompt)

    def _steps_per_rollout(self) -> int:
        return self.config.train.num_iterations * self.config.train.mini_batches

    def update(self, rollout: RolloutBatch, skip: int = 0) -> Iterator[dict[str, float]]:
        """``num_iterations`` shuffled passes of ``mini_batches`` optimizer steps over the rollout.

        ``skip``: optimizer steps of this rollout already taken (a resumed, interrupted rollout); the
        shuffles are replayed so the remaining steps see the same mini-batches.
        """
        cfg = self.config.train
        size = len(rollout) // cfg.mini_batches
        generator = torch.Generator().manual_seed(self.config.seed * 100003 + self.rollout_index)
        position = 0
        for _ in range(cfg.num_iterations):
            order = torch.randperm(len(rollout), generator=generator)
            for k in range(cfg.mini_batches):
                position += 1
                if position <= skip:
                    continue
                rows = self._micro_batch_order(order[k * size:(k + 1) * size])
                yield self.optimizer_step(rollout.select(rows))
                if self.step >= self.config.max_steps:
                    return

    def _micro_batch_order(self, rows: Tensor) -> Tensor:
        """A mini-batch's rows in rollout order under ``train.shared_prompt``: rollouts are prompt-major, so
        micro-batches then hold whole prompt groups, cut as the behaviour pass cuts them (the step's gradient, a
        sum over micro-batches, does not depend on the cut)."""
        return rows.sort().values if self.config.train.shared_prompt else rows

    def optimizer_step(self, mini_batch: RolloutBatch) -> dict[str, float]:
        """Objective (and value loss) -> backward over micro-batches -> clip -> optimizer step."""
        acc, cfg = self.accelerator, self.config.train
        # the objective's token filters (e.g. mask_truncated) may take tokens out of the denominators too
        mask = self.objective.count_mask(mini_batch.completion_mask, mini_batch.truncated)  # [b, T]
        prompt_tokens, prompts = prompt_counts(mask, mini_batch.group_ids)  # [b] and agg=prompt_mean's local P
        counts = torch.tensor([mask.sum(), (mask.sum(-1) > 0).sum(), mini_batch.completion_mask.sum(), prompts],
                              dtype=torch.float64, device=acc.device)
        num_tokens, num_sequences, value_tokens, num_prompts = all_reduce(acc, counts, "sum").clamp_min(1)
        train_policy = self.critic is None or self.step >= self.config.critic.warmup_steps
        policy_metrics, critic_metrics = MetricAccumulator(), MetricAccumulator("critic", "critic/value_loss")
        chunks = split_indices(len(mini_batch), cfg.micro_batch_size)
        step_stats = self.step_statistics(mini_batch, chunks, num_tokens, num_sequences) if train_policy else None
        for i, idx in enumerate(chunks):
            micro = mini_batch.select(idx)
            weight = float(micro.completion_mask.sum())
            with self.layout.no_sync((self.model, self.critic), last=i == len(chunks) - 1):
                # DDP averages gradients over processes; each loss is already a share of the global mean.
                if train_policy:
                    batch, entropy = self.policy_batch(micro, num_tokens, num_sequences)
                    batch.group_ids, batch.num_prompts = micro.group_ids, num_prompts
                    batch.prompt_tokens = None if prompt_tokens is None else prompt_tokens[idx.to(mask.device)]
                    batch.step_stats = rows_of(step_stats, idx, len(mini_batch)) if step_stats else \
                        own_step_statistics(self.objective, batch, len(chunks) == 1, ProcessReducer(acc))
                    out = self.objective(batch)
                    if self.telemetry is not None:
                        self.telemetry.observe(out.loss, batch, self.objective)
                    loss = out.loss
                    if self.entropy_bonus.enabled:
                        loss = loss + self.entropy_bonus.loss(entropy, *self.objective.bonus_mask(batch))
                    self.release_memory()
                    (self.in_backward or self.layout).backward(self.model, loss * acc.num_processes)
                    policy_metrics.add(out, weight)
                if self.critic is not None:
                    value_out = value_loss(self.critic, micro, value_tokens, self.config.critic.value_clip)
                    self.layout.backward(self.critic, value_out.loss * self.config.critic.vf_coef * acc.num_processes)
                    critic_metrics.add(value_out, weight)
        result = {**policy_metrics.reduce(acc), **critic_metrics.reduce(acc)} if self.critic else policy_metrics.reduce(acc)
        if train_policy and self.entropy_bonus.enabled:
            step_entropy = all_reduce(acc, self.entropy_bonus.local_sum(acc.device), "sum")
            result.update(self.entropy_bonus.end_step(float(step_entropy)))
        if train_policy and self.telemetry is not None:
            result.update(self.telemetry.end_step(ProcessReducer(acc)))
        if train_policy:  # the objective's state (adaptive kl_coef, BAPO's bounds) moves once per step
            end_objective_step(self.objective, result, num_sequences)
        self.step += 1
        result.update(self.gradient_step.apply(self.step, self.model, self.critic, train_policy,
                                               policy_metrics.loss, critic_metrics.loss))
        result["optim/lr"] = self.scheduler.get_last_lr()[0]
        result.update(self.behaviour.end_step())
        return result

    def step_statistics(self, mini_batch: RolloutBatch, chunks: list[Tensor], num_tokens: Tensor,
                        num_sequences: Tensor) -> dict[str, Tensor] | None:
        """The objective's statistics of the whole optimizer step (rlclip/step_statistics.py)."""
        if not self.objective.step_needs or len(chunks) == 1:  # one micro-batch: its own forward gives them
            return None
        with torch.no_grad():
            parts = [self._logprobs(self.model, mini_batch.select(idx),
                                    need_entropy="entropy" in self.objective.step_needs) for idx in chunks]
        return whole_step_statistics(self.objective, mini_batch, parts, partial(self._proximal, correct=False),
                                     num_tokens, num_sequences, ProcessReducer(self.accelerator))

    def _proximal(self, micro: RolloutBatch, logprobs: Tensor, correct: bool = True) -> Tensor:
        """log pi_prox ``[b, T]`` of ``micro``: recorded, A-3PO's interpolation (``correct``: and its IS weights),
        or (on-policy) ``logprobs`` detached."""
        if self.behaviour.proximal == "loglinear":
            return self.behaviour.loglinear(micro, logprobs, self.rollout_index, correct)
        return micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach()

    def policy_batch(self, micro: RolloutBatch, num_tokens: Tensor,
                     num_sequences: Tensor) -> tuple[PolicyBatch, Tensor | None]:
        """One forward pass: what the objective declared it needs, and nothing else.

        Also returns the entropy with its gradient when the entropy bonus is on (the batch's is detached).
        """
        needs, bonus = self.objective.needs, self.entropy_bonus.enabled
        need_entropy = "entropy" in needs or "entropy" in self.objective.step_needs or bonus
        stats = self._logprobs(self.model, micro, need_entropy=need_entropy, with_support="support" in needs,
                               entropy_grad=bonus)
        entropy = stats.get("entropy")  # [b, T], with grad when bonus
        logprobs = stats["logprobs"]  # [b, T]
        old = self._proximal(micro, logprobs)  # [b, T]
        batch = PolicyBatch(
            logprobs=logprobs, old_logprobs=old, advantages=micro.advantages,
            mask=micro.completion_mask.to(logprobs.dtype), ref_logprobs=micro.ref_logprobs,
            entropy=None if entropy is None else entropy.detach(), support_logprobs=stats.get("support_logprobs"),
            old_support_logprobs=stats.get("old_support_logprobs"), support_mask=stats.get("support_mask"),
            num_tokens=num_tokens, num_sequences=num_sequences, truncated=micro.truncated,
            token_weights=micro.is_weights,
        )
        return batch, entropy

    # ------------------------------------------------------------------ outputs
    def save_model(self, directory: Path, model: torch.nn.Module | None = None) -> None:
        """``save_pretrained`` (safetensors) of the policy (the adapter alone with LoRA) and tokenizer."""
        acc = self.accelerator
        model = model if model is not None else self.model
        acc.wait_for_everyone()
        state_dict = self.layout.state_dict(model)  # gathered: collective under ZeRO-3 and FSDP
        with quiet_saving():
            acc.unwrap_model(model).save_pretrained(directory, is_main_process=acc.is_main_process,
                                                    state_dict=state_dict, safe_serialization=True,
                                                    save_function=acc.save)
        if acc.is_main_process:
            self.tokenizer.save_pretrained(directory)
