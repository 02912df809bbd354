"""eval/bench/soak.py: the growth maths on hand-made samples, and one short run end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval/bench/soak.py"


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample(step: int, rss: int, fds: int, dir_bytes: int, ckpts: list[int], partial: bool = False) -> dict[str, Any]:
    return {"step": step, "rss_bytes": rss, "fds": fds, "dir_bytes": dir_bytes, "metrics_bytes": 1200 * step,
            "checkpoints": ckpts, "partial": partial}


def test_slope_by_hand() -> None:
    soak = load_soak()
    # x mean 1.5, y mean 1.5: sum dx*dy = 2.25 + 0.25 - 0.25 + 3.75 = 6, sum dx^2 = 5
    assert soak.slope([0, 1, 2, 3], [0, 1, 1, 4]) == pytest.approx(1.2)
    assert soak.slope([1.0], [5.0]) is None
    assert soak.slope([2.0, 2.0], [1.0, 3.0]) is None


def test_analyse_by_hand() -> None:
    soak = load_soak()
    samples = [
        sample(1, 9_999, 40, 0, []),              # warm-up: left out of every fit
        sample(2, 9_999, 40, 100, [2]),
        sample(3, 975, 5, 150, [2]),              # one checkpoint only (< keep_last): not a phase
        sample(4, 985, 5, 300, [2, 4]),           # phase: checkpoint-4 newest, two present
        sample(5, 995, 6, 280, [2, 4]),           # not the first sample of checkpoint-4
        sample(6, 1005, 5, 999, [4, 6], True),    # a partial save present: skipped
        sample(7, 1015, 5, 360, [4, 6]),          # phase: checkpoint-6
        sample(8, 1025, 5, 500, [6, 8]),          # checkpoint at the last step (final model beside it): not a phase
    ]
    result = soak.analyse(samples, warmup=2, keep_last=2)
    assert result["samples_after_warmup"] == 6
    # RSS over steps 3..8 rises 10 bytes per step: 1000 per 100 steps, mean 1000 -> 100%
    assert result["rss_growth_bytes_per_100"] == pytest.approx(1000.0)
    assert result["rss_mean_after_warmup"] == pytest.approx(1000.0)
    assert result["rss_growth_pct_per_100"] == pytest.approx(100.0)
    # fds 5,5,6,5,5,5 at steps 3..8 (dx = -2.5..2.5, sum dx^2 = 17.5): sum dx*y = 5*sum dx + dx(step 5) = -0.5
    assert result["fd_growth_per_100"] == pytest.approx(-0.5 / 17.5 * 100)
    assert result["fd_min_after_warmup"] == 5 and result["fd_max_after_warmup"] == 6
    # phases (4, 300) and (7, 360): 20 bytes per step -> 2000 per 100 steps, over the 1 KiB tolerance
    assert [(p["step"], p["checkpoint"], p["dir_bytes"]) for p in result["dir_phases"]] == [(4, 4, 300), (7, 6, 360)]
    assert result["dir_growth_bytes_per_100"] == pytest.approx(2000.0)
    assert result["metrics_bytes_per_step"] == pytest.approx(1200.0)
    # a one-sample bump of one fd in a 6-step fit is -2.9 per 100 steps: over the 0.5 tolerance
    assert result["rss_ok"] is False and result["fd_ok"] is False and result["dir_ok"] is False
    assert result["pass"] is False


def test_analyse_flat_run_passes() -> None:
    soak = load_soak()
    ckpts = {1: [2], 2: [2], 3: [2], 4: [2, 4], 5: [2, 4], 6: [4, 6], 7: [4, 6], 8: [6, 8], 9: [6, 8], 10: [8, 10]}
    samples = [sample(s, 1000, 5, 300 if s >= 4 else 100, ckpts[s]) for s in range(1, 11)]
    result = soak.analyse(samples, warmup=2, keep_last=2)
    assert [p["checkpoint"] for p in result["dir_phases"]] == [4, 6, 8]
    assert result["rss_growth_pct_per_100"] == 0.0 and result["fd_growth_per_100"] == 0.0
    assert result["dir_growth_bytes_per_100"] == 0.0 and result["pass"] is True


@pytest.mark.slow
def test_soak_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "6", "--warmup", "2", "--save-steps", "2",
                           "--output-dir", str(out), "--report", str(tmp_path / "soak.md")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["samples"] >= 1 and summary["returncode"] == 0
    assert summary["checkpoints_at_end"] and len(summary["checkpoints_at_end"]) <= 2
    lines = (out / "soak_samples.jsonl").read_text().splitlines()
    assert len(lines) == summary["samples"] and json.loads(lines[-1])["rss_bytes"] > 0
    assert "| RSS growth per 100 steps after warm-up |" in (tmp_path / "soak.md").read_text()
