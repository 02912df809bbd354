"""What a run says on the console: the start banner, the end summary, and warnings that save a wasted run.

Everything here returns text or decides when to speak; the trainer prints it
on the main process only (``Trainer._say``), so a multi-process run says each
thing once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def start_banner(trainer: Any) -> str:
    """Model, objective, data size, steps, processes, output dir and the step the run starts from."""
    cfg, acc = trainer.config, trainer.accelerator
    model = cfg.model.name_or_path + (f" ({cfg.model.gguf_file})" if cfg.model.gguf_file else "")
    if cfg.lora.enabled:
        model += f" + LoRA r={cfg.lora.r}"
    mode = "PPO (critic, GAE)" if trainer.critic is not None else f"GRPO ({cfg.advantage.name} advantages)"
    r, t = cfg.rollout, cfg.train
    start = f"resuming at step {trainer.step}" if trainer.step else "from step 0"
    extras = ", entropy bonus" if trainer.entropy_bonus.enabled else ""
    return (f"start: {model}; objective {trainer.objective!r}{extras}; {mode}; {len(trainer.records)} prompts "
            f"({cfg.data.name}); {cfg.max_steps} steps, {r.prompts_per_step} prompts x {r.group_size} completions "
            f"per rollout and process, {acc.num_processes} process(es), mu={t.num_iterations}, "
            f"{t.mini_batches} mini-batch(es); output {cfg.output_dir}; {start}")


def run_summary(history: list[dict], output_dir: str, seconds: float, report_to: str = "none") -> str:
    """The end-of-run lines: steps and time, last and best mean reward (and eval accuracy), where the outputs are."""
    last = history[-1]
    best = max(history, key=lambda m: m["reward/mean"])
    lines = [f"done: {len(history)} steps (to step {last['step']}) in {seconds:.0f} s; reward/mean "
             f"{last['reward/mean']:.4f} at the last step, best {best['reward/mean']:.4f} at step {best['step']}"]
    evals = [m for m in history if m.get("eval/accuracy") is not None]
    if evals:
        top = max(evals, key=lambda m: m["eval/accuracy"])
        lines.append(f"eval/accuracy {evals[-1]['eval/accuracy']:.4f} at step {evals[-1]['step']}, "
                     f"best {top['eval/accuracy']:.4f} at step {top['step']}")
    lines.append(f"model: {output_dir}; metrics: {output_dir}/metrics.jsonl; "
                 f"plots: rlclip report {output_dir} --out {output_dir}/report")
    if report_to == "tensorboard":
        lines.append(f"curves: tensorboard --logdir {output_dir}")
    return "\n".join(lines)


class ZeroAdvantageWatch:
    """Warns once per streak when ``patience`` rollouts in a row give zero advantage everywhere.

    Such rollouts train nothing (every policy-gradient weight is 0), so a run
    that keeps producing them only burns time. The usual causes are named.
    """

    def __init__(self, say: Callable[[str], None], temperature: float, patience: int = 3) -> None:
        self.say, self.temperature, self.patience = say, temperature, patience
        self.streak = 0

    def observe(self, all_zero: bool) -> None:
        self.streak = self.streak + 1 if all_zero else 0
        if self.streak != self.patience:
            return
        if self.temperature == 0:
            cause = ("rollout.temperature=0 samples the same completion for every member of a group, so group "
                     "baselines cancel; set rollout.temperature > 0 (e.g. 1.0)")
        else:
            cause = ("every group's completions got equal rewards: a constant reward function, rewards all None, "
                     "or prompts too hard or too easy for the model; check reward.funcs and the data")
        self.say(f"the last {self.streak} rollouts had zero advantage on every completion, so they changed "
                 f"nothing; {cause}")
