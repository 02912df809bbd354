"""Shared fixtures: configs for the tiny model, and paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per test process (and per subprocess, which inherits it): the tiny models gain
# nothing from more, and with two xdist workers on two cores, OpenMP threads spinning against each
# other made a tiny training step about 9x slower (measured: 4 steps 265 s with 2 threads, 31 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file (by a plugin): the variable came too late
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def free_port() -> int:
    """A TCP port that nothing listens on now, for a launcher's rendezvous.

    Fixed ports collided: in CI a launch failed with EADDRINUSE on a port that a fixed number had given to
    two launches. The kernel picks this one (bind to port 0); the moment between closing it here and the
    launcher binding it is the only window left for a clash."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(tmp_path: Path, *overrides: str):
    """The smoke recipe with quiet output in ``tmp_path`` plus dotted overrides."""
    from rlclip.config import load_config

    base = [f"output_dir={tmp_path}", "logging.progress_bar=false"]
    return load_config(ROOT / "recipes/smoke/tiny.yaml", base + list(overrides))


def coin(prompts, completions, **kwargs) -> list[float]:
    """A reward that splits every group (a hash of the text), so that advantages and updates are not zero."""
    import zlib

    return [float(zlib.crc32(str(c).encode()) % 2) for c in completions]


def train_tiny(tmp_path: Path, *overrides: str, steps: int = 3) -> list[dict]:
    """``steps`` optimizer steps of the smoke recipe on 2 prompts x 4 completions of 8 tokens, rewarded by
    :func:`coin`; the logged metrics."""
    from rlclip.trainer import Trainer

    cfg = tiny_config(tmp_path, *overrides, f"max_steps={steps}", "rollout.prompts_per_step=2",
                      "rollout.group_size=4", "rollout.max_new_tokens=8")
    return Trainer(cfg, reward_funcs=[coin]).train()


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def two_process(tmp_path_factory) -> Path:
    """The output directory of the one 2-process run (``tests/scripts/two_process.py`` under
    ``accelerate launch --multi_gpu`` on CPU, gloo), shared by every test that checks two processes.

    Those tests carry ``@pytest.mark.xdist_group("two_process")`` so that under ``pytest -n 2 --dist
    loadgroup`` (``make test``) one worker runs them all and the launch happens once."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("two_process")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*launch, str(ROOT / "tests/scripts/two_process.py"), str(out)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out / "launch_stderr.log").write_text(proc.stderr)
    return out
