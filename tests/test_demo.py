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


def test_demo_writes_summary_and_plot(tmp_path):
    rc = main(["--objectives", "ratio_clip,troll", "--num-test", "4", "--model.name_or_path", "tiny",
               "--max_steps", "2", f"--output_dir={tmp_path}", "--lora.last_layers", "1",
               "--rollout.prompts_per_step", "2", "--logging.progress_bar", "false"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["objectives"]) == {"ratio_clip", "troll"}
    for result in summary["objectives"].values():
        assert {"accuracy_before", "accuracy_after", "rewards"} <= set(result) and len(result["rewards"]) == 2
    assert (tmp_path / "ratio_clip" / "metrics.jsonl").is_file()
    assert (tmp_path / "reward.png").stat().st_size > 1000
