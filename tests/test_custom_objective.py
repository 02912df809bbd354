"""The user objective in recipes/custom_objective.py (REINFORCE with baseline): hand values, and a run chosen from YAML."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from rlclip.config import import_user_modules, load_config
from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, available_objectives, build_objective

MODULE = str(ROOT / "recipes/custom_objective.py")
RECIPE = ROOT / "recipes/custom_objective.yaml"


@pytest.fixture(autouse=True)
def registered():
    import_user_modules([MODULE])  # cached by module name: importing again is a no-op
    import_user_modules([MODULE])
    assert "custom_reinforce" in available_objectives()


# Probabilities p of the sampled tokens and ratios rho = p / p_old, float64.
P = [[0.5, 0.25, 0.1], [0.8, 0.4, 0.2]]
RHO = [[1.0, 2.0, 0.5], [0.8, 1.2, 4.0]]
ADV = [1.0, -0.5]  # one advantage per sequence
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]  # the last token of row 1 is padding


def make_batch() -> PolicyBatch:
    logprobs = torch.tensor(P, dtype=torch.float64).log().requires_grad_()
    old = logprobs.detach() - torch.tensor(RHO, dtype=torch.float64).log()
    advantages = torch.tensor(ADV, dtype=torch.float64)[:, None].expand(2, 3)
    return PolicyBatch(logprobs=logprobs, old_logprobs=old, advantages=advantages,
                       mask=torch.tensor(MASK, dtype=torch.float64))


def expected(weights: list[list[float]]) -> tuple[float, list[list[float]]]:
    """Token-mean loss -sum(w A log p) / N and its gradient -w A / N w.r.t. log p, by hand."""
    n = sum(map(sum, MASK))
    loss = -sum(weights[i][t] * ADV[i] * math.log(P[i][t]) * MASK[i][t] for i in range(2) for t in range(3)) / n
    grad = [[-weights[i][t] * ADV[i] * MASK[i][t] / n for t in range(3)] for i in range(2)]
    return loss, grad


@pytest.mark.parametrize("is_weight, weights", [
    ("none", [[1.0] * 3, [1.0] * 3]),
    ("ratio", RHO),  # the padded token (rho = 4) does not count
])
def test_loss_gradient_and_metrics_by_hand(is_weight, weights):
    batch = make_batch()
    out = build_objective("custom_reinforce", is_weight=is_weight)(batch)
    out.loss.backward()
    loss, grad = expected(weights)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    torch.testing.assert_close(batch.logprobs.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert float(out.metrics["ratio_mean"]) == pytest.approx((1.0 + 2.0 + 0.5 + 0.8 + 1.2) / 5)
    expected_weight = 1.0 if is_weight == "none" else (1.0 + 2.0 + 0.5 + 0.8 + 1.2) / 5
    assert float(out.metrics["is_weight_mean"]) == pytest.approx(expected_weight)


def test_on_policy_gradient_equals_the_ratio_clip_and_gpg_gradients():
    """At rho = 1 all are the plain policy gradient -A grad log p / N."""
    grads = []
    for name in ("custom_reinforce", "ratio_clip", "gpg"):
        batch = make_batch()
        batch.old_logprobs = batch.logprobs.detach().clone()
        build_objective(name)(batch).loss.backward()
        grads.append(batch.logprobs.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-12, atol=1e-15)


def test_shared_settings_reach_the_base_class():
    obj = build_objective("custom_reinforce", agg="seq_mean_token_mean", kl_coef=0.1, entropy_top_quantile=0.2)
    assert obj.agg == "seq_mean_token_mean" and obj.kl_coef == 0.1 and obj.needs == {"ref", "entropy"}


@pytest.mark.parametrize("settings", [{"is_weight": "clip"}, {"is_weigth": "ratio"}])
def test_bad_settings_raise(settings):
    with pytest.raises(ConfigError):
        build_objective("custom_reinforce", **settings)


def test_recipe_loads_twice_in_one_process():
    for _ in range(2):
        config = load_config(RECIPE)
        assert config.objective == {"name": "custom_reinforce", "is_weight": "ratio", "agg": "token_mean"}


def test_training_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """``rlclip train --config recipes/custom_objective.yaml`` (the CLI's main, in this process)."""
    from rlclip.cli import main

    out = tmp_path / "run"
    monkeypatch.chdir(ROOT)  # the recipe's imports: path is relative to the project root
    code = main(["train", "--config", "recipes/custom_objective.yaml", "--max_steps", "2", "--output_dir", str(out),
                 "--logging.progress_bar", "false"])
    assert code == 0, capsys.readouterr().err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        for key in ("objective/is_weight_mean", "objective/ratio_mean", "objective/logprob_mean", "loss"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
    assert rows[0]["objective/ratio_mean"] == pytest.approx(1.0)  # first step: nothing has moved yet
    assert "custom_reinforce" in (out / "config.yaml").read_text()
