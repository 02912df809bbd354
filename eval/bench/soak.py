"""Soak test: does a long tiny run leak memory, file descriptors or disk?

    python eval/bench/soak.py [--steps 300] [--output-dir runs/soak] [--warmup 50] [--report PATH] [--section.key VALUE ...]

Runs the smoke recipe (``recipes/smoke/tiny.yaml``: a tiny random Llama built on the fly, CPU) in a child
process, ``python -m rlclip train --config recipes/smoke/tiny.yaml --max_steps STEPS --save_steps 50
--keep_last 2 --output_dir DIR --overwrite_output_dir true --logging.progress_bar false``, with the
``rlclip`` package of the checkout this file lives in (PYTHONPATH). While it trains, the parent polls every
``--poll`` seconds and, each time ``metrics.jsonl`` has gained lines (one line = one optimizer step),
records one sample: the step, the RSS of the child and its descendants (``VmRSS`` in /proc/PID/status,
summed), their open file descriptors (entries of /proc/PID/fd), the output directory's size in bytes
(without ``metrics.jsonl``), the bytes of ``metrics.jsonl``, and the checkpoints present. The samples go to
``DIR/soak_samples.jsonl`` once the child has exited.

Analysis (``analyse``) uses the samples after the warm-up (step > ``--warmup``); growth per 100 steps is
the least-squares slope against the step, times 100:

- RSS: also as a percentage of the mean RSS after warm-up; target < 2% per 100 steps.
- fds: target flat (|growth| < 0.5 fd per 100 steps).
- directory: ``keep_last`` prunes, so the size saw-tooths between saves; it is compared at equal phases:
  the first sample at which each checkpoint is the newest one, no save or prune is under way and
  ``keep_last`` checkpoints exist (the checkpoint at the last step is left out, because the final model
  is saved next to it). Target flat (|growth| < 1 KiB per 100 steps).
- ``metrics.jsonl`` grows by one line per step by design: its bytes per step are reported on their own
  and are not part of the flat check.

The last line printed is JSON with ``rss_growth_pct_per_100``, ``fd_growth_per_100``,
``dir_growth_bytes_per_100``, ``metrics_bytes_per_step`` and the verdicts. No network is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/smoke/tiny.yaml"
METRICS = "metrics.jsonl"
SAMPLES = "soak_samples.jsonl"
RSS_TARGET_PCT = 2.0
FD_TOL = 0.5
DIR_TOL_BYTES = 1024.0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def listing(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def dir_state(path: Path) -> dict[str, Any]:
    """Bytes of everything under ``path`` but metrics.jsonl and the soak's own files; the checkpoints.

    ``partial`` is true while a save is under way (a hidden ``.partial-`` directory) or when the top-level
    listing changed during the walk (a checkpoint renamed into place or pruned meanwhile)."""
    size, skip, before = 0, {METRICS, SAMPLES}, listing(path)
    for parent, _dirs, files in os.walk(path):
        for name in files:
            if parent == str(path) and name in skip:
                continue
            try:
                size += os.lstat(os.path.join(parent, name)).st_size
            except OSError:  # pruned while we walked
                pass
    names = listing(path)
    ckpts = sorted(int(n[11:]) for n in names if n.startswith("checkpoint-") and n[11:].isdigit())
    busy = names != before or any(n.startswith(".partial-") for n in names)
    return {"dir_bytes": size, "checkpoints": ckpts, "partial": busy}


def metrics_state(path: Path) -> tuple[int, int]:
    """(complete lines, bytes) of metrics.jsonl."""
    try:
        data = (path / METRICS).read_bytes()
    except OSError:
        return 0, 0
    return data.count(b"\n"), len(data)


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs (None with fewer than two distinct xs)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def phase_samples(samples: list[dict[str, Any]], keep_last: int | None, last_step: int) -> list[dict[str, Any]]:
    """The first sample at which each checkpoint is the newest, complete, with keep_last of them present."""
    seen: set[int] = set()
    out = []
    for s in samples:
        ckpts = s["checkpoints"]
        if not ckpts or s["partial"] or ckpts[-1] in seen or ckpts[-1] >= last_step:
            continue
        if keep_last is not None and len(ckpts) != keep_last:
            continue
        seen.add(ckpts[-1])
        out.append(s)
    return out


def analyse(samples: list[dict[str, Any]], warmup: int, keep_last: int | None = 2) -> dict[str, Any]:
    """Growth per 100 steps after the warm-up, and the verdicts (see the module docstring)."""
    post = [s for s in samples if s["step"] > warmup]
    steps = [float(s["step"]) for s in post]
    rss = [float(s["rss_bytes"]) for s in post]
    rss_slope = slope(steps, rss)
    mean_rss = sum(rss) / len(rss) if rss else 0.0
    fd_slope = slope(steps, [float(s["fds"]) for s in post])
    metrics_slope = slope(steps, [float(s["metrics_bytes"]) for s in post])
    last_step = max((s["step"] for s in samples), default=0)
    phases = [s for s in phase_samples(samples, keep_last, last_step) if s["step"] > warmup]
    dir_slope = slope([float(s["step"]) for s in phases], [float(s["dir_bytes"]) for s in phases])

    def per100(value: float | None) -> float | None:
        return None if value is None else value * 100

    rss_pct = None if rss_slope is None or not mean_rss else rss_slope * 100 / mean_rss * 100
    fd_growth, dir_growth = per100(fd_slope), per100(dir_slope)
    verdict = {
        "rss_ok": None if rss_pct is None else rss_pct < RSS_TARGET_PCT,
        "fd_ok": None if fd_growth is None else abs(fd_growth) < FD_TOL,
        "dir_ok": None if dir_growth is None else abs(dir_growth) < DIR_TOL_BYTES,
    }
    checks = list(verdict.values())
    return {
        "samples": len(samples), "samples_after_warmup": len(post), "warmup": warmup,
        "rss_growth_pct_per_100": rss_pct, "rss_growth_bytes_per_100": per100(rss_slope),
        "rss_mean_after_warmup": mean_rss,
        "rss_first": samples[0]["rss_bytes"] if samples else None,
        "rss_at_warmup": post[0]["rss_bytes"] if post else None,
        "rss_last": samples[-1]["rss_bytes"] if samples else None,
        "rss_max": max((s["rss_bytes"] for s in samples), default=None),
        "fd_growth_per_100": fd_growth,
        "fd_min_after_warmup": min((s["fds"] for s in post), default=None),
        "fd_max_after_warmup": max((s["fds"] for s in post), default=None),
        "dir_growth_bytes_per_100": dir_growth,
        "dir_phases": [{"step": s["step"], "checkpoint": s["checkpoints"][-1], "dir_bytes": s["dir_bytes"]}
                       for s in phases],
        "metrics_bytes_per_step": metrics_slope,
        **verdict,
        "pass": all(checks) if all(c is not None for c in checks) else None,
    }


def run(steps: int, output_dir: Path, save_steps: int, keep_last: int, poll: float,
        extra: list[str] | None = None) -> dict[str, Any]:
    """Train in a child process and sample it; return the samples, the command and the run's facts."""
    if output_dir.exists() and (output_dir / SAMPLES).exists():
        shutil.rmtree(output_dir)  # a previous soak's directory: start from nothing
    cmd = [sys.executable, "-m", "rlclip", "train", "--config", RECIPE, "--max_steps", str(steps),
           "--save_steps", str(save_steps), "--keep_last", str(keep_last), "--output_dir", str(output_dir),
           "--overwrite_output_dir", "true", "--logging.progress_bar", "false", *(extra or [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # as tests/conftest.py: 2 shared cores
    log_path = Path(str(output_dir) + ".child.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        last_lines = 0
        while child.poll() is None:
            lines, mbytes = metrics_state(output_dir)
            last_lines = min(last_lines, lines)  # a stale metrics.jsonl was cleared by the child
            if lines > last_lines:
                pids = descendants(child.pid)
                rss, fds = rss_bytes(pids), fd_count(pids)
                if rss:  # still alive when sampled
                    samples.append({"step": lines, "t": round(time.monotonic() - start, 3), "rss_bytes": rss,
                                    "fds": fds, "processes": len(pids), "metrics_bytes": mbytes,
                                    **dir_state(output_dir)})
                last_lines = lines
            time.sleep(poll)
    seconds = time.monotonic() - start
    final = dir_state(output_dir)
    with open(output_dir / SAMPLES, "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    return {"samples": samples, "returncode": child.returncode, "seconds": seconds, "final": final,
            "command": " ".join(cmd[1:]).replace(str(ROOT) + os.sep, ""), "log": str(log_path),
            "metrics_lines": metrics_state(output_dir)[0]}


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def num(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def report_md(facts: dict[str, Any], result: dict[str, Any]) -> str:
    """A short markdown table of the numbers (the surrounding prose is written by hand)."""
    yes = {True: "yes", False: "**no**", None: "n/a"}
    phases = ", ".join(f"{p['checkpoint']}: {p['dir_bytes']}" for p in result["dir_phases"]) or "none"
    rows = [
        ("RSS first sample / at warm-up end / last / max", f"{mib(result['rss_first'])} / "
         f"{mib(result['rss_at_warmup'])} / {mib(result['rss_last'])} / {mib(result['rss_max'])}"),
        ("RSS growth per 100 steps after warm-up", f"{num(result['rss_growth_pct_per_100'])}% "
         f"({mib(result['rss_growth_bytes_per_100'])}); target < {RSS_TARGET_PCT}%: "
         f"{yes[result['rss_ok']]}"),
        ("open fds after warm-up (min-max), growth per 100 steps",
         f"{result['fd_min_after_warmup']}-{result['fd_max_after_warmup']}, "
         f"{num(result['fd_growth_per_100'])}; flat: {yes[result['fd_ok']]}"),
        ("directory bytes (no metrics.jsonl) just after each save, by checkpoint", phases),
        ("directory growth per 100 steps at equal phases", f"{num(result['dir_growth_bytes_per_100'], '.1f')} "
         f"bytes; flat: {yes[result['dir_ok']]}"),
        ("metrics.jsonl bytes per step (linear by design, not in the flat check)",
         num(result["metrics_bytes_per_step"], ".1f")),
        ("checkpoints at the end", ", ".join(f"checkpoint-{n}" for n in facts["final"]["checkpoints"])),
        ("directory bytes at the end (with the final model, no metrics.jsonl)", str(facts["final"]["dir_bytes"])),
        ("steps logged / samples / samples after warm-up",
         f"{facts['metrics_lines']} / {result['samples']} / {result['samples_after_warmup']}"),
        ("wall time of the child (exit status)", f"{facts['seconds']:.0f} s ({facts['returncode']})"),
    ]
    lines = [f"`{facts['command']}`", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines.append(f"\nVerdict: {'PASS' if result['pass'] else 'FAIL' if result['pass'] is False else 'n/a'}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs/soak")
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the growth fits")
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between polls of metrics.jsonl")
    parser.add_argument("--report", type=Path, default=None, help="also write the numbers here (markdown)")
    args, extra = parser.parse_known_args()  # the rest: recipe overrides, e.g. --rollout.staleness 2
    facts = run(args.steps, args.output_dir.resolve(), args.save_steps, args.keep_last, args.poll, extra)
    result = analyse(facts["samples"], args.warmup, args.keep_last)
    table = report_md(facts, result)
    print(table)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(table)
    summary = {k: v for k, v in result.items() if k != "dir_phases"}
    print(json.dumps({**summary, "returncode": facts["returncode"], "seconds": round(facts["seconds"], 1),
                      "checkpoints_at_end": facts["final"]["checkpoints"]}))
    return 0 if facts["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
