"""Rollout correction (rlclip/is_correction.py, rlclip/rejection.py): the floor, SNIS and the 11 rejection
criteria against hand values, the IcePop band against TRL's own code path, invariance to splitting the batch
over processes, and the config errors.

Sources of the hand values (none of their code is reused):
- verl, volcengine/verl commit b178a3cd56f58b2d502255daba591e92833930a7, verl/trainer/ppo/rollout_corr_helper.py:
  log r = old - rollout (line 779) clamped to [-20, 20] (lines 75, 221, 533, 543); sequence ratio exp of the
  masked sum (538-544); SNIS after truncation, over tokens or over responses (562-596); rejection estimators
  k1 = -log r, k2 = (log r)^2 / 2, k3 = e^log r - 1 - log r (222-224), sequence sum / mean / max over the
  response mask (232-243, max of none = 0), inclusive bounds, k1 with lower and upper, k2 / k3 upper only
  (271-331), k1 lower default 1/upper as a ratio (125), the rejection AND-ed into the response mask (339, 371).
- TRL 1.16, trl/trainer/grpo_trainer.py lines 2660-2706 (called for real below).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlclip.errors import ConfigError
from rlclip.is_correction import IS_MODES, check_correction_settings, rollout_correction
from rlclip.objectives.base import Reducer
from rlclip.rejection import REJECTION_METRICS, criterion_statistic, parse_criteria

D = torch.float64
e = math.exp
NAN = float("nan")
CAP, FLOOR = 3.0, 0.65

# d = prox - sampler, dyadic so that every boundary below is exact:
#   row 0: [0.5, -1.0, 0.0] + a padded token (d would be 4.3: it must count nowhere)
#   row 1: [0.0, 1.875, -0.5, 0.0]
#   row 2: [-1.0, NaN -> 0.0 (no sampler log-prob: ratio 1), 0.625, 0.0]
PROX = torch.tensor([[-1.0, -2.0, -0.5, -0.7], [-0.25, -0.125, -4.0, -1.0], [-1.25, -0.5, -0.875, -2.0]], dtype=D)
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5, -5.0], [-0.25, -2.0, -3.5, -1.0], [-0.25, NAN, -1.5, -2.0]], dtype=D)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=D)
COUNTED = MASK.bool()
D_ROWS = [[0.5, -1.0, 0.0], [0.0, 1.875, -0.5, 0.0], [-1.0, 0.0, 0.625, 0.0]]  # counted tokens only
# sequence ratios: e^-0.5 = 0.607 (below the floor), e^1.375 = 3.96 (above the cap), e^-0.375 = 0.687 (inside)

WITH_FLOOR = {
    "token_truncate": [[e(0.5), FLOOR, 1.0, 1.0], [1.0, CAP, FLOOR, 1.0], [FLOOR, 1.0, e(0.625), 1.0]],
    "token_mask": [[e(0.5), 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, e(0.625), 1.0]],
    "sequence_truncate": [[FLOOR] * 4, [CAP] * 4, [e(-0.375)] * 4],
    "sequence_mask": [[0.0] * 4, [0.0] * 4, [e(-0.375)] * 4],
    "none": [[1.0] * 4] * 3,
}


def correct(mode="token_truncate", floor=None, batch_normalize=False, rejection=(), reduce=None, rows=slice(None)):
    return rollout_correction(PROX[rows], SAMPLER[rows], MASK[rows], mode=mode, cap=CAP, floor=floor,
                              batch_normalize=batch_normalize, rejection=rejection, reduce=reduce)


def on_counted(t: torch.Tensor) -> torch.Tensor:
    return t[COUNTED]


@pytest.mark.parametrize("mode", [m for m in IS_MODES if m != "none"])
def test_each_mode_with_a_floor_by_hand(mode):
    """Truncate: clamp to [F, C]; mask: zero outside [F, C] (IcePop's band); sequence modes on exp(sum d)."""
    weights, keep, m = correct(mode, floor=FLOOR)
    torch.testing.assert_close(weights, torch.tensor(WITH_FLOOR[mode], dtype=D), rtol=1e-12, atol=0)
    assert not weights.requires_grad and keep.eq(1).all()
    units = 3 if mode.startswith("sequence") else 11
    floored = 1 if mode.startswith("sequence") else 3  # e^-1 twice and e^-0.5 are below 0.65
    assert m["rollout/is_floored_frac"] == pytest.approx(floored / units, rel=1e-12)
    assert m["rollout/is_capped_frac"] == pytest.approx(1 / units, rel=1e-12)


def test_the_floor_is_kept_inclusive_in_mask_modes_and_changes_nothing_at_zero():
    ratio_half = torch.tensor([[math.log(0.5), 0.0]], dtype=D)  # ratio exactly 0.5 on the first token
    weights, _, _ = rollout_correction(ratio_half, torch.zeros_like(ratio_half), torch.ones_like(ratio_half),
                                       mode="token_mask", cap=CAP, floor=0.5)
    assert weights[0, 0].item() == 0.5  # r == F is kept, as TRL's `ratio < clip_min` and verl's `>=`
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        torch.testing.assert_close(correct(mode, floor=0.0)[0], correct(mode)[0], rtol=0, atol=0)


# ------------------------------------------------------------------ self-normalised IS (verl lines 568-596)

SNIS_MEANS = {  # after cap and floor; over the 11 counted tokens (token modes) or the 3 responses (sequence)
    "token_truncate": (e(0.5) + FLOOR + 1 + 1 + CAP + FLOOR + 1 + FLOOR + 1 + e(0.625) + 1) / 11,
    "token_mask": (e(0.5) + 0 + 1 + 1 + 0 + 0 + 1 + 0 + 1 + e(0.625) + 1) / 11,
    "sequence_truncate": (FLOOR + CAP + e(-0.375)) / 3,
    "sequence_mask": (0 + 0 + e(-0.375)) / 3,
}


@pytest.mark.parametrize("mode", list(SNIS_MEANS))
def test_snis_divides_by_the_mean_after_the_cap_over_tokens_or_responses(mode):
    weights, _, m = correct(mode, floor=FLOOR, batch_normalize=True)
    expected = torch.tensor(WITH_FLOOR[mode], dtype=D) / SNIS_MEANS[mode]
    torch.testing.assert_close(on_counted(weights), on_counted(expected), rtol=1e-12, atol=0)
    assert m["rollout/is_batch_norm_factor"] == pytest.approx(SNIS_MEANS[mode], rel=1e-12)
    if mode.startswith("token"):
        assert on_counted(weights).mean().item() == pytest.approx(1.0, rel=1e-12)
        assert weights[0, 3].item() == 1.0  # padding keeps weight 1 in token modes


def test_snis_skips_a_mean_below_1e_8_and_ignores_rejection():
    weights, _, m = correct("sequence_mask", floor=2.0, batch_normalize=True)  # every response is zeroed
    assert weights.abs().max().item() == 0.0 and m["rollout/is_batch_norm_factor"] == 1.0
    plain, _, _ = correct("token_truncate", batch_normalize=True)
    rejected, keep, _ = correct("token_truncate", batch_normalize=True, rejection=[{"metric": "token_k1", "upper": 0.5}])
    assert keep.eq(0).any()
    torch.testing.assert_close(rejected, plain, rtol=0, atol=0)  # verl: weights on the unmodified mask


# ------------------------------------------------------------------ the 11 rejection statistics (verl 221-331)

k3 = lambda d: e(d) - 1 - d  # noqa: E731
ROW_K = {
    "k1": [[-d for d in row] for row in D_ROWS],
    "k2": [[d * d / 2 for d in row] for row in D_ROWS],
    "k3": [[k3(d) for d in row] for row in D_ROWS],
}


def seq_by_hand(metric: str) -> list[float]:
    reduction, estimator = metric.split("_")[1], metric[-2:]
    rows = ROW_K[estimator]
    if reduction == "sum":
        return [sum(r) for r in rows]
    if reduction == "mean":
        return [sum(r) / len(r) for r in rows]  # the NaN token of row 2 counts, with k = 0
    return [max(r) for r in rows]


@pytest.mark.parametrize("metric", REJECTION_METRICS)
def test_each_statistic_by_hand(metric):
    (criterion,) = parse_criteria([{"metric": metric, "upper": 1.0}])
    d = torch.where(COUNTED & ~SAMPLER.isnan(), PROX - SAMPLER, torch.zeros_like(PROX))
    stat = criterion_statistic(criterion, d, COUNTED)
    if metric.startswith("token"):
        expected = [v for row in ROW_K[metric[-2:]] for v in row]
        torch.testing.assert_close(on_counted(stat), torch.tensor(expected, dtype=D), rtol=1e-12, atol=1e-15)
    else:
        torch.testing.assert_close(stat.squeeze(-1), torch.tensor(seq_by_hand(metric), dtype=D), rtol=1e-12,
                                   atol=1e-15)


# Each criterion, its bounds and the counted tokens it keeps (padding at [0, 3] stays 1 in `keep`).
# Statistic values per row are in the comments (derived from D_ROWS).
KEEPS = [
    # k1 = -d: [-.5, 1, 0] [0, -1.875, .5, 0] [1, 0, -.625, 0]; lower defaults to -upper; bounds inclusive
    ({"metric": "token_k1", "upper": 0.5}, [[1, 0, 1, 1], [1, 0, 1, 1], [0, 1, 0, 1]]),
    ({"metric": "token_k1", "lower": -2.0, "upper": 0.75}, [[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]),
    # k2: [.125, .5, 0] [0, 1.758, .125, 0] [.5, 0, .195, 0]
    ({"metric": "token_k2", "upper": 0.2}, [[1, 0, 1, 1], [1, 0, 1, 1], [0, 1, 1, 1]]),
    # k3: [.149, .368, 0] [0, 3.65, .107, 0] [.368, 0, .243, 0]
    ({"metric": "token_k3", "upper": 0.12}, [[0, 0, 1, 1], [1, 0, 1, 1], [0, 1, 0, 1]]),
    ({"metric": "seq_sum_k1", "upper": 0.5}, [1, 0, 1]),  # .5 (kept: inclusive), -1.375, .375
    ({"metric": "seq_mean_k1", "lower": -0.5, "upper": 0.1}, [0, 1, 1]),  # .167, -.344, .094
    ({"metric": "seq_sum_k2", "upper": 0.65}, [1, 0, 0]),  # .625, 1.883, .695
    ({"metric": "seq_mean_k2", "upper": 0.2}, [0, 0, 1]),  # .208, .471, .174
    ({"metric": "seq_sum_k3", "upper": 0.6}, [1, 0, 0]),  # .517, 3.75, .611
    ({"metric": "seq_mean_k3", "upper": 0.16}, [0, 0, 1]),  # .172, .938, .153 (row 2 divides by 4)
    ({"metric": "seq_max_k2", "upper": 0.5}, [1, 0, 1]),  # .5, 1.758, .5 (the padded d = 4.3 would be 9.2)
    ({"metric": "seq_max_k3", "upper": 0.368}, [1, 0, 1]),  # .3679, 3.65, .3679
]


def expected_keep(rows) -> torch.Tensor:
    if isinstance(rows[0], list):
        return torch.tensor(rows, dtype=D)
    keep = torch.tensor(rows, dtype=D)[:, None].expand(3, 4).clone()
    keep[0, 3] = 1.0  # off the mask
    return keep


@pytest.mark.parametrize("criterion, rows", KEEPS, ids=[f"{c['metric']}-{i}" for i, (c, _) in enumerate(KEEPS)])
def test_each_rejection_criterion_by_hand(criterion, rows):
    weights, keep, m = correct("none", rejection=[criterion])
    want = expected_keep(rows)
    torch.testing.assert_close(keep, want, rtol=0, atol=0)
    assert keep.dtype == D and weights.eq(1).all()
    dropped = float(((1 - want) * MASK).sum())
    assert m[f"rollout/rejected_frac/{criterion['metric']}"] == pytest.approx(dropped / 11, rel=1e-12)


def test_criteria_chain_as_and_and_their_fractions_are_each_alone():
    chain = [{"metric": "token_k1", "upper": 0.5}, {"metric": "seq_max_k3", "upper": 0.368}]
    _, keep, m = correct("sequence_truncate", rejection=chain)
    torch.testing.assert_close(keep, torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]], dtype=D))
    _, reverse, _ = correct("sequence_truncate", rejection=chain[::-1])
    assert torch.equal(keep, reverse)  # every criterion sees the original tokens: order is irrelevant
    assert m["rollout/rejected_frac/token_k1"] == pytest.approx(4 / 11)
    assert m["rollout/rejected_frac/seq_max_k3"] == pytest.approx(4 / 11)
    assert m["rollout/rejected_frac/total"] == pytest.approx(7 / 11)
    assert m["rollout/rejected_seq_frac"] == pytest.approx(1 / 3)


