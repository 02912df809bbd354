"""rlclip objectives inside TRL's GRPOTrainer (rlclip.integrations.trl), on the tiny model, offline, CPU."""

from __future__ import annotations

import gc
import math
import os
import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("trl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rlclip.errors import ConfigError  # noqa: E402
from rlclip.integrations.trl import (  # noqa: E402
    SUPPORTED_TRL,
    ObjectiveGRPOTrainer,
    check_trl_version,
    resolve_objective,
    rlclip_objective_loss,
)
from rlclip.objectives import build_objective  # noqa: E402
from rlclip.objectives.base import available_objectives  # noqa: E402
from rlclip.tiny import build_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def frozen_gc():
    """Keep the imported libraries out of garbage collection: each ``train()`` ends with a full
    ``gc.collect()`` (accelerate's ``free_memory``), which otherwise walks ~0.5M objects every time."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)]})


def distinct_chars(prompts, completions, **columns):
    """A deterministic reward with spread on a random model: the number of distinct characters."""
    return [float(len(set(c))) for c in completions]


def make_args(tmp_path: Path, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=6, max_steps=2, num_iterations=2, learning_rate=0.05, optim="sgd",
                    report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
                    disable_tqdm=True, gradient_checkpointing=False,
                    bf16=False)  # fp32: TRL's default bf16 autocast is too coarse for 1e-6
    settings.update(overrides)
    return GRPOConfig(**settings)


def adapter(tiny, dataset, args, objective) -> ObjectiveGRPOTrainer:
    return ObjectiveGRPOTrainer(model=tiny, reward_funcs=distinct_chars, args=args, train_dataset=dataset,
                                objective=objective)


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def assert_same_params(a: dict, b: dict, atol: float = 1e-6) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def train_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------- every objective trains


@pytest.mark.parametrize("name", available_objectives())
def test_each_objective_trains_two_steps(tiny, dataset, tmp_path, name):
    trainer = adapter(tiny, dataset, make_args(tmp_path), name)
    before = params(trainer)
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(before[k], v) for k, v in params(trainer).items()), "no parameter moved"
    logged = {k for h in trainer.state.log_history for k in h}
    assert any(k.startswith("objective/") for k in logged), logged


# ---------------------------------------------------------------- equivalence with TRL's own loss


def fixed_inputs(trainer, seed: int = 0) -> dict:
    """A batch in TRL's layout with spread ratios (old = current + noise) so both clip sides are active."""
    gen = torch.Generator().manual_seed(seed)
    tok = trainer.processing_class
    prompts = tok(["1+2=", "3+4=5", "7=", "2+2+2="], return_tensors="pt", padding=True, padding_side="left")
    completion_ids = torch.randint(3, len(tok), (4, 6), generator=gen)  # [B, T]
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    inputs = {"prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"],
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": torch.randn(4, generator=gen), "num_items_in_batch": completion_mask.sum()}
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], completion_ids], 1),
            torch.cat([inputs["prompt_mask"], completion_mask], 1), completion_ids.size(1))
    inputs["old_per_token_logps"] = current + 0.6 * torch.randn(current.shape, generator=gen)  # [B, T]
    return inputs


def loss_and_grads(trainer, compute) -> tuple[torch.Tensor, dict]:
    trainer.model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_ratio_clip_loss_and_gradient_equal_trl(tiny, dataset, tmp_path, loss_type):
    args = make_args(tmp_path, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28)
    with pytest.warns(UserWarning, match="epsilon"):
        trainer = adapter(tiny, dataset, args, {"name": "ratio_clip", "eps_low": 0.2, "eps_high": 0.28})
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # exercises TRL's accumulation normalisers
    inputs = fixed_inputs(trainer)
    trl_loss, trl_grads = loss_and_grads(trainer, lambda: GRPOTrainer._compute_loss(trainer, trainer.model, inputs))
    loss, grads = loss_and_grads(trainer, lambda: trainer._compute_loss(trainer.model, inputs))
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == trl_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-6, rtol=1e-5)
    metrics = trainer._metrics["train"]
    assert metrics["objective/clip_frac_low"][-1] > 0 and metrics["objective/clip_frac_high"][-1] > 0
    assert trainer.objective.agg == {"dapo": "token_mean", "bnpo": "token_mean", "grpo": "seq_mean_token_mean",
                                     "dr_grpo": "seq_mean_token_sum_norm"}[loss_type]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_ratio_clip_trains_like_trl(tiny, dataset, tmp_path, loss_type):
    """Two optimizer steps (mu = 2, so the second is off-policy): same losses and parameters as TRL's own."""
    trl_trainer = GRPOTrainer(model=tiny, reward_funcs=distinct_chars, train_dataset=dataset,
                              args=make_args(tmp_path / "trl", loss_type=loss_type, epsilon=0.2, epsilon_high=0.28))
    start = params(trl_trainer)
    trl_trainer.train()
    ours = adapter(tiny, dataset, make_args(tmp_path / "ours", loss_type=loss_type),
                   {"name": "ratio_clip", "eps_low": 0.2, "eps_high": 0.28})
    ours.train()
    assert train_losses(ours) == pytest.approx(train_losses(trl_trainer), abs=1e-6)
    assert_same_params(params(ours), params(trl_trainer))
    assert any(not torch.equal(start[k], v) for k, v in params(ours).items())


