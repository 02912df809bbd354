"""``rlclip compare`` (rlclip/compare.py): specs, the two-level bootstrap by hand, resumable sweeps on the tiny model."""

from __future__ import annotations

import json
import os
import signal

import pytest

from conftest import ROOT, tiny_config
from rlclip.compare import (
    bootstrap_interval,
    main,
    objective_settings,
    overlap_sentences,
    parse_objectives,
    parse_seeds,
    plan,
    run_config,
    run_state,
)
from rlclip.errors import ConfigError


def test_objective_specs_and_seeds_parse():
    assert parse_objectives("ratio_clip, troll:kl_bound=0.1:top_k=32") == [
        ("ratio_clip", {}), ("troll", {"kl_bound": 0.1, "top_k": 32})]
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    for bad, message in [("troll:kl_bound", "is not key=value"), ("", "is empty"), ("pspo,pspo", "twice")]:
        with pytest.raises(ConfigError, match=message):
            parse_objectives(bad)
    for bad in ["0,a", "", "1,1"]:
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_recipe_settings_carry_to_the_same_objective_and_shared_ones_to_others():
    recipe = {"name": "ratio_clip", "eps_high": 0.28, "agg": "seq_mean_token_mean", "kl_coef": 0.01}
    assert objective_settings(recipe, "ratio_clip", {}) == recipe
    assert objective_settings(recipe, "pspo", {"alpha": 0.2}) == {
        "name": "pspo", "agg": "seq_mean_token_mean", "kl_coef": 0.01, "alpha": 0.2}


def test_each_run_gets_its_seed_directory_and_a_final_evaluation(tmp_path):
    config = tiny_config(tmp_path, "max_steps=3")
    runs = plan(config, [("ratio_clip", {}), ("troll", {"kl_bound": 0.1})], [0, 5])
    assert [r.directory.name for r in runs] == ["ratio_clip-seed0", "ratio_clip-seed5", "troll_kl_bound=0.1-seed0",
                                                "troll_kl_bound=0.1-seed5"]
    cfg = run_config(config, runs[3])
    assert (cfg.seed, cfg.objective, cfg.eval.steps) == (5, {"name": "troll", "kl_bound": 0.1}, 3)
    assert config.eval.steps == 0 and config.seed == 0  # the recipe itself is untouched


def test_bootstrap_one_seed_follows_the_binomial():
    """One seed, 5 of 10 right: the resampled accuracy is Binomial(10, 0.5) / 10, whose 2.5% and 97.5% quantiles
    are 0.2 and 0.8 (P(X <= 1) = 11/1024 < 0.025 < P(X <= 2) = 56/1024)."""
    mean, low, high = bootstrap_interval([[1.0] * 5 + [0.0] * 5])
    assert (mean, low, high) == (0.5, 0.2, 0.8)
    assert bootstrap_interval([[1.0] * 7]) == (1.0, 1.0, 1.0)


def test_bootstrap_resamples_seeds():
    """Seeds scoring 1 and 0 on every problem: problems add nothing, and the mean of two drawn seeds is 0, 0.5
    or 1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1]."""
    assert bootstrap_interval([[1.0] * 4, [0.0] * 4]) == (0.5, 0.0, 1.0)
    with pytest.raises(ConfigError, match="eval.limit"):
        bootstrap_interval([[1.0], []])


def test_overlap_is_stated_honestly():
    row = {"problems": 40, "seeds": [0, 1]}
    close = [{"label": "a", "mean": 0.5, "low": 0.4, "high": 0.6, **row},
             {"label": "b", "mean": 0.55, "low": 0.45, "high": 0.65, **row}]
    assert "these separate intervals do not separate the objectives (the paired differences below" in \
        overlap_sentences(close)[0]
    apart = close + [{"label": "c", "mean": 0.9, "low": 0.8, "high": 0.95, **row}]
    lines = overlap_sentences(apart)
    assert lines[:2] == ["`c` is above `a`: their intervals do not overlap.",
                         "`c` is above `b`: their intervals do not overlap."]
    assert lines[2] == "Every other pair overlaps (1 of 3)."


