"""``rlclip compare``: one recipe, several objectives and seeds, run one after another; intervals of held-out accuracy.

    rlclip compare --config RECIPE.yaml --objectives ratio_clip,archer,pspo,troll --seeds 0,1,2 \\
        [--output_dir DIR] [--overwrite] [--section.key VALUE ...]

Each (objective, seed) trains in ``DIR/<objective>-seed<k>`` with the recipe's
settings, then its final held-out accuracy is taken from the in-training
evaluation at the last step (``eval.*``; with ``eval.steps: 0`` the sweep
evaluates at the last step only). An objective spec may carry settings,
``troll:kl_bound=0.1:top_k=32``; otherwise the recipe's objective settings are
used when the name matches, and only the settings every objective shares
(``agg``, ``kl_coef``, ...) carry over to other objectives.

Resumable: a finished run (``compare_result.json``) is kept, an interrupted one
resumes from its newest checkpoint (Ctrl-C saves one), a run that died before
its first checkpoint starts again. Under ``accelerate launch`` every run uses
all processes. At the end ``DIR/report.md`` holds, per objective, the mean
final accuracy with a 95% bootstrap interval that resamples seeds and, within
each seed, the held-out problems (so few problems give honestly wide
intervals), says which intervals overlap, then the paired differences between
objectives on the same problems and seeds (``rlclip.bootstrap``), and has the
curves of ``rlclip report``.
"""

from __future__ import annotations

import copy
import gc
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlclip.bootstrap import BOOTSTRAP_SAMPLES, bootstrap_interval, paired_comparisons
from rlclip.errors import ConfigError

RESULT_NAME = "compare_result.json"
IGNORED_KEYS = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")
"""Config fields that may differ between a run's first start and its resumption."""


@dataclass
class PlannedRun:
    """One cell of the sweep: an objective spec (name and settings) at one seed, and its directory."""

    label: str
    objective: dict[str, Any]
    seed: int
    directory: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    """Other sections' settings of this spec (``rollout.is_mode=token_truncate``), dotted."""