def test_statistics_by_hand():
    _, _, m = correct("token_truncate", floor=FLOOR)
    w = [e(0.5), FLOOR, 1, 1, CAP, FLOOR, 1, FLOOR, 1, e(0.625), 1]
    scored = [0.5, -1.0, 0.0, 0.0, 1.875, -0.5, 0.0, -1.0, 0.625, 0.0]  # the NaN token left out
    assert m["rollout/is_weight_mean"] == pytest.approx(sum(w) / 11, rel=1e-12)
    assert (m["rollout/is_weight_min"], m["rollout/is_weight_max"]) == (FLOOR, CAP)
    assert m["rollout/is_ess_frac"] == pytest.approx(sum(w) ** 2 / (11 * sum(x * x for x in w)), rel=1e-12)
    assert m["rollout/is_ratio_min"] == pytest.approx(e(-1.0), rel=1e-12)
    assert m["rollout/is_ratio_max"] == pytest.approx(e(1.875), rel=1e-12)
    assert m["rollout/sampler_kl_k1"] == pytest.approx(sum(-d for d in scored) / 10, rel=1e-12)
    assert m["rollout/sampler_kl_k2"] == pytest.approx(sum(d * d / 2 for d in scored) / 10, rel=1e-12)
    assert m["rollout/sampler_kl_k3"] == pytest.approx(sum(k3(d) for d in scored) / 10, rel=1e-12)
    assert m["rollout/sampler_kl"] == m["rollout/sampler_kl_k3"]
    assert not any(k.startswith("rollout/rejected") or k == "rollout/is_batch_norm_factor" for k in m)


