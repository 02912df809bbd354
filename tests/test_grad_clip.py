"""Gradient clippers (rlclip/grad_clip/) against hand-computed sequences of gradient norms.

Each sequence has a spike and a NaN step. A NaN step follows the trainer's
contract: ``measure`` returns NaN, ``apply`` is not called (the non-finite
guard skips the step), the state is unchanged and the next finite step goes
on as if the NaN step never happened. Expected values are written out as
arithmetic here, never computed by the implementation. Gradients are float64,
one element per parameter, so a parameter's gradient norm is its value.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from rlclip import grad_clip
from rlclip.errors import ConfigError
from rlclip.grad_clip import (
    GradClipper,
    available_clippers,
    build_clipper,
    clip_metrics,
    register_clipper,
    scale_grads,
)

EPS = 1e-6


def params_with(*values: float | None) -> list[torch.nn.Parameter]:
    """One float64 one-element parameter per value, its gradient [value] (None: no gradient)."""
    params = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)) for _ in values]
    set_grads(params, *values)
    return params


def set_grads(params: list[torch.nn.Parameter], *values: float | None) -> None:
    for p, v in zip(params, values):
        p.grad = None if v is None else torch.tensor([v], dtype=torch.float64)


def step(clipper: GradClipper, params: list[torch.nn.Parameter], *values: float | None) -> dict[str, float] | None:
    """One trainer step: measure; apply only when finite (else the state must stay as it was)."""
    set_grads(params, *values)
    norm = clipper.measure(params)
    if not math.isfinite(float(norm)):
        return None
    return clipper.apply(params, norm)


def check(metrics, pre, post, clipped, threshold):
    assert metrics["grad/norm_pre"] == pytest.approx(pre, rel=1e-12)
    assert metrics["grad/norm_post"] == pytest.approx(post, rel=1e-12)
    assert metrics["grad/clipped"] == clipped
    assert metrics["grad/threshold"] == pytest.approx(threshold, rel=1e-12)


def nan_step_changes_nothing(clipper, params, *values):
    before = json.dumps(clipper.state_dict())
    assert step(clipper, params, *values) is None
    assert json.dumps(clipper.state_dict()) == before


# ---------------------------------------------------------------------------- norm
def test_norm_equals_torch_clip_grad_norm():
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 2)]
    grads = [torch.randn(s) * 3 for s in shapes]
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    ref = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b, g in zip(ours, ref, grads):
        a.grad, b.grad = g.clone(), g.clone()
    total = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    clipper = build_clipper("norm", max_norm=0.5)
    norm = clipper.measure(ours)
    assert torch.equal(norm, total)
    metrics = clipper.apply(ours, norm)
    for a, b in zip(ours, ref):
        assert torch.equal(a.grad, b.grad)
    assert (metrics["grad/norm_pre"], metrics["grad/clipped"], metrics["grad/threshold"]) == (float(total), 1.0, 0.5)
    assert metrics["grad/norm_post"] == pytest.approx(0.5, rel=1e-6)


def test_norm_sequence_with_spike_nan_and_disabled():
    clipper = build_clipper("norm")  # max_norm 1.0
    params = params_with(0.5)
    check(step(clipper, params, 0.5), 0.5, 0.5, 0.0, 1.0)
    assert params[0].grad.item() == 0.5
    check(step(clipper, params, 40.0), 40.0, 40.0 / (40.0 + EPS), 1.0, 1.0)
    assert params[0].grad.item() == pytest.approx(40.0 / (40.0 + EPS), rel=1e-12)
    nan_step_changes_nothing(clipper, params, float("nan"))
    check(step(clipper, params, 0.7), 0.7, 0.7, 0.0, 1.0)

    off = build_clipper("norm", max_norm=0)
    check(step(off, params, 40.0), 40.0, 40.0, 0.0, 0.0)
    assert params[0].grad.item() == 40.0


def test_norm_of_no_gradients_is_zero():
    clipper = build_clipper("norm")
    params = params_with(None, None)
    assert float(clipper.measure(params)) == 0.0
    check(clipper.apply(params, clipper.measure(params)), 0.0, 0.0, 0.0, 1.0)


# ---------------------------------------------------------------------------- autoclip
def test_autoclip_sequence_appends_first_and_keeps_a_window():
    clipper = build_clipper("autoclip", clip_percentile=50, history_size=3)
    params = params_with(1.0)
    # history [1]: the median is the norm itself, not clipped
    check(step(clipper, params, 1.0), 1.0, 1.0, 0.0, 1.0)
    # history [1, 3]: median 1 + 0.5 * (3 - 1) = 2 < 3
    check(step(clipper, params, 3.0), 3.0, 3.0 * 2.0 / (3.0 + EPS), 1.0, 2.0)
    assert params[0].grad.item() == pytest.approx(3.0 * 2.0 / (3.0 + EPS), rel=1e-12)
    # history [1, 3, 2] -> sorted [1, 2, 3]: median 2, the norm 2 is not above it
    check(step(clipper, params, 2.0), 2.0, 2.0, 0.0, 2.0)
    # spike; window of 3 drops the 1: [3, 2, 10] -> median 3
    check(step(clipper, params, 10.0), 10.0, 10.0 * 3.0 / (10.0 + EPS), 1.0, 3.0)
    nan_step_changes_nothing(clipper, params, float("nan"))
    assert clipper.state_dict()["history"] == [3.0, 2.0, 10.0]
    # [2, 10, 2.5] -> sorted [2, 2.5, 10]: median 2.5, as if the NaN step never happened
    check(step(clipper, params, 2.5), 2.5, 2.5, 0.0, 2.5)


def test_autoclip_default_percentile_interpolates():
    clipper = build_clipper("autoclip")  # p = 10
    params = params_with(1.0)
    for v in [5.0, 1.0, 4.0, 2.0]:
        step(clipper, params, v)
    # history [5, 1, 4, 2, 3] -> sorted [1, 2, 3, 4, 5]; rank 0.1 * 4 = 0.4 -> 1 + 0.4 * (2 - 1) = 1.4
    check(step(clipper, params, 3.0), 3.0, 3.0 * 1.4 / (3.0 + EPS), 1.0, 1.4)


# ---------------------------------------------------------------------------- zclip
def zclip_warmup(clipper, params):
    """Warm-up norms 1, 2, 3 (cap 2.5 clips the last one); returns the initial mean and variance."""
    check(step(clipper, params, 1.0), 1.0, 1.0, 0.0, 2.5)
    check(step(clipper, params, 2.0), 2.0, 2.0, 0.0, 2.5)
    check(step(clipper, params, 3.0), 3.0, 3.0 * 2.5 / (3.0 + EPS), 1.0, 2.5)
    mean = (1.0 + 2.0 + 3.0) / 3
    var = ((1.0 - mean) ** 2 + (2.0 - mean) ** 2 + (3.0 - mean) ** 2) / 3
    state = clipper.state_dict()
    assert state["initialized"] == 1 and state["buffer"] == []
    assert state["mean"] == pytest.approx(mean, rel=1e-12) and state["var"] == pytest.approx(var, rel=1e-12)
    return mean, var


def test_zclip_zscore_adaptive_scaling_sequence():
    clipper = build_clipper("zclip", alpha=0.5, z_thresh=2.0, warmup_steps=3, max_grad_norm=2.5)
    params = params_with(1.0)
    mean, var = zclip_warmup(clipper, params)

    # 2.5: z = (2.5 - 2) / (sqrt(2/3) + eps) = 0.61, no spike; the cap 2.5 is not exceeded
    std = math.sqrt(var)
    bound = mean + 2.0 * (std + EPS)
    check(step(clipper, params, 2.5), 2.5, 2.5, 0.0, min(bound, 2.5))
    mean = 0.5 * mean + 0.5 * 2.5
    var = 0.5 * var + 0.5 * (2.5 - mean) ** 2

    # spike 50: z = (50 - mean) / (std + eps); clip to mean + z_t * std / (z / z_t), below the cap
    std = math.sqrt(var)
    z = (50.0 - mean) / (std + EPS)
    clip_to = mean + 2.0 * std / (z / 2.0)
    assert z > 2.0 and clip_to < 2.5
    check(step(clipper, params, 50.0), 50.0, 50.0 * clip_to / (50.0 + EPS), 1.0, clip_to)
    assert params[0].grad.item() == pytest.approx(50.0 * clip_to / (50.0 + EPS), rel=1e-12)
    mean_after_spike = 0.5 * mean + 0.5 * clip_to  # the clipped value, not 50, enters the EMA
    var = 0.5 * var + 0.5 * (clip_to - mean_after_spike) ** 2
    mean = mean_after_spike

    nan_step_changes_nothing(clipper, params, float("nan"))
    state = clipper.state_dict()
    assert state["mean"] == pytest.approx(mean, rel=1e-12) and state["var"] == pytest.approx(var, rel=1e-12)

    # 2.0 after the NaN step: below the mean, not clipped
    bound = mean + 2.0 * (math.sqrt(var) + EPS)
    check(step(clipper, params, 2.0), 2.0, 2.0, 0.0, min(bound, 2.5))
    new_mean = 0.5 * mean + 0.5 * 2.0
    assert clipper.state_dict()["mean"] == pytest.approx(new_mean, rel=1e-12)
    assert clipper.state_dict()["var"] == pytest.approx(0.5 * var + 0.5 * (2.0 - new_mean) ** 2, rel=1e-12)


def test_zclip_cap_clips_without_a_spike_and_the_raw_norm_enters_the_ema():
    clipper = build_clipper("zclip", alpha=0.5, z_thresh=2.0, warmup_steps=3, max_grad_norm=2.5)
    params = params_with(1.0)
    mean, var = zclip_warmup(clipper, params)
    # 3.0: z = 1 / 0.8165 = 1.22, no spike, but above the cap 2.5
    check(step(clipper, params, 3.0), 3.0, 3.0 * 2.5 / (3.0 + EPS), 1.0, 2.5)
    new_mean = 0.5 * mean + 0.5 * 3.0
    assert clipper.state_dict()["mean"] == pytest.approx(new_mean, rel=1e-12)
    assert clipper.state_dict()["var"] == pytest.approx(0.5 * var + 0.5 * (3.0 - new_mean) ** 2, rel=1e-12)


def test_zclip_mean_option_percentile_mode_and_skip_update():
    base = dict(alpha=0.5, z_thresh=2.0, warmup_steps=3, max_grad_norm=None)
    mean = 2.0
    std = math.sqrt(2.0 / 3.0)

    by_mean = build_clipper("zclip", clip_option="mean", **base)
    params = params_with(1.0)
    for v in (1.0, 2.0, 3.0):
        check(step(by_mean, params, v), v, v, 0.0, 0.0)  # no cap: warm-up does not clip
    check(step(by_mean, params, 50.0), 50.0, 50.0 * mean / (50.0 + EPS), 1.0, mean)

    pct = build_clipper("zclip", mode="percentile", **base)
    for v in (1.0, 2.0, 3.0):
        step(pct, params, v)
    bound = mean + 2.0 * std
    assert 3.5 < bound < 4.0
    check(step(pct, params, 3.5), 3.5, 3.5, 0.0, bound)
    new_mean = 0.5 * mean + 0.5 * 3.5
    var = 0.5 * (2.0 / 3.0) + 0.5 * (3.5 - new_mean) ** 2
    mean, bound = new_mean, new_mean + 2.0 * math.sqrt(var)
    assert 6.0 > bound
    check(step(pct, params, 6.0), 6.0, 6.0 * bound / (6.0 + EPS), 1.0, bound)
    new_mean = 0.5 * mean + 0.5 * bound
    assert pct.state_dict()["mean"] == pytest.approx(new_mean, rel=1e-12)

    skip = build_clipper("zclip", skip_update_on_spike=True, **base)
    for v in (1.0, 2.0, 3.0):
        step(skip, params, v)
    mean = 2.0  # the warm-up statistics again (the percentile case above moved its own)
    z = (50.0 - mean) / (std + EPS)
    clip_to = mean + 2.0 * std / (z / 2.0)
    check(step(skip, params, 50.0), 50.0, 50.0 * clip_to / (50.0 + EPS), 1.0, clip_to)
    assert skip.state_dict()["mean"] == pytest.approx(mean, rel=1e-12)
    assert skip.state_dict()["var"] == pytest.approx(2.0 / 3.0, rel=1e-12)


def test_zclip_nan_during_warmup_is_not_collected():
    clipper = build_clipper("zclip", warmup_steps=3, max_grad_norm=None)
    params = params_with(1.0)
    step(clipper, params, 1.0)
    nan_step_changes_nothing(clipper, params, float("inf"))
    assert clipper.state_dict()["buffer"] == [1.0]


def test_zclip_defaults_are_the_authors():
    c = build_clipper("zclip")
    assert (c.alpha, c.z_thresh, c.max_grad_norm, c.eps, c.warmup_steps) == (0.97, 2.5, 1.0, 1e-6, 25)
    assert (c.mode, c.clip_option, c.clip_factor, c.skip_update_on_spike) == (
        "zscore", "adaptive_scaling", 1.0, False)


# ---------------------------------------------------------------------------- adagc
def test_adagc_sequence_per_tensor():
    clipper = build_clipper("adagc", lambda_rel=1.05, beta=0.5, warmup_steps=2, lambda_abs=1.0)
    # position 1 is a trainable tensor that never gets a gradient (e.g. unused): positions stay stable
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(3)]

    def grads(a, b):
        params[0].grad = torch.tensor(a, dtype=torch.float64)
        params[1].grad = None
        params[2].grad = torch.tensor(b, dtype=torch.float64)

    # warm-up 1: global norm sqrt(25 + 144) = 13 > 1 -> scale 1 / (13 + eps); gamma = clipped norms
    grads([3.0, 4.0], [0.0, 12.0])
    m = clipper.apply(params, clipper.measure(params))
    s = 1.0 / (13.0 + EPS)
    check(m, 13.0, 13.0 * s, 1.0, 1.0)
    assert params[0].grad.tolist() == pytest.approx([3.0 * s, 4.0 * s], rel=1e-12)
    # warm-up 2: norms 0.3 and 0.4 (global 0.5), not clipped; gamma = min(5 s, 0.3), min(12 s, 0.4)
    grads([0.3, 0.0], [0.0, 0.4])
    check(clipper.apply(params, clipper.measure(params)), 0.5, 0.5, 0.0, 1.0)
    assert 5 * s > 0.3 and 12 * s > 0.4
    state = clipper.state_dict()
    assert state["positions"] == [0, 2] and state["gamma"] == pytest.approx([0.3, 0.4], rel=1e-12)

    # adaptive: tensor 0 (0.3 <= 1.05 * 0.3) passes; tensor 2 spikes to 4 > 1.05 * 0.4 = 0.42
    grads([0.3, 0.0], [0.0, 4.0])
    m = clipper.apply(params, clipper.measure(params))
    s2 = 0.42 / (4.0 + EPS)
    check(m, math.sqrt(0.09 + 16.0), math.sqrt(0.09 + (4.0 * s2) ** 2), 1.0, math.sqrt(0.315 ** 2 + 0.42 ** 2))
    assert m["grad/clipped_tensors"] == 0.5
    assert params[0].grad.tolist() == [0.3, 0.0]
    assert params[2].grad.tolist() == pytest.approx([0.0, 4.0 * s2], rel=1e-12)
    gamma = [0.5 * 0.3 + 0.5 * 0.3, 0.5 * 0.4 + 0.5 * 0.42]  # the clipped 0.42 enters, not 4
    assert clipper.state_dict()["gamma"] == pytest.approx(gamma, rel=1e-12)

    # NaN in one tensor: the global norm is NaN, the step is skipped, nothing changes
    before = json.dumps(clipper.state_dict())
    grads([0.3, 0.0], [float("nan"), 0.4])
    assert math.isnan(float(clipper.measure(params)))
    assert json.dumps(clipper.state_dict()) == before

    # next step: thresholds 1.05 * 0.3 and 1.05 * 0.41 = 0.4305 > 0.4, nothing clipped
    grads([0.3, 0.0], [0.0, 0.4])
    m = clipper.apply(params, clipper.measure(params))
    check(m, 0.5, 0.5, 0.0, math.sqrt(0.315 ** 2 + (1.05 * 0.41) ** 2))
    gamma = [0.3, 0.5 * 0.41 + 0.5 * 0.4]
    assert clipper.state_dict()["gamma"] == pytest.approx(gamma, rel=1e-12)
    assert clipper.state_dict()["step"] == 4


def test_adagc_without_warmup_starts_from_the_first_norms():
    clipper = build_clipper("adagc", warmup_steps=0, beta=0.5)
    params = params_with(2.0)
    check(step(clipper, params, 2.0), 2.0, 2.0, 0.0, 1.05 * 2.0)  # gamma starts at 2
    check(step(clipper, params, 5.0), 5.0, 5.0 * 2.1 / (5.0 + EPS), 1.0, 2.1)
    assert clipper.state_dict()["gamma"] == pytest.approx([0.5 * 2.0 + 0.5 * 2.1], rel=1e-12)


def test_adagc_refuses_other_trainable_parameters():
    clipper = build_clipper("adagc", warmup_steps=1)
    step(clipper, params_with(1.0, 2.0), 1.0, 2.0)
    with pytest.raises(ConfigError, match="same trainable parameters"):
        step(clipper, params_with(1.0), 1.0)


def test_adagc_defaults():
    c = build_clipper("adagc")
    assert (c.lambda_rel, c.beta, c.warmup_steps, c.lambda_abs, c.eps) == (1.05, 0.98, 100, 1.0, 1e-6)


# ---------------------------------------------------------------------------- state round trip
SEQUENCE = [1.0, 2.0, 3.0, 2.5, 50.0, float("nan"), 2.0, 2.2, 1.8, 30.0, 2.1, 1.9]
CASES = {
    "norm": {"max_norm": 2.0},
    "autoclip": {"clip_percentile": 30, "history_size": 4},
    "zclip": {"alpha": 0.6, "z_thresh": 1.5, "warmup_steps": 3},
    "adagc": {"lambda_rel": 1.05, "beta": 0.7, "warmup_steps": 3},
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("via", ["json", "torch.save"])
def test_state_round_trip_continues_exactly(name, via):
    def values(v):
        return (v, 0.5 * v)  # two tensors, so adagc has per-tensor state

    first = build_clipper(name, **CASES[name])
    params = params_with(*values(1.0))
    for v in SEQUENCE[:7]:
        step(first, params, *values(v))
    state = first.state_dict()
    if via == "json":
        state = json.loads(json.dumps(state, allow_nan=False))
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = build_clipper(name, **CASES[name])
    resumed.load_state_dict(state)
    other = params_with(*values(1.0))
    for v in SEQUENCE[7:]:
        a, b = step(first, params, *values(v)), step(resumed, other, *values(v))
        assert a == b
        assert [p.grad.item() for p in params] == [p.grad.item() for p in other]
    assert first.state_dict() == resumed.state_dict()


def test_state_of_another_clipper_is_ignored_with_a_warning():
    z = build_clipper("zclip", warmup_steps=1)
    with pytest.warns(UserWarning, match="starts with fresh statistics"):
        z.load_state_dict(build_clipper("autoclip").state_dict())
    assert z.state_dict()["initialized"] == 0


def test_apply_refuses_a_non_finite_norm():
    for name in CASES:
        with pytest.raises(ValueError, match="non-finite guard"):
            build_clipper(name).apply(params_with(1.0), torch.tensor(float("nan")))


# ---------------------------------------------------------------------------- registry
def test_registry_lists_and_errors():
    assert {"norm", "autoclip", "zclip", "adagc"} <= set(available_clippers())
    assert available_clippers() == sorted(available_clippers())
    with pytest.raises(ConfigError, match="unknown gradient clipper 'zclipp'; choose one of .*adagc, autoclip"):
        build_clipper("zclipp")
    with pytest.raises(ConfigError, match="no setting z_threshold; its settings are: .*z_thresh"):
        build_clipper("zclip", z_threshold=2.0)
    with pytest.raises(ValueError, match="already registered"):
        register_clipper("zclip")(type("Again", (GradClipper,), {"apply": lambda self, p, n: {}}))
    with pytest.raises(TypeError, match="subclass of GradClipper"):
        register_clipper("not_a_clipper")(object)


@pytest.mark.parametrize("name, settings, match", [
    ("norm", {"max_norm": -1.0}, "max_norm must be in"),
    ("autoclip", {"clip_percentile": 101}, "clip_percentile must be in"),
    ("autoclip", {"history_size": 2.5}, "history_size must be an integer"),
    ("zclip", {"mode": "median"}, "mode must be one of zscore, percentile"),
    ("zclip", {"clip_option": "max"}, "clip_option must be one of"),
    ("zclip", {"alpha": 1.0}, "alpha must be in"),
    ("zclip", {"z_thresh": "2.5"}, "z_thresh must be a number"),
    ("adagc", {"beta": 1.0}, "beta must be in"),
])
def test_bad_settings_raise_config_error(name, settings, match):
    with pytest.raises(ConfigError, match=match):
        build_clipper(name, **settings)


@pytest.fixture
def user_clipper():
    """A user's clipper registered by name for one test, then removed from the registry."""

    @register_clipper("test_user_halve")
    class Halve(GradClipper):
        """Always scales the gradients by ``factor``; counts its steps."""

        def __init__(self, factor: float = 0.5) -> None:
            self.factor = factor
            self.steps = 0

        def apply(self, params, norm):
            self.steps += 1
            scale_grads([p.grad for p in params if p.grad is not None], self.factor)
            return clip_metrics(float(norm), self.factor, float(norm) * self.factor)

        def state_dict(self):
            return {"name": self.name, "steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    yield Halve
    grad_clip._REGISTRY.pop("test_user_halve")


def test_user_subclass_is_built_by_name(user_clipper):
    assert "test_user_halve" in available_clippers()
    clipper = build_clipper("test_user_halve", factor=0.25)
    assert isinstance(clipper, user_clipper)
    params = params_with(4.0)
    check(step(clipper, params, 4.0), 4.0, 1.0, 1.0, 1.0)
    assert params[0].grad.item() == 1.0
    assert clipper.state_dict() == {"name": "test_user_halve", "steps": 1}
    with pytest.raises(ConfigError, match="its settings are: factor"):
        build_clipper("test_user_halve", scale=0.25)


# ---------------------------------------------------------------------------- FSDP2-style sharded gradients
@pytest.mark.xdist_group("two_process")
def test_sharded_dtensor_gradients_give_full_norms_identical_on_both_ranks(two_process):
    """DTensor gradients sharded over 2 processes (tests/scripts/sharded_norms.py, in the suite's 2-process run)."""
    rank0, rank1 = (json.loads((two_process / f"sharded_rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    for name in ("norm", "zclip", "adagc", "autoclip"):
        for (norm, metrics, post), full in zip(rank0[name], rank0["full_norms"]):
            assert norm == pytest.approx(full, rel=1e-9)
            assert metrics["grad/norm_post"] == pytest.approx(post, rel=1e-9)
