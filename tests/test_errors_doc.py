"""Every row of docs/errors.md, run: exit code, one line on stderr, no traceback, the documented message.

Adding a row takes two edits:

1. a row in the table of docs/errors.md: ``| `my-id` | what is wrong | `rlclip ...` | 2 | `the message` |``
   (the message is the part after ``error: ``; write the test's temporary
   directory as ``<tmp>`` and any other varying text as ``<*>``);
2. an entry ``"my-id": Case([...argv after rlclip...], files={...})`` in ``CASES`` below
   (``{tmp}`` in argv is the temporary directory; ``files`` are written under it first).

The command column of the table must equal the case's argv (``{tmp}`` shown as
``<tmp>``), so the documentation shows exactly what was run. Most rows run
in-process through ``rlclip.cli.main`` (the exit path is the same); rows with
``subprocess=True`` run ``python -m rlclip`` to prove that no traceback reaches
a real terminal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT

DOC = ROOT / "docs" / "errors.md"
TINY = "recipes/smoke/tiny.yaml"
TRAIN = ["train", "--config", TINY]
GSM8K = [*TRAIN, "--data.name", "gsm8k", "--data.path"]
GOOD_ROW = '{"question": "1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'


@dataclass
class Case:
    """How to reproduce one row of docs/errors.md."""

    argv: list[str]
    """Arguments after ``rlclip``; ``{tmp}`` is replaced by the test's temporary directory."""
    files: dict[str, str | bytes] = field(default_factory=dict)
    """Files written under the temporary directory first (``bytes`` are written as is)."""
    setup: Callable[[Path], None] | None = None
    """Anything else to prepare in the temporary directory."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the run."""
    subprocess: bool = False
    """Run ``python -m rlclip`` in a subprocess instead of ``rlclip.cli.main`` in-process."""


def safetensors_file(truncate: int | None = None) -> bytes:
    """A small valid safetensors file (optionally cut to ``truncate`` bytes)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}).encode()
    header += b" " * (-len(header) % 8)
    data = len(header).to_bytes(8, "little") + header + bytes(256)
    return data[:truncate] if truncate else data


MODEL_FILES = {"config.json": '{"model_type": "llama"}', "model.safetensors": safetensors_file(),
               "tokenizer.json": "{}", "tokenizer_config.json": "{}"}


def model_dir(name: str, drop: tuple[str, ...] = (), **replace: str | bytes) -> dict[str, str | bytes]:
    """Files of a fake saved model in ``name/`` (checked for structure only, never loaded)."""
    files = {**{k: v for k, v in MODEL_FILES.items() if k not in drop}, **replace}
    return {f"{name}/{k}": v for k, v in files.items()}


REWARDS_PY = "def wrong_length(prompts, completions, **kwargs):\n    return [1.0]\n"
FAULTY_PY = """\
from rlclip.objectives import Objective, register_objective


def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def divides(prompts, completions, **kwargs):
    return [1 / 0 for _ in completions]


@register_objective("early_sum")
class EarlySum(Objective):
    def surrogate(self, batch):
        return (-batch.advantages * batch.logprobs).sum(-1), {}


@register_objective("always_nan")
class AlwaysNaN(Objective):
    def surrogate(self, batch):
        return batch.logprobs * float("nan"), {}
"""
REWARD_RUN = ["--imports", "{tmp}/r.py", "--max_steps", "1", "--reward.funcs"]
_LOCKS: list = []


def _hold_lock(directory: Path) -> None:
    """Another run's lock on ``directory`` (held until the test process ends)."""
    from rlclip.checkpoint import RunLock

    directory.mkdir(parents=True, exist_ok=True)
    lock = RunLock(directory)
    lock.acquire()
    _LOCKS.append(lock)

PROGRESS = re.compile(r"\d+/\d+ \[[^\]]*(it/s|s/it)[^\]]*\]\s*$")
"""A tqdm progress-bar line (its last refresh ends the line)."""

CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- command line
    "cli-no-command": Case([]),
    "cli-unknown-command": Case(["trian"], subprocess=True),
    "cli-train-without-config": Case(["train"]),
    "cli-help-unknown-section": Case(["train", "--help", "rolout"]),
    "cli-config-without-value": Case(["train", "--config"]),
    "cli-override-without-value": Case([*TRAIN, "--max_steps"]),
    "cli-stray-argument": Case([*TRAIN, "fast"]),
    "cli-override-bad-yaml": Case([*TRAIN, "--objective.eps_low", "[0.2"]),
    "tiny-model-bad-seed": Case(["tiny-model", "{tmp}/tiny", "--seed", "x"]),
    "report-no-runs": Case(["report", "{tmp}/nothing", "--out", "{tmp}/out"]),
    # ---------------------------------------------------------------- recipe file
    "recipe-missing": Case(["train", "--config", "{tmp}/missing.yaml"]),
    "recipe-is-directory": Case(["train", "--config", "{tmp}"]),
    "recipe-yaml-syntax": Case(["train", "--config", "{tmp}/r.yaml"], files={"r.yaml": "max_steps: 2\nmodel: {name_or_path: tiny\n"},
                               subprocess=True),
    "recipe-yaml-tab": Case(["train", "--config", "{tmp}/r.yaml"], files={"r.yaml": "model:\n\tname_or_path: tiny\n"}),
    "recipe-duplicate-key": Case(["train", "--config", "{tmp}/r.yaml"], files={"r.yaml": "max_steps: 2\nmax_steps: 3\n"}),
    "recipe-not-utf8": Case(["train", "--config", "{tmp}/r.yaml"],
                            files={"r.yaml": "max_steps: 2\n# caf\xe9\n".encode("latin-1")}),
    "recipe-is-a-list": Case(["train", "--config", "{tmp}/r.yaml"], files={"r.yaml": "- max_steps: 2\n"}),
    "recipe-section-is-scalar": Case(["train", "--config", "{tmp}/r.yaml"], files={"r.yaml": "model: tiny\n"}),
    "recipe-unknown-key": Case(["train", "--config", "{tmp}/r.yaml"], files={"r.yaml": "train:\n  lerning_rate: 0.1\n"}),
    # ---------------------------------------------------------------- config values
    "config-unknown-section": Case([*TRAIN, "--trian.learning_rate", "1"]),
    "config-not-an-integer": Case([*TRAIN, "--max_steps", "many"]),
    "config-not-a-number": Case([*TRAIN, "--rollout.top_p", "high"]),
    "config-not-a-bool": Case([*TRAIN, "--lora.enabled", "maybe"]),
    "config-out-of-range": Case([*TRAIN, "--max_steps", "-3"]),
    "config-list-element": Case([*TRAIN, "--reward.funcs.0.weight", "0"]),
    "config-mini-batches": Case([*TRAIN, "--train.mini_batches", "3"]),
    "config-group-size-one": Case([*TRAIN, "--rollout.group_size", "1", "--train.mini_batches", "1"]),
    "config-multi-reward-gae": Case([*TRAIN, "--advantage.name", "gae", "--advantage.multi_reward",
                                     "normalize_then_sum"]),
    "config-imports-missing": Case([*TRAIN, "--imports", "{tmp}/missing.py"]),
    "config-imports-module": Case([*TRAIN, "--imports", "no_such_module_rlclip"]),
    "config-imports-raises": Case([*TRAIN, "--imports", "{tmp}/my_objective.py"],
                                  files={"my_objective.py": "SCALE = 2\nRATE = SCALE / 0\n"}),
    "config-imports-syntax": Case([*TRAIN, "--imports", "{tmp}/my_objective.py"],
                                  files={"my_objective.py": "def f(:\n    pass\n"}),
    # ---------------------------------------------------------------- objectives
    "objective-unknown": Case([*TRAIN, "--objective.name", "ratio_clipp"]),
    "objective-unknown-setting": Case([*TRAIN, "--objective.eps_hgih", "0.3"]),
    "objective-bad-value-type": Case([*TRAIN, "--objective.eps_low", "wide"]),
    "objective-kl-target-without-coef": Case([*TRAIN, "--objective.kl_target", "0.1"]),
    # ---------------------------------------------------------------- reward functions
    "reward-unknown": Case([*TRAIN, "--reward.funcs=[{name: exact_match}]"]),
    "reward-not-importable": Case([*TRAIN, "--reward.funcs=[{name: my_rewards:nowhere}]"],
                                  files={"my_rewards.py": REWARDS_PY}),
    # ---------------------------------------------------------------- data
    "data-unknown-source": Case([*TRAIN, "--data.name", "gsm9k"]),
    "data-missing-file": Case([*GSM8K, "{tmp}/train.jsonl"]),
    "data-directory-without-split": Case([*GSM8K, "{tmp}"], files={"test.jsonl": GOOD_ROW}),
    "data-not-utf8": Case([*GSM8K, "{tmp}/train.jsonl"],
                          files={"train.jsonl": (GOOD_ROW + '{"question": "caf\xe9?"}\n').encode("latin-1")}),
    "data-invalid-json": Case([*GSM8K, "{tmp}/train.jsonl"], files={"train.jsonl": GOOD_ROW + "{question: 1}\n"}),
    "data-not-an-object": Case([*GSM8K, "{tmp}/train.jsonl"], files={"train.jsonl": GOOD_ROW * 2 + "[1, 2]\n"}),
    "data-missing-field": Case([*GSM8K, "{tmp}/train.jsonl"], files={"train.jsonl": '{"question": "1 + 1?"}\n'}),
    "data-no-final-answer": Case([*GSM8K, "{tmp}/train.jsonl"],
                                 files={"train.jsonl": '{"question": "1 + 1?", "answer": "two"}\n'}),
    "data-empty-file": Case([*GSM8K, "{tmp}/train.jsonl"], files={"train.jsonl": "\n"}),
    "data-instruction": Case([*TRAIN, "--data.instruction", "Add the numbers."]),
    "data-operations": Case([*TRAIN, "--data.operations", "/"]),
    # ---------------------------------------------------------------- model path
    "model-missing-path": Case([*TRAIN, "--model.name_or_path", "{tmp}/no-model"]),
    "model-is-file": Case([*TRAIN, "--model.name_or_path", "{tmp}/m/model.safetensors"], files=model_dir("m")),
    "model-not-a-saved-model": Case([*TRAIN, "--model.name_or_path", "{tmp}/m"],
                                    files=model_dir("m", drop=("config.json",))),
    "model-bad-config-json": Case([*TRAIN, "--model.name_or_path", "{tmp}/m"],
                                  files=model_dir("m", **{"config.json": '{"model_type": "llama",'})),
    "model-no-weights": Case([*TRAIN, "--model.name_or_path", "{tmp}/m"],
                             files=model_dir("m", drop=("model.safetensors",))),
    "model-truncated-weights": Case([*TRAIN, "--model.name_or_path", "{tmp}/m"],
                                    files=model_dir("m", **{"model.safetensors": safetensors_file(truncate=100)})),
    "model-no-tokenizer": Case([*TRAIN, "--model.name_or_path", "{tmp}/m"],
                               files=model_dir("m", drop=("tokenizer.json", "tokenizer_config.json"))),
    "model-gguf-missing": Case([*TRAIN, "--model.name_or_path", "{tmp}/m", "--model.gguf_file", "model.Q4.gguf"],
                               files=model_dir("m")),
    "model-hub-offline": Case([*TRAIN, "--model.name_or_path", "Qwen/Qwen2.5-0.5B-Instruct"],
                              env={"HF_HUB_OFFLINE": "1"}),
    "model-hub-unreachable": Case([*TRAIN, "--model.name_or_path", "Qwen/Qwen2.5-0.5B-Instruct"],
                                  env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    # ---------------------------------------------------------------- rlclip eval
    "eval-nothing-to-evaluate": Case(["eval", "--suite", "gsm8k"]),
    "eval-unknown-suite": Case(["eval", "--suite", "mmlu", "--gold"]),
    "eval-bad-number": Case(["eval", "--suite", "gsm8k", "--gold", "--num-samples", "0"]),
    "eval-missing-data-file": Case(["eval", "--suite", "gsm8k", "--gold", "--data-file", "{tmp}/test.jsonl"]),
    "eval-data-not-utf8": Case(["eval", "--suite", "gsm8k", "--gold", "--data-file", "{tmp}/test.jsonl"],
                               files={"test.jsonl": '{"question": "caf\xe9?", "answer": "#### 1"}\n'.encode("latin-1")}),
    "eval-model-no-tokenizer": Case(["eval", "--suite", "gsm8k", "--model", "{tmp}/m"],
                                    files=model_dir("m", drop=("tokenizer.json", "tokenizer_config.json"))),
    # ---------------------------------------------------------------- training runs (tiny model)
    "run-keep-last-zero": Case([*TRAIN, "--keep_last", "0"]),
    "run-on-error-unknown": Case([*TRAIN, "--reward.on_error", "ignore"]),
    "run-grad-clip-unknown": Case([*TRAIN, "--train.grad_clip", "{name: autoclp}"]),
    "run-output-dir-is-file": Case([*TRAIN, "--output_dir", "{tmp}/f"], files={"f": "not a directory"}),
    "run-output-dir-used": Case([*TRAIN, "--output_dir", "{tmp}/run"], files={"run/metrics.jsonl": '{"step": 1}\n'}),
    "run-output-dir-locked": Case([*TRAIN, "--output_dir", "{tmp}/run"], setup=lambda tmp: _hold_lock(tmp / "run")),
    "run-resume-nothing": Case([*TRAIN, "--output_dir", "{tmp}/run", "--resume_from_checkpoint", "latest"]),
    "run-prompts-all-rejected": Case([*TRAIN, "--output_dir", "{tmp}/run", "--rollout.max_prompt_length", "1",
                                      "--rollout.prompt_overflow", "reject"]),
    "run-reward-nan": Case([*TRAIN, "--output_dir", "{tmp}/run", *REWARD_RUN, '[{name: "rlclip_user_r:nan_reward"}]'],
                           files={"r.py": FAULTY_PY}),
    "run-reward-raises": Case([*TRAIN, "--output_dir", "{tmp}/run", *REWARD_RUN, '[{name: "rlclip_user_r:divides"}]'],
                              files={"r.py": FAULTY_PY}),
    "run-objective-wrong-shape": Case([*TRAIN, "--output_dir", "{tmp}/run", "--imports", "{tmp}/r.py",
                                       "--objective.name", "early_sum", "--max_steps", "1"], files={"r.py": FAULTY_PY}),
    "run-objective-always-nan": Case([*TRAIN, "--output_dir", "{tmp}/run", "--imports", "{tmp}/r.py",
                                      "--objective.name", "always_nan"], files={"r.py": FAULTY_PY}),
}


