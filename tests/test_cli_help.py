"""What the CLI tells about itself: train --help, rlclip objectives, --version, train without a recipe."""

from __future__ import annotations

import pytest

from rlclip import __version__
from rlclip.cli import main
from rlclip.cli_help import config_fields, recipe_names

SHIPPED = ["archer", "cispo", "clip_cov", "gmpo", "gpg", "kl_cov", "luspo", "pspo", "ratio_clip", "sapo", "troll", "vespo"]


def test_every_config_field_has_a_docstring():
    undocumented = [name for name, _kind, _default, doc in config_fields() if not doc]
    assert not undocumented


def test_train_help_lists_every_field_with_default_and_doc(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for name, _kind, default, doc in config_fields():
        assert f"--{name} (" in text and f"default {default!r}" in text and doc in text
    assert "recipes/smoke/tiny.yaml" in text


def test_train_help_section_narrows(capsys):
    assert main(["train", "--help", "rollout"]) == 0
    text = capsys.readouterr().out
    assert "--rollout.min_new_tokens (int, default 0, must be >= 0)" in text and "--train.learning_rate" not in text


def test_train_help_unknown_section_is_one_line_error(capsys):
    assert main(["train", "--help", "rolout"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlclip train: error: no config section or field 'rolout'; choose one of")
    assert "rollout" in err and "\n" not in err


def test_train_without_config_names_the_recipes(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no recipe given; pass --config RECIPE.yaml" in err and "\n" not in err
    assert recipe_names() and all(name in err for name in recipe_names())


def test_objectives_lists_the_shipped_ones_with_settings(capsys):
    assert main(["objectives"]) == 0
    text = capsys.readouterr().out
    listed = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "Set", "Settings"))]
    assert set(SHIPPED) <= set(listed)
    assert "Settings every objective takes: agg='token_mean'" in text
    assert "agg: one of token_mean, " in text and "prompt_mean" in text and "kl_estimator: one of k1, " in text
    troll = text[text.index("\ntroll:"):]
    assert "kl_bound=" in troll.split("\n")[2]


def test_objectives_shows_a_user_objective_from_imports(tmp_path, capsys):
    user = tmp_path / "mine.py"
    user.write_text(
        "from rlclip.objectives import Objective, register_objective\n\n\n"
        "@register_objective('listed_by_cli')\n"
        "class Listed(Objective):\n"
        "    '''My objective (a test).'''\n\n"
        "    def __init__(self, beta_mine: float = 0.5, **shared):\n"
        "        super().__init__(**shared)\n"
        "        self.beta_mine = beta_mine\n\n"
        "    def surrogate(self, batch):\n"
        "        return -batch.advantages * batch.logprobs, {}\n")
    assert main(["objectives", "--imports", str(user)]) == 0
    text = capsys.readouterr().out
    assert "listed_by_cli: My objective (a test).\n    settings: beta_mine=0.5" in text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rlclip {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["-h"]])
def test_top_level_help_names_the_commands(argv, capsys):
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "objectives [--imports FILE.py ...]" in text and "train --help [SECTION]" in text



@pytest.mark.parametrize("argv", [
    ["--help"], ["train", "--help"], ["objectives"],
    ["train", "--config", "recipes/smoke/tiny.yaml", "--objective.eps_low", "-1"],  # a config error
    ["eval", "--suite", "gsm8k", "--gold", "--limit", "3", "--no-progress"],
])
def test_commands_that_do_not_train_never_import_torch(root, argv):
    """Importing torch costs tens of seconds here; these commands answer without it (eval/bench/startup.py times them)."""
    import subprocess
    import sys

    from rlclip.data.suites import SUITES

    if argv[0] == "eval" and not SUITES["gsm8k"].default_source().startswith("/"):
        pytest.skip("the GSM8K copy in ../shared/data is absent (the hub would be asked)")

    probe = (f"import sys\nfrom rlclip.cli import main\ncode = main({argv!r})\n"
             "print('torch' in sys.modules, [m for m in ('transformers', 'accelerate') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "False []", proc.stdout[-500:] + proc.stderr[-500:]