def test_user_subclass_with_rlclip_objective_loss(tiny, dataset, tmp_path):
    class MyTrainer(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            return rlclip_objective_loss(self, inputs, {"name": "pspo", "alpha": 0.2}, model=model)

    trainer = MyTrainer(model=tiny, reward_funcs=distinct_chars, train_dataset=dataset,
                        args=make_args(tmp_path, max_steps=1))
    trainer.train()
    assert any("objective/smoothed_ratio_mean" in h for h in trainer.state.log_history)


# ---------------------------------------------------------------- TROLL, gradient accumulation


def test_troll_sees_recorded_support(tiny, dataset, tmp_path):
    # TRL's default gradient checkpointing on: rlclip.policy's support pass runs under it
    args = make_args(tmp_path, gradient_checkpointing=True)
    trainer = adapter(tiny, dataset, args, {"name": "troll", "kl_bound": 0.001})
    seen = []
    surrogate = trainer.objective.surrogate

    def spy(batch):
        gap = (batch.logprobs - batch.old_logprobs).detach().abs().max()  # 0 while on-policy
        seen.append((int(batch.support_mask.sum()), float(gap)))
        return surrogate(batch)

    trainer.objective.surrogate = spy
    trainer.train()
    assert len(seen) == 2
    assert all(size > 0 for size, _ in seen)
    assert seen[0][1] < 1e-5 < seen[1][1]  # step 1 on-policy, step 2 after an update (mu = 2)
    assert "rlclip_old_support_indices" in trainer._buffered_inputs[0]
    assert any(h.get("objective/projected_frac", 0) > 0 for h in trainer.state.log_history)


def test_gradient_accumulation_2x2_equals_4x1(tiny, dataset, tmp_path):
    """Archer: its default KL also needs the reference model and step-wide token counts (step statistics
    over the accumulation window), on top of TRL's token-mean over the window (loss_type dapo)."""
    runs = []
    for batch, accum in ((2, 2), (4, 1)):
        args = make_args(tmp_path / f"{batch}x{accum}", per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accum)
        trainer = adapter(tiny, dataset, args, "archer")
        trainer.train()
        runs.append(trainer)
    assert_same_params(params(runs[0]), params(runs[1]))
    assert train_losses(runs[0]) == pytest.approx(train_losses(runs[1]), abs=1e-6)


# ---------------------------------------------------------------- errors, versions, aggregation


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"use_liger_kernel": True}, "use_liger_kernel"),
    ({"loss_type": "sapo"}, "loss_type='sapo'"),
    ({"loss_type": "cispo"}, "loss_type='cispo'"),
    ({"beta": 0.04}, "kl_coef"),
    ({"importance_sampling_level": "sequence", "loss_type": "grpo"}, "level"),
    ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
    ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
    ({"delta": 4.0}, "delta"),
    ({"entropy_coef": 0.01}, "entropy"),
])
def test_options_that_bypass_the_objective_raise(tiny, dataset, tmp_path, overrides, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = make_args(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        adapter(tiny, dataset, args, "ratio_clip")
    assert "\n" not in str(info.value)


def test_unsupported_trl_version_names_the_range():
    check_trl_version()  # the installed one is supported
    with pytest.raises(ConfigError, match=re.escape(f"trl{SUPPORTED_TRL}")):
        check_trl_version("1.15.2")
    with pytest.raises(ConfigError, match="found trl 2.0.0"):
        check_trl_version("2.0.0")


def test_pyproject_declares_the_supported_range():
    assert f'"trl{SUPPORTED_TRL}"' in (ROOT / "pyproject.toml").read_text()


def test_loss_type_maps_to_agg():
    assert resolve_objective("archer", "grpo", 8).agg == "seq_mean_token_mean"
    dr = resolve_objective({"name": "pspo", "alpha": 0.2}, "dr_grpo", 64)
    assert (dr.agg, dr.agg_norm_len, dr.alpha) == ("seq_mean_token_sum_norm", 64, 0.2)
    instance = build_objective("ratio_clip", agg="seq_mean_token_sum_norm")
    assert resolve_objective(instance, "dr_grpo", 32).agg_norm_len == 32 and instance.agg_norm_len is None
    with pytest.raises(ConfigError, match="disagrees with loss_type='dapo'"):
        resolve_objective(build_objective("ratio_clip", agg="seq_mean_token_mean"), "dapo", 8)
    with pytest.raises(ConfigError, match="disagrees"):
        resolve_objective({"name": "ratio_clip", "agg": "token_mean"}, "grpo", 8)
    with pytest.raises(ConfigError, match="unknown objective"):
        resolve_objective("nope", "dapo", 8)


def test_the_adaptive_kl_controller_is_refused_under_trl():
    """TRL never calls the controller's end-of-step update, so kl_target would silently stay fixed there."""
    for objective in ({"name": "ratio_clip", "kl_coef": 0.1, "kl_target": 0.01},
                      build_objective("ratio_clip", kl_coef=0.1, kl_target=0.01, agg="seq_mean_token_mean")):
        with pytest.raises(ConfigError, match="kl_target .* needs rlclip's trainer"):
            resolve_objective(objective, "grpo", 8)
    assert resolve_objective({"name": "ratio_clip", "kl_coef": 0.1}, "grpo", 8).kl_control is None


# ---------------------------------------------------------------- docs/trl.md


def test_docs_example_runs(tmp_path, monkeypatch):
    """The first python block of docs/trl.md runs as written (it trains the tiny model)."""
    text = (ROOT / "docs" / "trl.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, "docs/trl.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.objective.name == "archer" and trainer.state.global_step == 2
