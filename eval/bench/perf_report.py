"""Assemble eval/results/perf.md from the benchmark outputs (run by ``make bench``).

Reads ``step_vs_trl.md`` (its JSON line is checked against the issue's
targets), ``objectives.md``, ``profile.md`` and the hand-written
``perf_notes.md`` (what was changed and why) from eval/results/, and adds the
machine the numbers come from.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "eval" / "results"
TARGETS = {f"{gc}{key}": target for gc in ("", "nogc_") for key, target in (
    ("time_ratio", 0.7), ("rss_ratio", 0.75), ("clip_time_ratio", 0.7), ("clip_rss_ratio", 0.75),
    ("lora_time_ratio", 0.7), ("lora_rss_ratio", 0.6))}
TARGETS["floor_ratio"] = 1.5
OBJECTIVE_TARGET = 1.10
"""Issues 11 and 29: the full fine-tuning targets apply to both full modes, and all of them to both gradient
checkpointing settings (``nogc_``: off); ``floor_ratio`` is rlclip's step over the machine's floor."""


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    versions = subprocess.run([sys.executable, "-c", "import torch, transformers, trl; print(torch.__version__, "
                               "transformers.__version__, trl.__version__)"], capture_output=True, text=True).stdout.split()
    torch_v, tf_v, trl_v = (versions + ["?"] * 3)[:3]
    return (f"{date.today()}: {os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, no GPU; Python {platform.python_version()}, "
            f"torch {torch_v}, transformers {tf_v}, TRL {trl_v}.")


def verdict(text: str) -> str:
    match = re.search(r"```json\n(.*?)\n```", text, re.S)
    if not match:
        return "No JSON line found in step_vs_trl.md."
    result = json.loads(match.group(1))
    lines = ["| ratio (rlclip / TRL) | measured | target | met |", "|---|---|---|---|"]
    for key, target in TARGETS.items():
        if key in result:
            value = result[key]
            lines.append(f"| {key} | {value:.3f} | <= {target} | {'yes' if value <= target else f'no, by {value - target:.3f}'} |")
    if "shared_floor_ratio" in result:
        lines.append(f"| shared_floor_ratio | {result['shared_floor_ratio']:.3f} | (reported) | |")
    lines.extend(objective_rows())
    lines.append("")
    lines.append("`time_ratio`, `rss_ratio`: mode `full` (no gradient clipping on either side; rlclip steps each "
                 "parameter in the backward). `clip_*`: mode `full_clip` (clipping at 1.0 on both sides; rlclip's "
                 "ordinary step). `lora_*`: LoRA, clipping at 1.0. `nogc_*`: the same with gradient checkpointing "
                 "off on both sides (rlclip's default). `floor_ratio`: rlclip's full fine-tuning step, checkpointing "
                 "off, over the floor of eval/bench/floor.py; `shared_floor_ratio`: the same step over the floor that "
                 "counts each prompt once per group (floor.py's `shared_floor_s`). `mu2kl_*` (mu = 2 with a KL "
                 "reference) is reported without a target. troll and archer: their step over ratio_clip's in "
                 "objectives.md.")
    return "\n".join(lines)


def objective_rows(limit: float = OBJECTIVE_TARGET) -> list[str]:
    """The troll and archer rows of objectives.md (step time over ratio_clip's) against the 1.10 target."""
    path = RESULTS / "objectives.md"
    rows = []
    for name in ("troll", "archer"):
        match = re.search(rf"^\| {name} \|[^|]*\|[^|]*\| ([0-9.]+) \|", path.read_text() if path.is_file() else "", re.M)
        if match:
            value = float(match.group(1))
            rows.append(f"| {name} step / ratio_clip's | {value:.3f} | <= {limit} | "
                        f"{'yes' if value <= limit else f'no, by {value - limit:.3f}'} |")
    return rows


def section(name: str) -> str:
    path = RESULTS / name
    if not path.is_file():
        return f"({name} is missing: run the benchmark that writes it.)"
    text = path.read_text()
    return re.sub(r"^# .*\n", "", text, count=1).strip()  # drop the file's own title


def main() -> int:
    step = (RESULTS / "step_vs_trl.md").read_text() if (RESULTS / "step_vs_trl.md").is_file() else ""
    parts = [
        "# Performance: rlclip against TRL, objectives against ratio_clip, one step profiled",
        f"Machine: {machine()}",
        "Commands (`make bench` runs the first three, then this file is rebuilt by `eval/bench/perf_report.py`):\n\n"
        "```\npython eval/bench/step_vs_trl.py --output eval/results/step_vs_trl.md\n"
        "python eval/bench/objectives.py\npython eval/bench/profile_step.py --clip\n```",
        "## Targets\n\n" + verdict(step),
        "## rlclip vs TRL GRPOTrainer\n\n" + section("step_vs_trl.md"),
        "## Objectives vs ratio_clip\n\n" + section("objectives.md"),
        "## One step, phase by phase\n\n" + section("profile.md"),
        "## What was changed, and what is left\n\n" + section("perf_notes.md"),
    ]
    (RESULTS / "perf.md").write_text("\n\n".join(parts) + "\n")
    print(RESULTS / "perf.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