# ------------------------------------------------------------------ the same results split over 2 processes


class TwoProcesses:
    """A fake all-reduce for two "processes" run as threads: each posts its tensor and gets the combination."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=30)
        self.slots: list[torch.Tensor | None] = [None, None]

    def reducer(self, rank: int) -> Reducer:
        outer = self

        class Rank(Reducer):
            def _exchange(self, tensor, op):
                outer.slots[rank] = tensor
                outer.barrier.wait()
                other = outer.slots[1 - rank]
                outer.barrier.wait()
                return op(tensor, other)

            def sum(self, tensor):
                return self._exchange(tensor, torch.add)

            def min(self, tensor):
                return self._exchange(tensor, torch.minimum)

            def max(self, tensor):
                return self._exchange(tensor, torch.maximum)

        return Rank()


SPLIT_CASES = [(mode, True, []) for mode in SNIS_MEANS] + [("token_mask", False, [c]) for c, _ in KEEPS[1:]]
SPLIT_CASES.append(("sequence_truncate", True, [c for c, _ in KEEPS[1:]]))


@pytest.mark.parametrize("mode, snis, rejection", SPLIT_CASES)
def test_two_halves_over_two_processes_equal_the_whole_batch(mode, snis, rejection):
    whole_w, whole_keep, whole_m = correct(mode, FLOOR, snis, rejection)
    world = TwoProcesses()
    halves = [slice(0, 1), slice(1, 3)]
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda r: correct(mode, FLOOR, snis, rejection, world.reducer(r), halves[r]), (0, 1)))
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole_w, rtol=1e-12, atol=0)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_keep)
    for rank in (0, 1):
        assert parts[rank][2].keys() == whole_m.keys()
        for key, value in whole_m.items():
            assert parts[rank][2][key] == pytest.approx(value, rel=1e-12), key
    if snis:  # the halves alone would normalise differently: the test can tell
        alone = correct(mode, FLOOR, snis, rejection, rows=halves[1])[0]
        assert not torch.allclose(alone, whole_w[1:])


# ------------------------------------------------------------------ TRL's own code path for clip_min / clip_max

@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    """A real GRPOTrainer on the tiny model whose generation returns fixed tokens and sampler log-probs, and
    whose behaviour pass returns PROX, so that ``_generate_and_score_completions`` runs TRL's ratio code
    (grpo_trainer.py lines 2660-2706) on our inputs."""
    pytest.importorskip("trl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlclip.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("trl_is")
    args = GRPOConfig(output_dir=str(tmp / "out"), per_device_train_batch_size=3, num_generations=3,
                      max_completion_length=4, report_to="none", use_cpu=True, save_strategy="no", bf16=False,
                      gradient_checkpointing=False, disable_tqdm=True)

    def length(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(model=build_tiny_model(tmp / "tiny"), reward_funcs=length, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b", "c"]}))
    lengths = MASK.sum(-1).long().tolist()
    sampler = [[None if math.isnan(v) else v for v in row[:n]] for row, n in zip(SAMPLER.tolist(), lengths)]

    def generate(prompts):
        ids = [[5] * n for n in lengths]
        return [[7, 8]] * len(prompts), ids, None, ["x" * n for n in lengths], sampler, {}, None, None

    trainer._generate = generate
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (PROX.clone(), None, None)
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    return trainer


@pytest.mark.parametrize("floor", [None, FLOOR])
@pytest.mark.parametrize("mode", ["token_mask", "sequence_mask", "token_truncate", "sequence_truncate"])
def test_band_and_floor_equal_trls_own_code(trl_trainer, mode, floor):
    trl_trainer.vllm_importance_sampling_mode = mode
    trl_trainer.vllm_importance_sampling_clip_min, trl_trainer.vllm_importance_sampling_clip_max = floor, CAP
    out = trl_trainer._generate_and_score_completions([{"prompt": p} for p in "abc"])
    mask = out["completion_mask"].to(D)
    assert torch.equal(mask, MASK)
    sampler = out["sampling_per_token_logps"].to(D)  # TRL's float32 tensor: exact here (dyadic values)
    weights, _, _ = rollout_correction(PROX, sampler, mask, mode=mode, cap=CAP, floor=floor)
    theirs = out["importance_sampling_ratio"].expand_as(PROX)
    torch.testing.assert_close(on_counted(weights), on_counted(theirs), rtol=1e-15, atol=0)
    if floor is not None:
        torch.testing.assert_close(weights, torch.tensor(WITH_FLOOR[mode], dtype=D), rtol=1e-12, atol=0)


# ------------------------------------------------------------------ config errors, one line each


@pytest.mark.parametrize("settings, match", [
    (dict(floor=3.0), r"^rollout.is_floor=3.0 must be below rollout.is_cap=3.0; lower is_floor or raise is_cap$"),
    (dict(floor=5), r"^rollout.is_floor=5 must be below rollout.is_cap=3.0"),
    (dict(floor=-0.1), r"^rollout.is_floor must be >= 0, got -0.1; "),
    (dict(floor=0.5, mode="none"), r"^rollout.is_floor=0.5 has no effect with rollout.is_mode=none"),
    (dict(batch_normalize=True, mode="none"), r"^rollout.is_batch_normalize=true has no effect"),
    (dict(rejection=[{"metric": "token_k4", "upper": 1}]),
     r"^unknown rollout.rejection\[0\].metric 'token_k4'; choose one of token_k1, token_k2, token_k3, seq_sum_k1, "
     r"seq_sum_k2, seq_sum_k3, seq_mean_k1, seq_mean_k2, seq_mean_k3, seq_max_k2, seq_max_k3$"),
    (dict(rejection=[{"metric": "seq_max_k1", "upper": 1}]), r"^unknown rollout.rejection\[0\].metric 'seq_max_k1'"),
    (dict(rejection=[{"upper": 1}]), r"^unknown rollout.rejection\[0\].metric None; choose one of"),
    (dict(rejection=[{"metric": "token_k2", "upper": 0.1}, {"metric": "token_k1", "lower": 0.3, "upper": 0.2}]),
     r"^rollout.rejection\[1\] \(token_k1\): lower=0.3 is above upper=0.2; swap them$"),
    (dict(rejection=[{"metric": "seq_max_k3", "upper": 0.01, "threshold": 2}]),
     r"^rollout.rejection\[0\] has unknown key\(s\) 'threshold'; use metric, lower, upper$"),
    (dict(rejection=[{"metric": "seq_mean_k3"}]),
     r"^rollout.rejection\[0\] \(seq_mean_k3\) needs an upper bound; set rollout.rejection\[0\].upper$"),
    (dict(rejection=[{"metric": "token_k2", "lower": 0.0, "upper": 1.0}]),
     r"^rollout.rejection\[0\].lower is not allowed for token_k2 \(k2 and k3 are >= 0"),
    (dict(rejection=[{"metric": "seq_sum_k3", "upper": 0}]), r"^rollout.rejection\[0\].upper must be > 0 for seq_sum_k3"),
    (dict(rejection=[{"metric": "token_k3", "upper": "a"}]), r"^rollout.rejection\[0\].upper must be a number, got 'a'"),
    (dict(rejection=[{"metric": "token_k3", "upper": 1}, {"metric": "token_k3", "upper": 2}]),
     r"^rollout.rejection lists token_k3 twice \(entries 0 and 1\); keep one criterion per metric$"),
    (dict(rejection=["token_k1"]), r"^rollout.rejection\[0\] must be a mapping \{metric, lower, upper\}, got 'token_k1'"),
    (dict(rejection="token_k1"), r"^rollout.rejection must be a list of \{metric, lower, upper\}, got 'token_k1'"),
    (dict(mode="token", floor=0.5), r"^unknown rollout.is_mode 'token'; choose one of token_truncate"),
    (dict(cap=0.0), r"^rollout.is_cap must be > 0, got 0.0; e.g. 3.0 \(TRL's default\)$"),
])
def test_bad_settings_are_one_line_errors(settings, match):
    args = {"mode": "token_mask", "cap": CAP, "floor": None, "batch_normalize": False, "rejection": ()} | settings
    with pytest.raises(ConfigError, match=match) as err:
        check_correction_settings(args["mode"], args["cap"], args["floor"], args["batch_normalize"], args["rejection"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=match):  # the function itself checks too
        rollout_correction(PROX, SAMPLER, MASK, **args)


@pytest.mark.parametrize("override, match", [
    ("rollout.is_floor=3.0", "rollout.is_floor=3.0 must be below rollout.is_cap=3.0"),
    ("rollout.rejection=[{metric: token_k4, upper: 1}]", r"unknown rollout.rejection\[0\].metric 'token_k4'"),
    ("rollout.rejection=[{metric: token_k1, lower: 0.2, upper: 0.1}]", r"lower=0.2 is above upper=0.1"),
    ("rollout.rejection=[{metric: seq_max_k3, upper: 0.01, thresh: 1}]", r"unknown key\(s\) 'thresh'"),
])
def test_config_loading_refuses_them_in_one_line(root, override, match):
    from rlclip.config import load_config

    with pytest.raises(ConfigError, match=match) as err:
        load_config(root / "recipes/smoke/tiny.yaml", [override])
    assert "\n" not in str(err.value)


def test_valid_settings_resolve_verls_defaults(root):
    from rlclip.config import load_config

    rollout = load_config(root / "recipes/smoke/tiny.yaml", [
        "rollout.is_floor=0.5", "rollout.is_batch_normalize=true",
        "rollout.rejection=[{metric: token_k1, upper: 0.2}, {metric: seq_max_k3, upper: 0.01}]"]).rollout
    first, second = parse_criteria(rollout.rejection)
    assert (first.lower, first.upper) == (-0.2, 0.2) and (second.lower, second.upper) == (None, 0.01)