# ------------------------------------------------------------------ the table
@dataclass
class Row:
    id: str
    command: str
    exit_code: int
    message: str


def _code(cell: str) -> str:
    cell = cell.strip()
    return cell[1:-1] if len(cell) > 1 and cell.startswith("`") and cell.endswith("`") else cell


def read_table(path: Path = DOC) -> list[Row]:
    """Rows of the markdown table whose columns are id | bad input | command | exit | message."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows.append(Row(_code(cells[0]), _code(cells[2]), int(cells[3]), _code(cells[4])))
    return rows


ROWS = read_table()


def shown(argv: list[str]) -> str:
    """The command as the table shows it."""
    return shlex.join(["rlclip", *argv]).replace("{tmp}", "<tmp>")


def message_pattern(message: str) -> re.Pattern[str]:
    """The documented message as a regex: ``<tmp>`` and ``<*>`` are placeholders."""
    parts = re.split(r"(<tmp>|<\*>)", message)
    regex = "".join({"<tmp>": r"<tmp>", "<*>": r".*?"}.get(p, re.escape(p)) for p in parts)
    return re.compile(regex + r"\Z")


def _set_hub_constants(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, when it is imported: an in-process run
    sets its constants as a fresh ``python -m rlclip`` with ``env`` would have them (same parsing as the hub's)."""
    from huggingface_hub import constants

    if "HF_ENDPOINT" in env:
        monkeypatch.setattr(constants, "ENDPOINT", env["HF_ENDPOINT"].rstrip("/"))
    if "HF_HUB_OFFLINE" in env:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants._is_true(env["HF_HUB_OFFLINE"]))


