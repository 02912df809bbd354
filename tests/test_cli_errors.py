"""Bad input: a one-line error naming the problem, a non-zero exit, no traceback.

Most cases call ``rlclip.cli.main`` in the test process (what ``python -m rlclip``
runs); the unknown-command, missing-recipe and ``--debug`` cases go through a real
``python -m rlclip`` process, which is cheap for them: they fail before torch loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

RECIPE = str(ROOT / "recipes/smoke/tiny.yaml")


def rlclip(*args, env_extra=None, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rlclip", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """``rlclip ARGS`` in this process: returns (exit code, stderr)."""
    from rlclip.cli import main

    def run(*args, pythonpath=None):
        monkeypatch.chdir(ROOT)
        if pythonpath:
            monkeypatch.syspath_prepend(str(pythonpath))
        capsys.readouterr()
        code = main(list(args))
        return subprocess.CompletedProcess(list(args), code, "", capsys.readouterr().err)

    return run


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    # the start banner is a notice printed before training began, not part of the error
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rlclip") and not ln.startswith("rlclip: start: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("overrides, needles", [
    (["--objective.name", "nope"], ["unknown objective 'nope'", "ratio_clip"]),
    (["--objective.eps_hgih", "0.3"], ["no setting eps_hgih", "eps_high"]),
    (["--trian.learning_rate", "1"], ["trian"]),
    (["--max_steps", "many"], ["max_steps must be an integer", "'many'"]),
    (["--max_steps", "-3"], ["max_steps must be >= 1", "-3"]),
    (["--data.limit", "0"], ["data.limit must be >= 1", "got 0"]),
    (["--train.mini_batches", "3"], ["mini_batches=3 does not divide"]),
    (["--max_steps"], ["has no value"]),
    (["--reward.funcs.0.weight", "0"], ["invalid config override", "reward.funcs"]),
    (["--rollout.group_size", "1", "--train.mini_batches", "1"], ["group_size >= 2"]),
    (["--rollout.top_p", "1.5"], ["top_p"]),
])
def test_config_errors(tmp_path, overrides, needles, run_main):
    proc = run_main("train", "--config", RECIPE, f"--output_dir={tmp_path}", *overrides)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_recipe_and_unknown_command(tmp_path):
    assert_one_line_error(rlclip("train", "--config", str(tmp_path / "no.yaml")), "does not exist")
    assert_one_line_error(rlclip("trian"), "unknown command 'trian'", "did you mean train?")


@pytest.mark.parametrize("position", ["first", "last"])
def test_debug_shows_the_traceback(tmp_path, position):
    args = ["train", "--config", str(tmp_path / "no.yaml")]
    proc = rlclip(*(["--debug", *args] if position == "first" else [*args, "--debug"]))
    assert proc.returncode == 2 and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("rlclip train: error: recipe")


def test_keyboard_interrupt_before_training(monkeypatch, capsys):
    import rlclip.config
    from rlclip.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlclip.config, "load_config", interrupted)
    assert main(["train", "--config", RECIPE]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlclip train: error: interrupted"), err


def test_imports_scalar_is_a_list(tmp_path):
    from rlclip.config import load_config

    (tmp_path / "my_pg.py").write_text(
        "from rlclip.objectives import Objective, register_objective\n"
        "@register_objective('scalar_import_pg')\n"
        "class PG(Objective):\n"
        "    def surrogate(self, batch):\n"
        "        return -batch.advantages * batch.logprobs, {}\n")
    config = load_config(RECIPE, [f"imports={tmp_path}/my_pg.py", "objective.name=scalar_import_pg"])
    assert config.imports == [f"{tmp_path}/my_pg.py"]


REWARDS = textwrap.dedent("""
    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    def needs_solution(prompts, completions, solution, **kwargs):
        return [0.0] * len(completions)
""")


@pytest.mark.parametrize("func, needles", [
    ("wrong_length", ["'wrong_length' returned 1 values for 32 completions"]),
    ("needs_solution", ["'needs_solution'", "solution", "answer, question, suite"]),
])
def test_reward_function_errors(tmp_path, func, needles, run_main):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(open(RECIPE).read().replace("name: target_token", f"name: my_rewards:{func}"))
    proc = run_main("train", "--config", str(recipe), f"--output_dir={tmp_path}/out", "--max_steps", "1",
                    pythonpath=tmp_path)
    assert_one_line_error(proc, *needles)


def test_reward_function_not_importable(tmp_path, run_main):
    proc = run_main("train", "--config", RECIPE, f"--output_dir={tmp_path}",
                  "--reward.funcs=[{name: 'nowhere:func'}]")
    assert_one_line_error(proc, "cannot be imported")