def parse_objectives(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``"ratio_clip,troll:kl_bound=0.1"`` -> ``[("ratio_clip", {}), ("troll", {"kl_bound": 0.1})]``.

    A dotted key sets another section for that spec's runs (``ratio_clip:rollout.is_mode=token_truncate``):
    one objective under several rollout corrections is several specs."""
    import yaml

    specs = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        name, *pairs = spec.split(":")
        settings = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ConfigError(f"--objectives: {pair!r} in {spec!r} is not key=value; write e.g. "
                                  "troll:kl_bound=0.1:top_k=32")
            settings[key.strip()] = yaml.safe_load(value)
        specs.append((name.strip(), settings))
    if not specs:
        raise ConfigError("--objectives is empty; name at least one, e.g. --objectives ratio_clip,troll")
    labels = [spec_label(n, s) for n, s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--objectives names {', '.join(sorted({x for x in labels if labels.count(x) > 1}))} "
                          "twice; list each objective spec once")
    return specs


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must name at least one seed, each once, e.g. --seeds 0,1,2")
    return seeds


def spec_label(name: str, settings: dict[str, Any]) -> str:
    """A directory-safe label: the name, then ``key=value`` pairs joined by ``_``."""
    text = "_".join([name] + [f"{k}={v}" for k, v in settings.items()])
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)


def objective_settings(recipe_objective: dict[str, Any], name: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The objective section of one run: the recipe's settings if it names the same objective, else only the
    settings every objective shares; then the spec's own settings (its dotted keys are not the objective's)."""
    from rlclip.objectives import Objective
    from rlclip.objectives.base import objective_parameters

    recipe = dict(recipe_objective)
    recipe_name = recipe.pop("name", None)
    shared = set(objective_parameters(Objective))
    kept = recipe if recipe_name == name else {k: v for k, v in recipe.items() if k in shared}
    return {"name": name, **kept, **{k: v for k, v in extra.items() if "." not in k}}


def spec_overrides(extra: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys of a spec: settings of other sections for its runs."""
    return {k: v for k, v in extra.items() if "." in k}


def plan(config: Any, specs: list[tuple[str, dict[str, Any]]], seeds: list[int]) -> list[PlannedRun]:
    out = Path(config.output_dir)
    return [PlannedRun(spec_label(name, extra), objective_settings(config.objective, name, extra), seed,
                       out / f"{spec_label(name, extra)}-seed{seed}", spec_overrides(extra))
            for name, extra in specs for seed in seeds]


def run_config(config: Any, run: PlannedRun) -> Any:
    """The recipe with this run's objective, seed and directory; evaluation at least at the last step."""
    cfg = copy.deepcopy(config)
    for key, value in run.overrides.items():
        apply_override(cfg, key, value)
    cfg.objective, cfg.seed, cfg.output_dir = dict(run.objective), run.seed, str(run.directory)
    cfg.resume_from_checkpoint, cfg.overwrite_output_dir = None, False
    if not cfg.eval.steps:
        cfg.eval.steps = cfg.max_steps
    if run.overrides:  # a spec's own settings of other sections are checked like a recipe's
        from rlclip.config import validate

        validate(cfg)
    return cfg


def apply_override(config: Any, key: str, value: Any) -> None:
    """Set the dotted ``key`` of a TrainConfig (a spec's ``rollout.is_mode=token_mask``); a bad key is one line."""
    *path, name = key.split(".")
    section = config
    for part in path:
        section = getattr(section, part, None)
    if section is None or not hasattr(section, name) or path[0] == "objective":
        raise ConfigError(f"--objectives: {key!r} is not a config field; a dotted key names a field of another "
                          "section, e.g. ratio_clip:rollout.is_mode=token_truncate (objective settings take no dot)")
    setattr(section, name, value)


def settings_of(config: Any) -> dict[str, Any]:
    """The config as plain data, without the fields a resumption may change."""
    import yaml

    from rlclip.config import to_yaml

    data = yaml.safe_load(to_yaml(config))
    for key in IGNORED_KEYS:
        data.pop(key, None)
    return data


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix[:-1]]


def run_state(cfg: Any, overwrite: bool) -> str:
    """What to do with a run's directory: ``done``, ``resume``, ``fresh`` (nothing usable yet) or ``restart``.

    A directory made with other settings is refused (its results would be
    mixed with this sweep's) unless ``overwrite``.
    """
    from rlclip.checkpoint import checkpoints

    directory = Path(cfg.output_dir)
    if overwrite:
        return "restart" if directory.exists() else "fresh"
    saved = directory / "config.yaml"
    if not saved.is_file():
        return "fresh" if not (directory / "metrics.jsonl").exists() else "restart"
    import yaml

    before = yaml.safe_load(saved.read_text()) or {}
    for key in IGNORED_KEYS:
        before.pop(key, None)
    changed = _differences(before, settings_of(cfg))
    if changed:
        raise ConfigError(f"{directory} was run with other settings ({', '.join(changed[:4])} differ); rerun with "
                          "--overwrite to replace its runs, or choose another --output_dir")
    if (directory / RESULT_NAME).is_file():
        return "done"
    return "resume" if checkpoints(directory) else "restart"


def train_run(cfg: Any, state: str, train_records: list[dict[str, Any]] | None) -> tuple[dict[str, Any] | None, Any]:
    """Train (or resume) one run; returns its result (None when a signal stopped it) and the trainer."""
    from rlclip.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.resume_from_checkpoint = "latest" if state == "resume" else None
    cfg.overwrite_output_dir = state == "restart"
    started = time.perf_counter()
    trainer = Trainer(cfg, train_dataset=train_records)
    history = trainer.train()
    if trainer.stopped_by:
        return None, trainer
    evaluator = trainer.evaluator
    if evaluator.last_correct is None:  # resumed at max_steps: the final evaluation never ran in this process
        evaluator.run(trainer.model, trainer.tokenizer)
    correct = list(evaluator.last_correct or [])
    result = {"objective": cfg.objective, "seed": cfg.seed, "steps": trainer.step,
              "accuracy": sum(correct) / max(len(correct), 1), "correct": correct,
              "problems": [str(r.get("question", r["prompt"])) for r in evaluator.records],
              "reward_last": history[-1]["reward/mean"] if history else None,
              "train_seconds": round(time.perf_counter() - started, 1)}
    return result, trainer


def summarize(results: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Per objective spec (in ``labels`` order): seeds, per-seed accuracy, mean and 95% interval."""
    rows = []
    for label in labels:
        mine = sorted((r for r in results if r["label"] == label), key=lambda r: r["seed"])
        if not mine:
            continue
        mean, low, high = bootstrap_interval([r["correct"] for r in mine])
        rows.append({"label": label, "seeds": [r["seed"] for r in mine], "accuracies": [r["accuracy"] for r in mine],
                     "problems": len(mine[0]["correct"]), "mean": mean, "low": low, "high": high})
    return rows


def overlap_sentences(rows: list[dict[str, Any]]) -> list[str]:
    """Which intervals overlap; the honest reading when they all do."""
    pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]
    apart = [(a, b) for a, b in pairs if a["high"] < b["low"] or b["high"] < a["low"]]
    if len(rows) < 2:
        return ["Only one objective: nothing to compare."]
    if not apart:
        return [f"Every pair of intervals overlaps: with {rows[0]['problems']} held-out problems and "
                f"{len(rows[0]['seeds'])} seed(s) these separate intervals do not separate the objectives (the paired "
                "differences below are the sharper test). More seeds, more held-out problems (eval.limit) or more "
                "steps would narrow the intervals."]
    lines = []
    for a, b in apart:
        hi, lo = (a, b) if a["mean"] > b["mean"] else (b, a)
        lines.append(f"`{hi['label']}` is above `{lo['label']}`: their intervals do not overlap.")
    lines.append(f"Every other pair overlaps ({len(pairs) - len(apart)} of {len(pairs)}).")
    return lines


def compare_markdown(rows: list[dict[str, Any]], base_accuracy: float | None = None) -> list[str]:
    lines = ["## Final held-out accuracy", "",
             "Mean over seeds with a 95% two-level bootstrap interval (seeds, then held-out problems within each "
             f"seed; {BOOTSTRAP_SAMPLES} samples).", "",
             "| objective | seeds | problems | accuracy per seed | mean | 95% interval |", "|---|---|---|---|---|---|"]
    for row in rows:
        per_seed = ", ".join(f"{a:.1%}" for a in row["accuracies"])
        lines.append(f"| {row['label']} | {len(row['seeds'])} | {row['problems']} | {per_seed} | {row['mean']:.1%} | "
                     f"[{row['low']:.1%}, {row['high']:.1%}] |")
    if base_accuracy is not None:
        lines += ["", f"The model before training scores {base_accuracy:.1%} on the same held-out problems."]
    return lines + [""] + overlap_sentences(rows) + [""]


def _points(value: float) -> str:
    """A difference in percentage points, signed (``+7.5``, ``-2.5``; ``0.0`` without a sign)."""
    text = f"{100 * value:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def _p(row: dict[str, Any]) -> str:
    return f"< {2 / row['samples']:.1g}" if row["p_value"] == 0 else f"{row['p_value']:.3g}"


def paired_sentences(paired: list[dict[str, Any]], refused: list[dict[str, Any]]) -> list[str]:
    """What the paired differences separate, what they do not, and the pairs that could not be paired."""
    lines = []
    for row in paired:
        if row["excludes_zero"]:
            hi, lo = (row["a"], row["b"]) if row["diff_mean"] > 0 else (row["b"], row["a"])
            lines.append(f"`{hi}` is above `{lo}` on the same problems and seeds: `{row['a']}` - `{row['b']}` is "
                         f"{_points(row['diff_mean'])} points, 95% interval [{_points(row['ci_low'])}, "
                         f"{_points(row['ci_high'])}], p = {_p(row)}.")
    close = [f"`{row['a']}` vs `{row['b']}`" for row in paired if not row["excludes_zero"]]
    if paired and len(close) == len(paired):
        lines.append(f"No paired interval excludes 0: with {paired[0]['n_problems']} held-out problems and "
                     f"{paired[0]['n_seeds']} seed(s) this sweep does not separate any two objectives, even on the "
                     "same problems and seeds; do not read a ranking into the means.")
    elif close:
        lines.append(f"Not separated (the interval contains 0): {', '.join(close)}; on these problems and seeds the "
                     "sweep cannot tell them apart.")
    if len(paired) > 1:
        lines.append(f"{len(paired)} pairs, no correction for multiple comparisons: a pair with no true difference "
                     "still excludes 0 about one time in 20.")
    return lines + [f"Not paired: {row['reason']}." for row in refused]


def paired_markdown(paired: list[dict[str, Any]], refused: list[dict[str, Any]]) -> list[str]:
    """The paired-difference section of report.md (nothing with fewer than two objectives)."""
    if not paired and not refused:
        return []
    lines = ["## Paired differences", "",
             "Accuracy of `a` minus `b` (percentage points) on the same held-out problems and seeds: the bootstrap "
             "above applied to the per-(seed, problem) differences, so each draw picks the same seeds and problems "
             "for both objectives and what they share (hard problems, a lucky seed) cancels. Every objective "
             "against the first listed, then the other pairs. p: two-sided bootstrap p-value.", ""]
    if paired:
        lines += ["| a - b | seeds | problems | only a right | only b right | difference | 95% interval | p "
                  "| excludes 0 |", "|---|---|---|---|---|---|---|---|---|"]
        for row in paired:
            lines.append(f"| `{row['a']}` - `{row['b']}` | {row['n_seeds']} | {row['n_problems']} | {row['a_only']} "
                         f"| {row['b_only']} | {_points(row['diff_mean'])} | [{_points(row['ci_low'])}, "
                         f"{_points(row['ci_high'])}] | {_p(row)} | {'yes' if row['excludes_zero'] else 'no'} |")
        lines.append("")
    return lines + paired_sentences(paired, refused) + [""]


def write_compare_report(out: Path, runs: list[PlannedRun], results: list[dict[str, Any]],
                         base_accuracy: float | None = None) -> Path:
    """``out/report.md`` (the interval table, the paired differences, then ``rlclip report``'s curves and table) and
    ``out/compare.json`` (``objectives``, ``paired``, ``paired_refused``, ``runs``, ``base_accuracy``)."""
    from rlclip.report import write_report

    labels = list(dict.fromkeys(r.label for r in runs))
    rows = summarize(results, labels)
    paired, refused = paired_comparisons(results, labels)
    report = write_report([str(r.directory) for r in runs], out)
    body = report.read_text().split("\n", 1)[1]
    head = ["# rlclip compare", "", *compare_markdown(rows, base_accuracy), *paired_markdown(paired, refused)]
    report.write_text("\n".join(head) + body)
    (out / "compare.json").write_text(json.dumps({"objectives": rows, "paired": paired, "paired_refused": refused,
                                                  "runs": results, "base_accuracy": base_accuracy}, indent=2))
    return report


def _agree(value: Any) -> Any:
    """The main process's ``value`` on every process."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    if PartialState().num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def sweep(config: Any, specs: list[tuple[str, dict[str, Any]]], seeds: list[int], overwrite: bool = False,
          train_records: list[dict[str, Any]] | None = None, say: Any = print) -> tuple[list[PlannedRun], list[dict], str | None]:
    """Train every planned run not yet finished; returns the plan, the results and the signal that stopped it."""
    from accelerate import PartialState

    state = PartialState()
    runs = plan(config, specs, seeds)
    configs = [run_config(config, run) for run in runs]
    states = _agree([run_state(cfg, overwrite) if state.is_main_process else None for cfg in configs])
    results: list[dict[str, Any]] = []
    for i, (run, cfg, what) in enumerate(zip(runs, configs, states), 1):
        result_file = run.directory / RESULT_NAME
        if what == "done":
            say(f"[compare] ({i}/{len(runs)}) {run.directory.name}: finished earlier, kept")
            results.append(json.loads(result_file.read_text()))
            continue
        say(f"[compare] ({i}/{len(runs)}) {run.directory.name}: " +
            {"resume": "resuming from its newest checkpoint", "restart": "starting again (no checkpoint)",
             "fresh": "training"}[what])
        result, trainer = train_run(cfg, what, train_records)
        if result is None:
            return runs, results, trainer.stopped_by
        result["label"] = run.label
        if state.is_main_process:
            result_file.write_text(json.dumps(result, indent=2))
        state.wait_for_everyone()
        results.append(result)
        say(f"[compare] {run.directory.name}: held-out accuracy {result['accuracy']:.1%}")
        del trainer
        gc.collect()
    return runs, results, None


def main(argv: list[str]) -> int:
    from accelerate import PartialState

    from rlclip.cli_common import EXIT_INTERRUPTED, ArgumentParser, preflight
    from rlclip.config import load_config, parse_overrides, validate

    parser = ArgumentParser(prog="rlclip compare", description="Run one recipe with several objectives and seeds.")
    parser.add_argument("--config", required=True, help="the recipe every run shares")
    parser.add_argument("--objectives", required=True, help="comma-separated specs, e.g. ratio_clip,troll:kl_bound=0.1")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="rerun every run instead of keeping finished ones")
    args, rest = parser.parse_known_args(argv)
    specs, seeds = parse_objectives(args.objectives), parse_seeds(args.seeds)
    config = load_config(args.config, parse_overrides(rest))
    for name, extra in specs:  # every spec must build before anything trains
        probe = copy.deepcopy(config)
        probe.objective = objective_settings(config.objective, name, extra)
        for key, value in spec_overrides(extra).items():
            apply_override(probe, key, value)
        validate(probe)
    preflight(config)  # each run loads its own data (synthetic problems depend on the seed)
    main_process = PartialState().is_main_process

    def say(message: str) -> None:
        if main_process:
            print(message, file=sys.stderr, flush=True)

    runs, results, stopped_by = sweep(config, specs, seeds, args.overwrite, say=say)
    if stopped_by:
        say(f"rlclip compare: stopped by {stopped_by}; {len(results)} of {len(runs)} runs finished. Run the same "
            "command again to resume (finished runs are kept, the stopped one resumes from its checkpoint)")
        from rlclip.interrupt import EXIT_CODES

        return EXIT_CODES.get(stopped_by, EXIT_INTERRUPTED)
    if main_process:
        print(write_compare_report(Path(config.output_dir), runs, results))
    return 0