def run_case(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) \
        -> tuple[int, str]:
    for name, content in case.files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    if case.setup:
        case.setup(tmp_path)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in case.argv]
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path), **case.env}
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "rlclip", *argv], capture_output=True, text=True,
                              env={**os.environ, **env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
                              cwd=ROOT, timeout=300)
        return proc.returncode, proc.stderr
    from rlclip.cli import main
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _set_hub_constants(env, monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_documented_error(row: Row, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture) -> None:
    assert row.id in CASES, f"docs/errors.md row {row.id!r} has no entry in CASES of {__file__}"
    case = CASES[row.id]
    assert row.command == shown(case.argv), f"the table's command for {row.id} differs from the test's"
    if "unknown objective" in row.message:  # it lists the shipped objectives, not other tests' registrations
        from rlclip.objectives import base

        shipped = {name: cls for name, cls in base._REGISTRY.items() if cls.__module__.startswith("rlclip.")}
        monkeypatch.setattr(base, "_REGISTRY", shipped)
    code, stderr = run_case(case, tmp_path, monkeypatch, capsys)
    assert "Traceback" not in stderr, stderr[-3000:]
    # progress bars (model loading, the train bar) and the start banner are output, not part of the error
    lines = [line for line in stderr.splitlines()
             if line.strip() and not PROGRESS.search(line) and not line.startswith("rlclip: start: ")]
    assert len(lines) == 1, stderr[-3000:]
    from rlclip.cli import COMMANDS

    command = case.argv[0] if case.argv and case.argv[0] in COMMANDS else None
    prefix = f"rlclip {command}: error: " if command else "rlclip: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert code == row.exit_code, (code, lines[0])
    actual = lines[0][len(prefix):].replace(str(tmp_path), "<tmp>")
    assert message_pattern(row.message).match(actual), f"\ndocumented: {row.message}\nactual:     {actual}"


def test_table_and_cases_match() -> None:
    documented = [row.id for row in ROWS]
    assert len(documented) >= 30 and len(set(documented)) == len(documented)
    assert sorted(set(CASES) - set(documented)) == [], "cases without a row in docs/errors.md"
