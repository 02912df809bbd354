"""One optimizer step is the same whatever the micro-batching and number of processes.

micro-batch 4 x accumulation 1 == micro-batch 1 x accumulation 4 == 2 processes x
micro-batch 2, to 1e-6 in every parameter (plain SGD, no clipping, so any error
in the loss normalisation shows up in the update), for ratio_clip and for the
objectives whose statistics span the optimizer step. The 1-process runs happen
in the test process; the 2-process run is the suite's one ``accelerate launch
--multi_gpu`` on CPU (gloo), which also trains two steps in GRPO mode and two
in PPO mode (critic, GAE with globally whitened advantages).
"""

from __future__ import annotations

import functools
import json
import math
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from one_step import CASES, correction_once, step_once  # noqa: E402

pytestmark = pytest.mark.xdist_group("two_process")  # one worker runs the suite's 2-process launch
step = functools.lru_cache(step_once)  # each 1-process step is computed once per session


@pytest.fixture(scope="module", params=sorted(CASES))
def case_results(request, two_process):
    case = request.param
    return case, {"micro4": step(4, case), "micro1": step(1, case),
                  "dist2": torch.load(two_process / f"step_{case}.pt")}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def test_step_changes_parameters(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlclip.tiny import build_tiny_model

    init = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "init"))
    after = step(4, "default")
    moved = max((after["params"][n] - p).abs().max().item() for n, p in init.named_parameters())
    assert moved > 1e-4  # the step does something, so equality below is meaningful
    assert after["metrics"]["objective/clip_frac_low"] > 0 or after["metrics"]["objective/clip_frac_high"] > 0


def test_micro_batch_and_two_process_invariance(case_results):
    case, res = case_results
    for other in ("micro1", "dist2"):
        assert_same_params(res["micro4"]["params"], res[other]["params"])
        assert res["micro4"]["metrics"]["loss"] == pytest.approx(res[other]["metrics"]["loss"], abs=1e-6)
    if case.startswith("archer"):
        assert res["micro4"]["metrics"]["objective/kl_knowledge"] > 0


def test_two_process_training(two_process):
    run_info = json.loads((two_process / "train.json").read_text())
    assert run_info["world_size"] == 2 and run_info["grpo"] == [1, 2] and run_info["ppo"] == [1, 2]
    assert math.isfinite(run_info["ppo_explained_variance"])


def test_two_process_runs_print_banner_and_summary_once(two_process):
    """Rank 1 says nothing: each run's start banner and end summary appear exactly once."""
    lines = (two_process / "launch_stderr.log").read_text().splitlines()
    banners = [x for x in lines if x.startswith("rlclip: start: ")]
    summaries = [x for x in lines if x.startswith("rlclip: done: ")]
    outputs = [x for x in lines if x.startswith("model: ")]
    assert len(banners) >= 2 and len(summaries) >= 2  # the GRPO and PPO runs at least
    assert "2 process(es)" in banners[0]
    assert len(set(banners)) == len(banners) and len(set(outputs)) == len(outputs) == len(summaries)


def test_entropy_bonus_moves_the_step(monkeypatch):
    """The entropy_bonus case differs from the same step without the bonus (so its invariance means something)."""
    with_bonus = step(4, "entropy_bonus")["params"]
    monkeypatch.setitem(CASES, "no_bonus", [c for c in CASES["entropy_bonus"] if not c.startswith("entropy.")])
    without = step_once(4, "no_bonus")["params"]
    assert max((with_bonus[n] - without[n]).abs().max().item() for n in without) > 1e-4


def test_two_process_compare_pools_every_held_out_problem_in_order(two_process):
    """Each rank scores its share of the 5 problems; the result holds all 5 in the held-out order, once."""
    from rlclip.compare import RESULT_NAME
    from rlclip.config import load_config
    from rlclip.periodic_eval import held_out_records

    summary = json.loads((two_process / "compare" / "compare.json").read_text())
    assert [row["seeds"] for row in summary["objectives"]] == [[0, 1]]
    for seed in (0, 1):
        directory = two_process / "compare" / f"ratio_clip-seed{seed}"
        result = json.loads((directory / RESULT_NAME).read_text())
        rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        config = load_config(directory / "config.yaml")
        from rlclip.data import load_records

        expected = [r["question"] for r in held_out_records(config, load_records(config.data, config.seed))]
        assert result["problems"] == expected and len(result["correct"]) == 5
        assert result["accuracy"] == rows[-1]["eval/accuracy"] and [r["step"] for r in rows] == [1, 2]
    lines = (two_process / "launch_stderr.log").read_text().splitlines()
    assert sum(line.startswith("[compare] (1/2) ratio_clip-seed0") for line in lines) == 1  # rank 0 speaks


def test_snis_and_rejection_over_two_processes_equal_one_process(two_process):
    """The rollout correction's batch statistics (SNIS's mean, each criterion's fractions) are global: rank 0's
    half, corrected with statistics across 2 processes, equals the first half of the 1-process correction."""
    whole = correction_once(None)
    dist = torch.load(two_process / "correction_rank0.pt")
    for case, ours in whole.items():
        theirs = dist[case]
        torch.testing.assert_close(theirs["weights"], ours["weights"][:4], atol=1e-12, rtol=0, msg=case)
        torch.testing.assert_close(theirs["keep"], ours["keep"][:4], atol=0, rtol=0, msg=case)
        assert theirs["metrics"] == pytest.approx(ours["metrics"], abs=1e-12), case
        assert ours["metrics"]["rollout/is_batch_norm_factor"] != 1.0  # SNIS acts
        assert 0 < ours["metrics"]["rollout/rejected_frac/total"] < 1  # some tokens go, some stay
        assert bool((ours["keep"][4:] != 1).any())  # rank 1's rows matter to rank 0's statistics
