"""``rlclip report RUN_DIR [RUN_DIR ...] --out DIR``: curves and a table that compare runs.

A run directory is one that holds ``metrics.jsonl`` (and ``config.yaml``, which
names the objective). A directory without one is searched one level down (the
demo's ``runs/demo`` holds one run per objective), and arguments may be globs
(``runs/demo/*``: files among the matches, such as report.md, are passed over).
Writes one PNG per quantity against step, every run overlaid and labelled by
its objective, and ``report.md`` with each run's objective, settings, final and
best values and links to the PNGs. Quantities no run logged are left out.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlclip.errors import ConfigError

PANELS: list[tuple[str, str, list[str]]] = [
    # file stem, title, keys (the first with a band key is drawn with +- band)
    ("reward", "mean reward (band: reward std)", ["reward/mean"]),
    ("eval_accuracy", "held-out accuracy", ["eval/accuracy"]),
    ("kl", "KL(old || new) and KL to the reference", ["trust/kl_old_new", "objective/kl_ref"]),
    ("entropy", "policy entropy", ["trust/entropy_mean", "entropy/mean"]),
    ("trust", "trust-region token fractions", ["trust/zeroed_frac", "trust/attenuated_frac",
                                                "trust/amplified_frac", "trust/reversed_frac"]),
    ("length", "completion length and truncated fraction", ["completions/mean_length",
                                                             "completions/truncated_frac"]),
    ("grad_norm", "gradient norm (before clipping)", ["optim/grad_norm"]),
]
BANDS = {"reward/mean": "reward/std"}
TABLE_KEYS = ["reward/mean", "eval/accuracy", "trust/zeroed_frac", "trust/kl_old_new"]


@dataclass
class Run:
    """One run's metrics rows and what its config says."""

    path: Path
    rows: list[dict[str, Any]]
    objective: str = "?"
    settings: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [float(p[1]) for p in points]


def find_runs(arguments: list[str]) -> list[Path]:
    """Run directories from paths and globs (a directory without metrics.jsonl: its subdirectories)."""
    found: list[Path] = []
    for argument in arguments:
        matches = sorted(glob.glob(argument)) or [argument]
        runs = [run for match in map(Path, matches) for run in _runs_at(match)]
        # a file among the arguments (the shell's expansion of runs/demo/* includes report.md) is passed over
        if not runs and not all(Path(m).is_file() for m in matches):
            raise ConfigError(f"{argument}: no metrics.jsonl there or in its subdirectories; pass a run's "
                              "output_dir (or a directory of runs, or a glob)")
        found.extend(runs)
    if not found:
        raise ConfigError(f"no run among {' '.join(arguments)}: pass a run's output_dir (a directory with "
                          "metrics.jsonl), a directory of runs, or a glob")
    return list(dict.fromkeys(found))


def _runs_at(path: Path) -> list[Path]:
    """``path`` if it is a run, else the runs one level below it (none for a file such as a glob's report.md)."""
    if (path / "metrics.jsonl").is_file():
        return [path]
    return sorted(p.parent for p in path.glob("*/metrics.jsonl")) if path.is_dir() else []


def load_run(path: Path) -> Run:
    rows = []
    for number, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{path / 'metrics.jsonl'} line {number} is not JSON; the run's log is "
                                  "damaged (a crash mid-write?): delete that line") from None
    run = Run(path, rows)
    config_file = path / "config.yaml"
    if config_file.is_file():
        import yaml

        objective = dict((yaml.safe_load(config_file.read_text()) or {}).get("objective") or {})
        run.objective = str(objective.pop("name", "?"))
        run.settings = objective
    return run


def label_runs(runs: list[Run]) -> None:
    """Label by objective; add the directory name where two runs share one."""
    names = [r.objective for r in runs]
    for run in runs:
        shared = names.count(run.objective) > 1
        run.label = (run.objective if not shared else run.path.name if run.path.name.startswith(run.objective)
                     else f"{run.objective} ({run.path.name})")


def plot_panel(runs: list[Run], stem: str, title: str, keys: list[str], out: Path) -> str | None:
    """One PNG of ``keys`` against step for every run; None when no run has any of them."""
    present = [k for k in keys if any(run.series(k)[0] for run in runs)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for key, style in zip(present, styles):
            steps, values = run.series(key)
            if not steps:
                continue
            name = run.label if len(present) == 1 else f"{run.label}: {key}"
            ax.plot(steps, values, style, color=color, label=name, marker="o" if len(steps) < 30 else None,
                    markersize=3)
            if key in BANDS:
                band_steps, spread = run.series(BANDS[key])
                if band_steps == steps:
                    ax.fill_between(steps, [v - s for v, s in zip(values, spread)],
                                    [v + s for v, s in zip(values, spread)], color=color, alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, runs, present, styles)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")  # an outside legend is kept
    plt.close(fig)
    return path.name


def _legend(ax: Any, runs: list[Run], keys: list[str], styles: list[str]) -> None:
    """One entry per line while that stays readable; with several runs and several keys, one entry per run
    (its colour) and one per key (its line style), outside the axes (8 runs x 4 keys would be 32 entries)."""
    if len(keys) == 1 or len(runs) == 1:
        ax.legend(fontsize=7)
        return
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i % 10}", label=run.label) for i, run in enumerate(runs)]
    handles += [Line2D([], [], color="black", linestyle=style, label=key) for key, style in zip(keys, styles)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def summary_rows(runs: list[Run]) -> list[str]:
    head = "| run | objective | settings | steps |" + "".join(f" {k} last | best |" for k in TABLE_KEYS)
    lines = [head, "|" + "---|" * (4 + 2 * len(TABLE_KEYS))]
    for run in runs:
        cells = [run.label, run.objective, ", ".join(f"{k}={v}" for k, v in run.settings.items()) or "defaults",
                 str(run.rows[-1]["step"] if run.rows else 0)]
        for key in TABLE_KEYS:
            steps, values = run.series(key)
            best = (min if key.startswith("trust/") else max)(values) if values else None
            cells += [_fmt(values[-1] if values else None), _fmt(best)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(arguments: list[str], out: str | Path) -> Path:
    """Plots and report.md for the runs named by ``arguments`` under ``out``; returns report.md's path."""
    runs = [load_run(p) for p in find_runs(arguments)]
    label_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = [(title, plot_panel(runs, stem, title, keys, out)) for stem, title, keys in PANELS]
    lines = ["# rlclip report", "", "Runs: " + ", ".join(f"`{r.path}`" for r in runs), "",
             "Final (last logged) and best values; best is the maximum, or the minimum for `trust/` keys.", "",
             *summary_rows(runs), ""]
    for title, name in pictures:
        if name:
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
