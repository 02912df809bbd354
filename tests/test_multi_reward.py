"""``advantage.multi_reward``: ``sum_then_normalize`` (default, GRPO on the weighted sum) and
``normalize_then_sum`` (GDPO, arXiv 2601.05242).

Peer oracle: TRL 1.16 as installed, trl/trainer/grpo_trainer.py, ``GRPOTrainer._generate_and_score_completions``
(the ``multi_objective_aggregation`` branches, lines 2759-2814 of the installed file: from
``unscorable_mask = ...`` to ``advantages = torch.nan_to_num(advantages, nan=0.0)``). That block is inline
in a method that also generates, so ``trl_advantages`` runs TRL's own source text of it (read with
``inspect`` from the installed package, not copied here) on our rewards, with a stand-in ``self`` holding
the four attributes it reads. verl's ``gdpo`` estimator (github.com/verl-project/verl
1dda039b9c6311889a9c9a26040677e1254814f9, verl/trainer/ppo/core_algos.py lines 361-457) does the same
steps but whitens over tokens (``masked_whiten``), not completions; see docs/conventions.md.
"""

from __future__ import annotations

import inspect
import math
import textwrap
import threading
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from rlclip.advantages import batch_normalize, group_advantages, grpo, normalize_then_sum
from rlclip.errors import ConfigError
from rlclip.rewards import completion_text, compute_reward_table

D = torch.float64


def trl_block() -> str:
    """TRL's advantage block, dedented, from the installed ``_generate_and_score_completions``."""
    from trl.trainer import grpo_trainer

    src = inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions)
    start = src.index("unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)")
    end = src.index("\n", src.index("advantages = torch.nan_to_num(advantages, nan=0.0)"))
    block = textwrap.dedent(src[src.rindex("\n", 0, start) + 1:end])
    assert '"normalize_then_sum"' in block and '"sum_then_normalize"' in block  # both branches are in it
    return block


def trl_advantages(rewards_per_func: torch.Tensor, weights, group_size: int, mode: str) -> torch.Tensor:
    """TRL 1.16's advantages for ``rewards_per_func [N, F]`` (NaN: the function returned None)."""
    from trl.trainer import grpo_trainer

    stand_in = SimpleNamespace(multi_objective_aggregation=mode, scale_rewards="group",
                               reward_weights=torch.tensor(weights, dtype=torch.float32),
                               reward_funcs=[None] * len(weights))
    scope = {"torch": torch, "nanstd": grpo_trainer.nanstd, "self": stand_in, "device": "cpu",
             "rewards_per_func": rewards_per_func.float(), "num_generations": group_size}
    exec(trl_block(), scope)  # noqa: S102 - TRL's own code, read from the installed package
    return scope["advantages"]


# completions of 3 prompts x 4; two reward functions on different scales, one of which sometimes returns None
ACCURACY = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
LENGTH = [0.2, 0.9, None, 0.4, 0.5, None, None, 0.1, 0.3, 0.8, 0.6, None]
NONE_BOTH = {10}  # completion 10: neither function scores it (unscorable)


def accuracy(prompts, completions, **_):
    return [None if i in NONE_BOTH else v for i, v in enumerate(ACCURACY)]


def length(prompts, completions, **_):
    return [None if i in NONE_BOTH else v for i, v in enumerate(LENGTH)]


def rlclip_inputs(weights):
    """rlclip's scoring of the two functions (compute_reward_table, as score_rollout): the sum and the table."""
    n = len(ACCURACY)
    total, table, _ = compute_reward_table([accuracy, length], weights, ["p"] * n, ["c"] * n, {})
    return total, table


@pytest.mark.parametrize("mode", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 0.5]])
def test_equals_trl(mode, weights):
    total, table = rlclip_inputs(weights)
    ours = group_advantages(total, 4, SimpleNamespace(name="grpo", eps=1e-4, multi_reward=mode), table, weights)
    want = trl_advantages(table, weights, 4, mode)
    torch.testing.assert_close(ours, want, atol=2e-6, rtol=1e-5)
    assert ours[10] == 0  # unscorable: no advantage in either library
    assert ours.abs().max() > 0.5  # the batch has signal, so equality is not 0 == 0


def test_the_two_modes_differ():
    total, table = rlclip_inputs([1.0, 1.0])
    a = group_advantages(total, 4, SimpleNamespace(name="grpo", eps=1e-4), table, [1.0, 1.0])  # default
    b = group_advantages(total, 4, SimpleNamespace(name="grpo", eps=1e-4, multi_reward="normalize_then_sum"),
                         table, [1.0, 1.0])
    assert (a - b).abs().max() > 0.1


def test_normalize_then_sum_hand_values():
    """Two prompts of two completions, two functions, eps 0.

    Function 1: groups (1, 0) and (1, 1): A = (+1/sqrt2, -1/sqrt2) [(r - 0.5) / 0.7071, unbiased std], and (0, 0).
    Function 2: groups (0, 2) and (3, 1): A = (-1/sqrt2, +1/sqrt2) and (+1/sqrt2, -1/sqrt2).
    Weights (1, 2): s = (1/sqrt2 - 2/sqrt2, -1/sqrt2 + 2/sqrt2, 2/sqrt2, -2/sqrt2) = (-a, a, 2a, -2a), a = 1/sqrt2.
    Batch: mean 0, unbiased std = sqrt((a^2 + a^2 + 4a^2 + 4a^2) / 3) = a sqrt(10/3); A = s / std
    = (-1, 1, 2, -2) / sqrt(10/3) = (-0.5477226, 0.5477226, 1.0954451, -1.0954451).
    """
    table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 3.0], [1.0, 1.0]], dtype=D)
    got = normalize_then_sum(table, [1.0, 2.0], 2, eps=0.0)
    want = torch.tensor([-1.0, 1.0, 2.0, -2.0], dtype=D) / math.sqrt(10 / 3)
    torch.testing.assert_close(got, want)


