"""Two "machines" on loopback: ``accelerate launch --num_machines 2 --machine_rank 0|1`` over gloo, on CPU.

Each launch is two ``accelerate launch`` commands started at once with the
shipped ``recipes/accelerate/multi_gpu.yaml`` and the multi-node flags the
SLURM script passes (``--num_processes 2 --num_machines 2 --machine_rank R
--main_process_ip 127.0.0.1 --main_process_port PORT``), one CPU process per
machine, one output directory standing for the shared storage:

1. ``tests/scripts/multinode_run.py``: one plain-SGD step of 4 fixed sequences
   split 2 + 2 over the machines must move every parameter as the 1-process
   step over all 4 does (to 1e-6); then a straight 4-step AdamW run, and the
   same run stopped at step 2 with ``checkpoint-2``.
2. ``-m rlclip train ... --resume_from_checkpoint latest`` on both machines
   (a requeued job): continues that run from step 2 to step 4, and must end
   on the straight run's weights (to 1e-6) and losses, with each step once in
   ``metrics.jsonl``.

Only the main process (global rank 0, on machine 0) speaks and writes.
Skipped where torch has no gloo backend or 127.0.0.1 cannot be bound.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port

pytestmark = pytest.mark.xdist_group("multinode")  # one worker runs both launches
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from multinode_run import RUN  # noqa: E402
from one_step import step_once  # noqa: E402

step = functools.lru_cache(step_once)
LAUNCH_TIMEOUT = 240  # seconds for both machines of one launch (each took about 35 s on 2 busy cores)


def loopback_gloo_missing() -> str | None:
    """Why a 2-machine gloo run cannot happen here, or None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed has no gloo backend"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
    except OSError as err:
        return f"cannot bind 127.0.0.1 ({err})"
    return None


def kill_launch(proc: subprocess.Popen) -> None:
    """End a launcher and its workers (torch's elastic agent starts each worker in a session of its own, so
    killing the launcher's process group would leave them running)."""
    import psutil

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    for process in [*workers, psutil.Process(proc.pid)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def launch_two_machines(out: Path, name: str, command: list[str]) -> list[str]:
    """Start ``command`` under ``accelerate launch`` once per machine rank, at once; wait for both.

    A machine that fails or a pair that outlives ``LAUNCH_TIMEOUT`` ends both (the survivor would otherwise
    wait for its peer in the rendezvous or a collective), and the test fails with both logs. Returns each
    machine's output (stdout and stderr)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs, logs = [], []
    for rank in (0, 1):
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "recipes/accelerate/multi_gpu.yaml"), "--num_processes", "2", "--num_machines", "2",
                "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                "--mixed_precision", "no", *command]
        log = out / f"{name}_machine{rank}.log"
        logs.append(log)
        with open(log, "w") as handle:
            procs.append(subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_launch(p)
    texts = [log.read_text() for log in logs]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], (f"{name}: exit codes {codes} (negative: killed after the other failed or after "
                             f"{LAUNCH_TIMEOUT} s)\n" +
                             "\n".join(f"--- machine {r} ---\n{t[-3000:]}" for r, t in enumerate(texts)))
    return texts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both launches (shared by every test here): the step and the runs, then the resume."""
    reason = loopback_gloo_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("multinode")
    first = launch_two_machines(out, "first", [str(ROOT / "tests/scripts/multinode_run.py"), str(out)])
    resume = launch_two_machines(out, "resume", [
        "-m", "rlclip", "train", "--config", str(ROOT / "recipes/smoke/tiny.yaml"),
        "--output_dir", str(out / "runs" / "resumed"), "--logging.progress_bar", "false",
        *(f"--{item}" for item in RUN), "--max_steps", "4", "--save_steps", "2",
        "--resume_from_checkpoint", "latest"])
    return out, json.loads((out / "train.json").read_text()), first, resume


def metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_two_machines_form_one_world_and_only_rank0_speaks(run):
    _, info, first, resume = run
    assert info["world_size"] == 2 and info["distributed"] == "DistributedType.MULTI_CPU"
    assert info["machine_rank"] == 0 and info["local_rank"] == 0  # the writer is global rank 0, on machine 0
    banners = [line for line in first[0].splitlines() if line.startswith("rlclip: start: ")]
    assert len(banners) == 2 and all("2 process(es)" in b for b in banners)  # the straight and the first run
    for log in (first[1], resume[1]):  # machine 1 holds global rank 1 only: no banner, summary or notice
        assert not [line for line in log.splitlines() if line.startswith("rlclip: ")]


def test_two_machine_step_matches_one_process(run):
    out, _, _, _ = run
    reference = step(4, "default")
    result = torch.load(out / "step_default.pt")
    assert_same(reference["params"], result["params"], atol=1e-6)
    assert result["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], abs=1e-6)


def test_resume_on_both_machines_continues_the_run(run):
    from safetensors.torch import load_file

    out, info, _, resume = run
    straight, resumed = out / "runs" / "straight", out / "runs" / "resumed"
    assert info["straight"] == [1, 2, 3, 4] and info["first"] == [1, 2]
    assert f"rlclip: resumed from {resumed / 'checkpoint-2'} at step 2" in resume[0]
    # each machine's RNG state went to the shared directory, and came back from it
    assert {p.name for p in (resumed / "checkpoint-2" / "state").glob("random_states_*")} == \
        {"random_states_0.pkl", "random_states_1.pkl"}
    rows, reference = metrics(resumed), metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step once
    for row, ref in zip(rows, reference):
        assert row["loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert row["reward/mean"] == pytest.approx(ref["reward/mean"], abs=1e-6)
    assert (resumed / "checkpoint-4" / "trainer_state.json").is_file()  # saving goes on after the resume
    assert_same(load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors"), atol=1e-6)
