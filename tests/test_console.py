"""The start banner, the end summary and the zero-advantage warning (rlclip/console.py)."""

from __future__ import annotations

import pytest

from conftest import tiny_config
from rlclip.console import ZeroAdvantageWatch, run_summary


def test_run_summary_names_steps_time_rewards_and_outputs():
    history = [{"step": 3, "reward/mean": 0.25}, {"step": 4, "reward/mean": 0.5}, {"step": 5, "reward/mean": 0.375}]
    assert run_summary(history, "runs/x", 61.4).splitlines() == [
        "done: 3 steps (to step 5) in 61 s; reward/mean 0.3750 at the last step, best 0.5000 at step 4",
        "model: runs/x; metrics: runs/x/metrics.jsonl; plots: rlclip report runs/x --out runs/x/report"]


def test_run_summary_adds_eval_accuracy_and_tensorboard():
    history = [{"step": 1, "reward/mean": 0.1, "eval/accuracy": 0.2}, {"step": 2, "reward/mean": 0.2},
               {"step": 3, "reward/mean": 0.3, "eval/accuracy": 0.15}]
    assert run_summary(history, "o", 5, "tensorboard").splitlines()[1:] == [
        "eval/accuracy 0.1500 at step 3, best 0.2000 at step 1",
        "model: o; metrics: o/metrics.jsonl; plots: rlclip report o --out o/report",
        "curves: tensorboard --logdir o"]


@pytest.mark.parametrize("temperature,cause", [(0.0, "rollout.temperature=0"), (1.0, "equal rewards")])
def test_zero_advantage_watch_warns_once_per_streak(temperature, cause):
    said = []
    watch = ZeroAdvantageWatch(said.append, temperature, patience=3)
    for zero in (True, True, False, True, True, True, True, True):
        watch.observe(zero)
    assert len(said) == 1 and "last 3 rollouts" in said[0] and cause in said[0]
    watch.observe(False)
    for _ in range(3):
        watch.observe(True)
    assert len(said) == 2


def test_greedy_group_sampling_warns_and_banner_and_summary_print(tmp_path, capsys):
    from rlclip.trainer import Trainer

    cfg = tiny_config(tmp_path, "max_steps=3", "rollout.temperature=0", "train.num_iterations=1",
                      "train.mini_batches=1")
    Trainer(cfg).train()
    err = capsys.readouterr().err
    assert err.count("rlclip: start: ") == 1 and "objective RatioClip(" in err and str(tmp_path) in err
    assert err.count("zero advantage on every completion") == 1 and "rollout.temperature=0" in err
    assert err.count("rlclip: done: 3 steps") == 1


def test_missing_tracker_package_is_a_config_error(root, monkeypatch):
    import importlib.util

    from rlclip.config import load_config
    from rlclip.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="logging.report_to=wandb needs the wandb package.*pip install wandb"):
        load_config(root / "recipes/smoke/tiny.yaml", ["logging.report_to=wandb"])
