"""Every recipe YAML loads and validates (no model is loaded)."""

from pathlib import Path

import pytest

from conftest import ROOT
from rlclip.config import TrainConfig, load_config

RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_there_are_recipes():
    assert ROOT / "recipes/smoke/tiny.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_loads(path: Path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert config.objective["name"]


def test_override_switches_objective_and_drops_foreign_settings():
    cfg = load_config(ROOT / "recipes/smoke/tiny.yaml", ["objective.name=pspo", "objective.alpha=0.2"])
    assert cfg.objective == {"name": "pspo", "alpha": 0.2}


def test_override_types_and_nesting():
    cfg = load_config(ROOT / "recipes/smoke/tiny.yaml",
                      ["objective.eps_high=0.3", "rollout.group_size=2", "lora.enabled=true", "seed=7"])
    assert cfg.objective["eps_high"] == 0.3 and cfg.rollout.group_size == 2 and cfg.lora.enabled and cfg.seed == 7


def test_every_config_field_has_a_docstring():
    import ast
    import inspect

    import rlclip.config.schema as module

    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Settings")):
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body
            for field, doc in zip(body[::2], body[1::2]):
                assert isinstance(field, ast.AnnAssign), (node.name, ast.dump(field)[:80])
                assert isinstance(doc, ast.Expr) and isinstance(doc.value.value, str), (node.name, field.target.id)


NEW_OBJECTIVES = ("cispo", "sapo", "vespo", "luspo", "gmpo", "clip_cov", "kl_cov", "gpg")
NEW_OBJECTIVES += ("spo", "dro", "dppo_kimi", "topr")  # issue #28: penalty surrogates and TOPR
NEW_OBJECTIVES += ("aspo", "dcpo")  # issue #28 (GPPO / CE-GPPO are ratio_clip settings: tests/test_gppo.py)
NEW_OBJECTIVES += ("bapo",)  # issue #28


@pytest.mark.parametrize("name", NEW_OBJECTIVES)
def test_every_new_objective_has_a_gsm8k_recipe(name):
    from rlclip.config import build_objective_from_config

    path = ROOT / f"recipes/gsm8k/grpo_{name}.yaml"
    assert path in RECIPES
    config = load_config(path)
    assert config.objective["name"] == name and config.data.name == "gsm8k"
    assert build_objective_from_config(config).name == name


def test_archer_recipe_reproduces_the_released_run():
    """ArcherCodeR's micro-batches of one response with token-mean: per-response policy loss and class KL."""
    from rlclip.config import build_objective_from_config

    obj = build_objective_from_config(load_config(ROOT / "recipes/gsm8k/grpo_archer.yaml"))
    assert obj.agg == "seq_mean_token_mean" and obj.kl_per_response
    assert (obj.q, obj.eps_knowledge, obj.eps_reasoning, obj.kl_knowledge, obj.kl_reasoning, obj.dual_clip) == \
        (0.8, 0.2, 0.5, 0.001, 0.0, 10.0)
    assert obj.kl_estimator == "low_var_kl" and not obj.kl_bias_correction
