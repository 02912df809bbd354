"""``model.compile`` against eager on step_vs_trl's shared workload (SmolLM2-135M-Instruct, 4 prompts x 4
completions x 32 tokens, full fine-tuning), each run in a fresh process, the settings alternating.

    python eval/bench/compile_speed.py [--rounds 2] [--steps 5] [--modes none,all] [--checkpointing]

Each run trains ``--steps`` optimizer steps (one rollout each) with rlclip's trainer and reads its
metrics.jsonl. Reported apart:

- ``compile_s``: torch's own count of the seconds spent compiling (``time/compile_s``, summed over the run),
  with a fresh, empty inductor cache per run (``TORCHINDUCTOR_CACHE_DIR``): the cold cost a first run pays;
- ``first_step_s``: the first step's wall time (compile included);
- steady state, the median over the steps after the first: ``rollout_s`` (generation with rlclip's decoding
  loop, reward, advantage) and ``train_s`` (the step's training pass: ``time/step_s - time/rollout_s``).

Writes a markdown section to eval/results/compile.md and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_vs_trl import ROOT, correct, records, rlclip_overrides, write_markdown  # noqa: E402

RESULTS = ROOT / "eval/results/compile.md"


def child(mode: str, steps: int, checkpointing: bool) -> dict:
    """One training run in this process; the per-step times from its metrics.jsonl."""
    from rlclip.config import load_config
    from rlclip.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix=f"bench-compile-{mode}-") as out:
        overrides = rlclip_overrides(out, steps, checkpointing) + [f"model.compile={mode}"]
        started = time.perf_counter()
        Trainer(load_config(None, overrides), reward_funcs=[correct], train_dataset=records()).train()
        total = time.perf_counter() - started
        lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steady = lines[1:]
    return {"mode": mode, "compile_s": sum(line.get("time/compile_s", 0.0) for line in lines),
            "compiled_steps": [line["step"] for line in lines if "time/compile_s" in line],
            "first_step_s": lines[0]["time/step_s"], "total_s": total,
            "rollout_s": statistics.median(line["time/rollout_s"] for line in steady),
            "train_s": statistics.median(line["time/step_s"] - line["time/rollout_s"] for line in steady),
            "steps_s": [line["time/step_s"] for line in lines]}


def fresh(mode: str, steps: int, checkpointing: bool) -> dict:
    """:func:`child` in a new interpreter with an empty inductor cache (cold compile)."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, __file__, "--child", mode, "--steps", str(steps)]
        command += ["--checkpointing"] if checkpointing else []
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"model.compile={mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(runs: list[dict], checkpointing: bool) -> str:
    """The markdown section: one row per run, then the medians per mode."""
    rows = ["| round | model.compile | compile_s | first step s | rollout s (steady) | train pass s (steady) |",
            "|---|---|---|---|---|---|"]
    for run in runs:
        rows.append(f"| {run['round']} | {run['mode']} | {run['compile_s']:.1f} | {run['first_step_s']:.1f} | "
                    f"{run['rollout_s']:.2f} | {run['train_s']:.2f} |")
    summary = summarise(runs)
    lines = [f"- {mode}: rollout {s['rollout_s']:.2f} s, train pass {s['train_s']:.2f} s, compile {s['compile_s']:.1f} s"
             for mode, s in summary["modes"].items()]
    return "\n".join([
        f"## {time.strftime('%Y-%m-%d %H:%M')}: SmolLM2-135M, 4 x 4 x 32 tokens, full fine-tuning, "
        f"gradient checkpointing {'on' if checkpointing else 'off'}",
        "", f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads: default. Steady state: median of the "
        "steps after the first. compile_s: torch's count, cold inductor cache.", "", *rows, "", "Medians:", *lines,
        "", f"Ratios compiled / eager: `{json.dumps(summary['ratios'])}`", ""])


def summarise(runs: list[dict]) -> dict:
    modes = {}
    for mode in dict.fromkeys(run["mode"] for run in runs):
        mine = [run for run in runs if run["mode"] == mode]
        modes[mode] = {key: statistics.median(run[key] for run in mine)
                       for key in ("compile_s", "first_step_s", "rollout_s", "train_s")}
    ratios = {}
    if "none" in modes:
        for mode, values in modes.items():
            if mode != "none":
                ratios[mode] = {key: round(values[key] / modes["none"][key], 3) for key in ("rollout_s", "train_s")}
    return {"modes": modes, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run, the first one warm-up")
    parser.add_argument("--modes", default="none,all", help="model.compile values, run in this order each round")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.checkpointing)))
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is the warm-up)")
    runs = []
    for index in range(args.rounds):
        modes = args.modes.split(",")
        for mode in modes if index % 2 == 0 else modes[::-1]:  # alternate the order between rounds
            runs.append({"round": index + 1, **fresh(mode, args.steps, args.checkpointing)})
            print(json.dumps(runs[-1]), file=sys.stderr)
    section = table(runs, args.checkpointing)
    previous = Path(args.out).read_text() if Path(args.out).exists() else "# model.compile: compiled against eager\n\n"
    write_markdown(args.out, previous.rstrip("\n") + "\n\n" + section)
    print(json.dumps(summarise(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
