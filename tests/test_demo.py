"""The demo driver end to end on the tiny model (the real demo is `make demo`)."""

import json

from conftest import ROOT
from rlclip.config import load_config
from rlclip.demo import main, split_problems


def test_held_out_split_is_disjoint_and_complete():
    config = load_config(ROOT / "recipes/demo/smollm2_arithmetic.yaml")
    train, test = split_problems(config, 40, seed=0)
    questions = [r["question"] for r in train + test]
    assert len(test) == 40 and len(questions) == 100 == len(set(questions))
    for record in train + test:
        a, op, b = record["question"].split()
        assert op == "+" and int(record["answer"]) == int(a) + int(b)
        assert record["question"] in record["prompt"][0]["content"]


def test_demo_writes_the_compare_report_with_intervals(tmp_path, capsys):
    """One objective and seed (the sweep itself is tests/test_compare.py's): base score, held-out set, report."""
    rc = main(["--objectives", "troll", "--seeds", "0", "--num-test", "4", "--model.name_or_path", "tiny",
               "--max_steps", "2", f"--output_dir={tmp_path}", "--lora.last_layers", "1",
               "--rollout.prompts_per_step", "2", "--logging.progress_bar", "false"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "## Final held-out accuracy" in printed and "95% interval" in printed
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert [row["label"] for row in summary["objectives"]] == ["troll"]
    assert 0 <= summary["base_accuracy"] <= 1
    for row in summary["objectives"]:
        assert row["problems"] == 4 and row["seeds"] == [0]
    held_out = {r["question"] for r in split_problems(load_config(ROOT / "recipes/demo/smollm2_arithmetic.yaml"),
                                                        4, seed=0)[1]}
    for run in summary["runs"]:
        assert set(run["problems"]) == held_out  # scored on exactly the demo's held-out problems
    assert (tmp_path / "troll-seed0" / "metrics.jsonl").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "The model before training scores" in report and "![mean reward (band: reward std)](reward.png)" in report
    assert (tmp_path / "reward.png").stat().st_size > 1000