def test_a_run_made_with_other_settings_is_refused(tmp_path):
    config = tiny_config(tmp_path)
    cfg = run_config(config, plan(config, [("ratio_clip", {})], [0])[0])
    assert run_state(cfg, overwrite=False) == "fresh"
    from rlclip.config import to_yaml

    directory = tmp_path / "ratio_clip-seed0"
    directory.mkdir()
    (directory / "config.yaml").write_text(to_yaml(cfg).replace("learning_rate: 0.003", "learning_rate: 0.1"))
    with pytest.raises(ConfigError, match=r"other settings \(train.learning_rate differ\); rerun with --overwrite"):
        run_state(cfg, overwrite=False)
    assert run_state(cfg, overwrite=True) == "restart"
    (directory / "config.yaml").write_text(to_yaml(cfg))
    assert run_state(cfg, overwrite=False) == "restart"  # no checkpoint and no result: start again
    (directory / "compare_result.json").write_text("{}")
    assert run_state(cfg, overwrite=False) == "done"


def test_sweep_interrupted_and_resumed_writes_intervals_and_curves(tmp_path, monkeypatch, capsys):
    """2 objectives x 2 seeds on the tiny model (rollouts of 2 prompts); Ctrl-C after the first
    step of the second run, then the same command again: the finished run is kept, the stopped one resumes from its
    checkpoint, the rest train. A third call trains nothing and goes straight to the report."""
    import rlclip.compare
    from rlclip.trainer import Trainer

    argv = ["--config", str(ROOT / "recipes/smoke/tiny.yaml"), "--objectives", "ratio_clip,pspo", "--seeds", "0,1",
            f"--output_dir={tmp_path}", "--max_steps=2", "--eval.limit=4", "--eval.max_new_tokens=4",
            "--logging.progress_bar=false", "--rollout.prompts_per_step=2", "--rollout.max_new_tokens=8"]
    step, started = Trainer.optimizer_step, []
    init = Trainer.__init__

    def counting_init(self, config, *args, **kwargs):
        started.append(os.path.basename(config.output_dir))
        init(self, config, *args, **kwargs)

    def interrupting_step(self, mini_batch):
        result = step(self, mini_batch)
        if self.output_dir.name == "ratio_clip-seed1" and self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "__init__", counting_init)
    monkeypatch.setattr(Trainer, "optimizer_step", interrupting_step)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT; 1 of 4 runs finished. Run the same command again to resume" in err
    assert started == ["ratio_clip-seed0", "ratio_clip-seed1"]
    assert (tmp_path / "ratio_clip-seed1" / "checkpoint-1").is_dir() and not (tmp_path / "report.md").exists()

    monkeypatch.setattr(Trainer, "optimizer_step", step)
    started.clear()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert started == ["ratio_clip-seed1", "pspo-seed0", "pspo-seed1"]  # the finished run is not trained again
    assert "ratio_clip-seed0: finished earlier, kept" in err and "ratio_clip-seed1: resuming" in err
    for name in ["ratio_clip-seed0", "ratio_clip-seed1", "pspo-seed0", "pspo-seed1"]:
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        result = json.loads((tmp_path / name / "compare_result.json").read_text())
        assert [r["step"] for r in rows] == [1, 2]  # the resumed run logged each step once
        assert result["accuracy"] == rows[-1]["eval/accuracy"] and len(result["correct"]) == 4
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert [row["label"] for row in summary["objectives"]] == ["ratio_clip", "pspo"]
    for row in summary["objectives"]:
        assert row["seeds"] == [0, 1] and row["problems"] == 4 and row["low"] <= row["mean"] <= row["high"]
    (paired,) = summary["paired"]  # same problems and seeds: paired, the later objective minus the first
    assert (paired["a"], paired["b"], paired["n_seeds"], paired["n_problems"]) == ("pspo", "ratio_clip", 2, 4)
    assert paired["ci_low"] <= paired["diff_mean"] <= paired["ci_high"] and summary["paired_refused"] == []
    report = (tmp_path / "report.md").read_text()
    assert "| objective | seeds | problems | accuracy per seed | mean | 95% interval |" in report
    assert "## Paired differences" in report and "| `pspo` - `ratio_clip` | 2 | 4 |" in report
    assert "overlap" in report and "![held-out accuracy](eval_accuracy.png)" in report
    for png in ["reward", "eval_accuracy", "kl", "trust", "length", "grad_norm"]:
        assert (tmp_path / f"{png}.png").stat().st_size > 1000

    # the third call: the report's writing is checked above, so here it is only recorded (its plots cost more than
    # the rest of the call)
    reports = []
    monkeypatch.setattr(rlclip.compare, "write_compare_report",
                        lambda out, runs, results, **kwargs: reports.append(len(results)) or out / "report.md")
    started.clear()
    assert main(argv) == 0 and started == []  # nothing trains again ...
    assert reports == [4]  # ... and the report is written from the four kept results