def test_one_function_is_grpo_then_batch_whitening():
    """Reduction: with one reward function, normalize_then_sum = the batch whitening of GRPO's advantages."""
    g = torch.Generator().manual_seed(1)
    r = torch.rand(16, generator=g, dtype=D).round()
    r[3] = math.nan
    got = normalize_then_sum(r.unsqueeze(1), [1.0], 4)
    want = batch_normalize(grpo(r, 4), ~r.isnan())
    torch.testing.assert_close(got, want)
    assert got[3] == 0


def test_batch_normalize_over_processes_equals_one_process():
    """Two 'processes' (threads) whose all_sum adds both shares: the same advantages as the whole batch."""
    g = torch.Generator().manual_seed(2)
    values, valid = torch.randn(12, generator=g, dtype=D), torch.rand(12, generator=g) > 0.2
    whole = batch_normalize(values, valid)
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def run(rank):
        def all_sum(t):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before the next call overwrites
            return total

        part = slice(rank * 6, (rank + 1) * 6)
        results[rank] = batch_normalize(values[part], valid[part], all_sum=all_sum)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(results), whole)
    assert not torch.equal(results[0], batch_normalize(values[:6], valid[:6]))  # local stats would differ


def test_sum_then_normalize_is_todays_grpo():
    total, table = rlclip_inputs([1.0, 0.5])
    for name, kwargs in (("grpo", {"eps": 1e-4}), ("dr_grpo", {}), ("rloo", {})):
        from rlclip.advantages import GROUP_ESTIMATORS

        got = group_advantages(total, 4, SimpleNamespace(name=name, eps=1e-4), table, [1.0, 0.5])
        torch.testing.assert_close(got, GROUP_ESTIMATORS[name](total, 4, **kwargs))


def test_unscored_rows_leave_every_statistic():
    """A row whose weighted sum is NaN (unscored, or a failed function under on_error=skip) is out of the
    per-function group statistics too: its table row is NaN."""
    total, table = rlclip_inputs([1.0, 1.0])
    assert bool(table[10].isnan().all()) and math.isnan(total[10])
    table[1, 0] = 5.0  # a score left in the table of an unscored row must not count
    total[1] = math.nan
    cfg = SimpleNamespace(name="grpo", eps=1e-4, multi_reward="normalize_then_sum")
    got = group_advantages(total, 4, cfg, table, [1.0, 1.0])
    cleaned = table.clone()
    cleaned[1] = math.nan
    torch.testing.assert_close(got, group_advantages(total, 4, cfg, cleaned, [1.0, 1.0]))
    assert got[1] == 0


def test_config_choices_and_gae_refusal(tmp_path):
    with pytest.raises(ConfigError, match="unknown advantage.multi_reward 'gdpo'; choose sum_then_normalize or "
                                          "normalize_then_sum"):
        tiny_config(tmp_path, "advantage.multi_reward=gdpo")
    with pytest.raises(ConfigError, match="use a group estimator") as err:
        tiny_config(tmp_path, "advantage.name=gae", "advantage.multi_reward=normalize_then_sum")
    assert "\n" not in str(err.value)
    assert tiny_config(tmp_path).advantage.multi_reward == "sum_then_normalize"


def test_trains_through_the_trainer(tmp_path):
    """Two reward functions (one returns None for some completions) with normalize_then_sum: the trainer's
    advantages are normalize_then_sum of the rollout's per-function scores."""
    from rlclip.trainer import Trainer

    def variety(prompts, completions, **_):  # rewards that vary within groups, even for a random tiny model
        return [float(len(set(completion_text(c))) % 3) for c in completions]

    def checksum(prompts, completions, **_):
        return [None if i % 5 == 0 else float(sum(map(ord, completion_text(c))) % 7)
                for i, c in enumerate(completions)]

    cfg = tiny_config(tmp_path, "max_steps=2", "save_steps=0", "advantage.multi_reward=normalize_then_sum",
                      "train.num_iterations=1")
    trainer = Trainer(cfg, reward_funcs=[variety, checksum], reward_weights=[1.0, 0.5])
    seen = []
    estimate = trainer.estimate_advantages

    def spy(rollout):
        out = estimate(rollout)
        seen.append((rollout.rewards_per_func.clone(), rollout.advantages[:, 0].clone(), rollout.group_ids.clone()))
        return out

    trainer.estimate_advantages = spy
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2]
    table, adv, groups = seen[0]
    assert table.shape == (32, 2) and bool(table[::5, 1].isnan().all())
    assert groups.tolist() == [i // 8 for i in range(32)]
    torch.testing.assert_close(adv, normalize_then_sum(table, [1.0, 0.5], 8))
    assert adv.abs().max() > 0
