"""The off-policy experiment: one objective family under controlled staleness, with every correction at hand.

For each staleness k (default 0, 2, 4) it runs the offline demo's comparison
(``rlclip.demo.run``: SmolLM2-135M-Instruct + LoRA + GRPO on one-digit
additions, 60 trained and 40 held out, the base model scored once) with the
recipe ``recipes/offpolicy/demo_staleness.yaml`` at ``rollout.staleness: k``,
for the specs below x the seeds, then writes ``--report`` (default
``eval/results/offpolicy.md``): held-out accuracy per spec and staleness with
95% bootstrap intervals, each spec's paired difference against the uncorrected
``ratio_clip`` at the same staleness (same problems and seeds), and a figure.
Finished runs are kept: rerunning resumes the sweep.

    python eval/offpolicy/run.py [--staleness 0,2,4] [--seeds 0,1,2] [--specs NAME,...] [--out runs/offpolicy]
                                 [--report eval/results/offpolicy.md] [--section.key VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/offpolicy/demo_staleness.yaml"
BASELINE = "ratio_clip"
# At staleness 0 (hf backend, recompute) the sampler is the current policy and no correction applies: these
# specs are the baseline's runs bit for bit, so they are not run again there.
SAME_AS_BASELINE_AT_0 = ("decoupled_ppo", "icepop")
SPECS = {  # short name -> ``rlclip compare`` spec (the recipe sets rollout.is_mode: none, proximal: recompute)
    "ratio_clip": "ratio_clip",  # no correction: the ratio is against pi_prox, mu is ignored
    "decoupled_ppo": "ratio_clip:rollout.is_mode=token_truncate",  # AReaL: w = min(pi_prox / mu, 3)
    "icepop": "ratio_clip:rollout.is_mode=token_mask:rollout.is_floor=0.5:rollout.is_cap=5.0",  # band [0.5, 5]
    "m2po": "ratio_clip:m2_threshold=0.04:rollout.proximal=bypass",  # M2 of log pi_theta - log mu
    "dppo": "dppo",  # Binary-TV, verl's thresholds
    "cispo": "cispo",
    "troll": "troll",
}


def run_sweeps(staleness: list[int], specs: list[str], seeds: list[int], out: Path, overrides: list[str]) -> None:
    from rlclip.config import load_config, parse_overrides
    from rlclip.demo import run

    for k in staleness:
        config = load_config(RECIPE, [*parse_overrides(overrides), f"rollout.staleness={k}",
                                      f"output_dir={out / f'staleness-{k}'}"])
        start = time.perf_counter()
        todo = [name for name in specs if k or name not in SAME_AS_BASELINE_AT_0]
        _, seconds, stopped_by = run(config, [SPECS[name] for name in todo], seeds, num_test=40)
        if stopped_by:
            raise SystemExit(f"stopped by {stopped_by}; rerun the same command to resume")
        print(f"[offpolicy] staleness {k}: {seconds:.0f} s ({time.perf_counter() - start:.0f} s)", flush=True)


def collect(staleness: list[int], specs: list[str], out: Path) -> dict:
    """``{k: {"objectives": {name: row}, "paired": {name: row vs the baseline}, "base": accuracy}}``."""
    from rlclip.compare import parse_objectives, spec_label

    labels = {spec_label(*parse_objectives(SPECS[name])[0]): name for name in specs}
    table = {}
    for k in staleness:
        data = json.loads((out / f"staleness-{k}" / "compare.json").read_text())
        rows = {labels[row["label"]]: row for row in data["objectives"] if row["label"] in labels}
        paired = {}
        for row in data.get("paired", []):
            a, b = labels.get(row["a"]), labels.get(row["b"])
            if b == BASELINE and a:
                paired[a] = row
            elif a == BASELINE and b:
                paired[b] = {**row, "diff_mean": -row["diff_mean"], "ci_low": -row["ci_high"],
                             "ci_high": -row["ci_low"]}
        table[k] = {"objectives": rows, "paired": paired, "base": data.get("base_accuracy")}
    return table


def figure(table: dict, specs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ks = sorted(table)
    for i, name in enumerate(specs):
        rows = [table[k]["objectives"].get(name) or (table[k]["objectives"].get(BASELINE)
                                                     if k == 0 and name in SAME_AS_BASELINE_AT_0 else None)
                for k in ks]
        xs = [k + (i - len(specs) / 2) * 0.06 for k, r in zip(ks, rows) if r]
        means = [r["mean"] for r in rows if r]
        errors = [[r["mean"] - r["low"] for r in rows if r], [r["high"] - r["mean"] for r in rows if r]]
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=name)
    base = next((table[k]["base"] for k in ks if table[k]["base"] is not None), None)
    if base is not None:
        ax.axhline(base, color="grey", linestyle=":", label="base model")
    ax.set_xlabel("staleness k (policy versions between sampler and update)")
    ax.set_ylabel("held-out accuracy (95% bootstrap interval)")
    ax.set_xticks(ks)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(table: dict, specs: list[str], seeds: list[int], image: str) -> str:
    ks = sorted(table)
    lines = ["| spec | " + " | ".join(f"staleness {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name in specs:
        cells = []
        for k in ks:
            r = table[k]["objectives"].get(name)
            same = k == 0 and name in SAME_AS_BASELINE_AT_0
            cells.append(f"{r['mean']:.1%} [{r['low']:.1%}, {r['high']:.1%}]" if r else
                         f"= `{BASELINE}`" if same else "-")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", f"Paired difference against `{BASELINE}` at the same staleness (same {len(seeds)} seeds and 40 "
              "held-out problems; bootstrap of the difference, percentage points):", "",
              "| spec | " + " | ".join(f"staleness {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name in specs:
        if name == BASELINE:
            continue
        cells = []
        for k in ks:
            r = table[k]["paired"].get(name)
            if r is None and k == 0 and name in SAME_AS_BASELINE_AT_0:
                cells.append("0 (same runs)")
                continue
            cells.append(f"{100 * r['diff_mean']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
                         + (" *" if r["ci_low"] > 0 or r["ci_high"] < 0 else "") if r else "-")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "`*`: the interval excludes 0. At staleness 0 the sampler is the current policy, so the "
              f"corrections of {', '.join(f'`{n}`' for n in SAME_AS_BASELINE_AT_0)} do nothing: those runs are "
              f"`{BASELINE}`'s, bit for bit.", "", f"![held-out accuracy against staleness]({image})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--staleness", default="0,2,4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--specs", default=",".join(SPECS), help=f"a subset of {', '.join(SPECS)}")
    parser.add_argument("--out", default=str(ROOT / "runs/offpolicy"))
    parser.add_argument("--report", default=str(ROOT / "eval/results/offpolicy_tables.md"))
    parser.add_argument("--collect-only", action="store_true", help="only rewrite the report from finished sweeps")
    args, overrides = parser.parse_known_args(argv)
    staleness = [int(k) for k in args.staleness.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    specs = [s for s in args.specs.split(",") if s]
    unknown = [s for s in specs if s not in SPECS]
    if unknown:
        print(f"run.py: error: unknown spec {unknown[0]!r}; choose from {', '.join(SPECS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not args.collect_only:
        run_sweeps(staleness, specs, seeds, out, overrides)
    table = collect(staleness, specs, out)
    report = Path(args.report)
    image = report.with_suffix(".png")
    figure(table, specs, image)
    report.write_text(markdown(table, specs, seeds, image.name) + "\n")
    (out / "offpolicy.json").write_text(json.dumps({str(k): v for k, v in table.items()}, indent=1))
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
