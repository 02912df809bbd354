"""rlclip report: runs found from paths, parent directories and globs; PNGs and report.md."""

from __future__ import annotations

import json

import pytest

from rlclip.cli import main


def make_run(path, objective, rewards, settings=None, extra=None):
    path.mkdir(parents=True)
    lines = [f"  {k}: {v}" for k, v in (settings or {}).items()]
    (path / "config.yaml").write_text("\n".join(["objective:", f"  name: {objective}", *lines]) + "\n")
    rows = [{"step": i + 1, "reward/mean": r, "reward/std": 0.1, "trust/zeroed_frac": 0.05 * (i + 1),
             "trust/kl_old_new": 0.001, "optim/grad_norm": 1.0, **(extra or {}).get(i + 1, {})}
            for i, r in enumerate(rewards)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_overlays_runs_and_tabulates_final_and_best(tmp_path, capsys):
    make_run(tmp_path / "runs/a", "ratio_clip", [0.1, 0.5, 0.3], {"eps_high": 0.28},
             extra={3: {"eval/accuracy": 0.4}})
    make_run(tmp_path / "runs/b", "archer", [0.2, 0.25])
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs/*"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["eval_accuracy.png", "grad_norm.png", "kl.png", "reward.png", "trust.png"]  # nothing logged entropy
    text = (out / "report.md").read_text()
    row_a = next(line for line in text.splitlines() if line.startswith("| ratio_clip |"))
    # reward last 0.3, best 0.5; eval 0.4 / 0.4; zeroed last 0.15, best (lowest) 0.05
    assert "| eps_high=0.28 | 3 | 0.3 | 0.5 | 0.4 | 0.4 | 0.15 | 0.05 |" in row_a
    assert "| archer | archer | defaults | 2 | 0.25 | 0.25 | - | - |" in text
    assert "![mean reward (band: reward std)](reward.png)" in text


def test_a_directory_of_runs_and_duplicate_objectives_get_distinct_labels(tmp_path):
    make_run(tmp_path / "demo/seed0", "pspo", [0.1])
    make_run(tmp_path / "demo/seed1", "pspo", [0.2])
    report = (tmp_path / "demo")
    assert main(["report", str(report), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out/report.md").read_text()
    assert "| pspo (seed0) | pspo |" in text and "| pspo (seed1) | pspo |" in text


@pytest.mark.parametrize("setup,needle", [
    (lambda d: None, "no metrics.jsonl there or in its subdirectories"),
    (lambda d: (make_run(d, "gpg", [0.1]), (d / "metrics.jsonl").write_text('{"step": 1}\n{"st')),
     "line 2 is not JSON"),
])
def test_bad_run_directories_are_one_line_errors(tmp_path, capsys, setup, needle):
    setup(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlclip report: error: ") and needle in err and "\n" not in err


def test_the_shells_expansion_of_a_compare_directory_passes_over_its_files(tmp_path, capsys):
    """``rlclip report runs/demo/*`` as the shell expands it: run directories plus the sweep's own files
    (report.md, compare.json, PNGs), which are passed over; files alone are an error."""
    make_run(tmp_path / "demo/ratio_clip-seed0", "ratio_clip", [0.1, 0.3])
    make_run(tmp_path / "demo/troll-seed0", "troll", [0.2, 0.4])
    for name in ("report.md", "compare.json", "reward.png"):
        (tmp_path / "demo" / name).write_text("x")
    expanded = sorted(str(p) for p in (tmp_path / "demo").iterdir())
    assert main(["report", *expanded, "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out/report.md").read_text()
    assert "| ratio_clip | ratio_clip |" in text and "| troll | troll |" in text
    capsys.readouterr()
    files = [p for p in expanded if not p.endswith("seed0")]
    assert main(["report", *files, "--out", str(tmp_path / "out2")]) == 2
    assert "no run among" in capsys.readouterr().err
