"""Run directories and checkpoints that survive crashes, kills and typos.

- A new run refuses an ``output_dir`` that already holds another run
  (``metrics.jsonl`` or ``checkpoint-N/``) unless it resumes or
  ``overwrite_output_dir`` is set; a lock file keeps a second concurrent run
  out. Path problems are found here, before any model loads.
- A checkpoint is written into a hidden sibling directory and renamed into
  place only when complete, so a SIGKILL during a save leaves the previous
  checkpoint usable and ``latest`` never picks a partial one.
- ``keep_last`` prunes the oldest checkpoints after each save.
- ``latest`` falls back to the newest checkpoint that loads.
- On resume, ``metrics.jsonl`` keeps each step once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from rlclip.errors import ConfigError
from rlclip.utils import all_reduce

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
LOCK_NAME = ".rlclip.lock"
METRICS_NAME = "metrics.jsonl"
PARTIAL_PREFIX = ".partial-"


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` directories, oldest first (``trainer_state.json`` is written last)."""
    found = [p for p in output_dir.glob("checkpoint-*")
             if CHECKPOINT_RE.fullmatch(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


USED_DIR_FIX = ("resume it with --resume_from_checkpoint latest, start afresh with --overwrite_output_dir true, "
                "or choose another --output_dir")


def check_output_dir(path: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse a file, an unwritable directory, or another run's directory (before any model loads)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} is an existing file; pass a directory with --output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir {path} cannot be created ({err.strerror or err}); "
                          "choose a writable --output_dir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {path} is not writable (permission denied); choose a writable --output_dir")
    used = [p.name for p in (path / METRICS_NAME,) if p.exists()] + [p.name for p in checkpoints(path)]
    if used and not resuming and not overwrite:
        raise ConfigError(f"output_dir {path} already holds a run ({', '.join(used[:3])}); {USED_DIR_FIX}")


def clear_previous_run(path: Path) -> None:
    """``overwrite_output_dir``: remove the previous run's metrics and checkpoints (nothing else)."""
    (path / METRICS_NAME).unlink(missing_ok=True)
    for child in path.glob("checkpoint-*"):
        shutil.rmtree(child, ignore_errors=True)
    for child in path.glob(PARTIAL_PREFIX + "*"):
        shutil.rmtree(child, ignore_errors=True)


def claim_output_dir(acc: Any, output_dir: Path, resuming: bool, overwrite: bool) -> RunLock | None:
    """Refuse a file, an unwritable or used output_dir, and a second concurrent run (all processes agree)."""
    check_output_dir(output_dir, resuming, overwrite)
    lock, error = None, None
    if acc.is_main_process:
        lock = RunLock(output_dir)
        try:
            lock.acquire()
        except ConfigError as err:
            error, lock = err, None
        if lock is not None and overwrite and not resuming:
            clear_previous_run(output_dir)
    failed = all_reduce(acc, torch.tensor(float(error is not None), device=acc.device), "max")
    if bool(failed > 0):
        raise error or ConfigError(f"output_dir {output_dir} is in use by another run; wait for it "
                                   "to finish or choose another --output_dir")
    return lock


class RunLock:
    """An exclusive ``fcntl`` lock on ``output_dir/.rlclip.lock`` held for the run.

    The kernel drops it when the process dies, so a crashed run never leaves
    a stale lock behind.
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_NAME
        self.handle: IO[str] | None = None

    def acquire(self) -> None:
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(f"output_dir {self.path.parent} is in use by another run (pid {owner}); wait for it "
                              "to finish or choose another --output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor drops the flock
            self.handle = None


@contextmanager
def atomic_directory(final: Path, is_main: bool, barrier: Callable[[], None]) -> Iterator[Path]:
    """Yield a hidden sibling of ``final`` to write into; rename it to ``final`` once every process is done.

    A kill before the rename leaves only the hidden directory, which nothing
    reads and the next save of the same name removes.
    """
    staging = final.parent / f"{PARTIAL_PREFIX}{final.name}"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    yield staging
    barrier()
    if is_main:
        if final.exists():  # a rewritten step: swap, then drop the old copy
            old = final.parent / f"{PARTIAL_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        _fsync_dir(final.parent)
    barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(output_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the removed paths."""
    if not keep_last:
        return []
    old = checkpoints(output_dir)[:-keep_last]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def resume_candidates(output_dir: Path, target: str) -> list[Path]:
    """``latest``: the complete checkpoints newest first; otherwise the one given path."""
    if target == "latest":
        found = checkpoints(output_dir)[::-1]
        if not found:
            raise ConfigError(f"resume_from_checkpoint=latest but {output_dir} has no complete checkpoint-N "
                              "directory; train with save_steps > 0 first or pass a checkpoint path")
        return found
    path = Path(target)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint={target} is not a checkpoint directory (no trainer_state.json); "
                          "pass a checkpoint-N directory or latest")
    return [path]


def read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint; a damaged file raises ValueError naming it."""
    text = (path / "trainer_state.json").read_text()
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / 'trainer_state.json'} is not valid JSON ({err.msg})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path / 'trainer_state.json'} has no 'step'")
    return state


def truncate_metrics(output_dir: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (a resumed run rewrites the rest); returns rows dropped."""
    path = output_dir / METRICS_NAME
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            dropped += 1  # a line cut by a crash
            continue
        if row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError)


def _load_errors() -> tuple[type[BaseException], ...]:
    import pickle

    errors: tuple[type[BaseException], ...] = LOAD_ERRORS + (pickle.UnpicklingError,)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:
        pass
    return errors


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Checkpointer:
    """Writes ``checkpoint-N/`` atomically, prunes old ones, and loads the newest that works.

    Args:
        accelerator: the run's accelerator (processes, barriers, ``save_state`` / ``load_state``).
        output_dir: the run directory.
        keep_last: keep the newest N checkpoints (None: all).
        save_model: writes the model (``save_pretrained``) into a directory; called on every process.
        state: writes and reads the ``state`` directory (``save(dir)`` / ``load(dir)``, on every process):
            ``rlclip.parallel.Layout.state_io``; default accelerate's ``save_state`` / ``load_state``.
    """

    def __init__(self, accelerator: Any, output_dir: Path, keep_last: int | None,
                 save_model: Callable[[Path], None], state: Any = None) -> None:
        self.accelerator, self.output_dir, self.keep_last = accelerator, output_dir, keep_last
        self.save_model = save_model
        if state is None:
            from rlclip.parallel import AccelerateState

            state = AccelerateState(accelerator)
        self.state = state

    def save(self, step: int, state: dict[str, Any], extras: dict[str, Any],
             per_process: dict[str, Any] | None = None) -> Path:
        """``state`` goes to trainer_state.json (written last), ``extras`` to ``<key>.pt`` (main process),
        ``per_process`` to ``<key>_<rank>.pt`` on every process."""
        import torch

        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        with atomic_directory(final, acc.is_main_process, acc.wait_for_everyone) as staging:
            self.save_model(staging)
            from rlclip.modeling import quiet_saving

            with quiet_saving():
                self.state.save(str(staging / "state"))
            for key, value in (per_process or {}).items():
                torch.save(value, staging / f"{key}_{acc.process_index}.pt")
            if acc.is_main_process:
                for key, value in extras.items():
                    torch.save(value, staging / f"{key}.pt")
                (staging / "trainer_state.json").write_text(json.dumps({**state, "step": step}))
        if acc.is_main_process:
            prune_checkpoints(self.output_dir, self.keep_last)
        acc.wait_for_everyone()
        return final

    def load(self, target: str, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any], Callable[[str], Any]]:
        """Load the accelerate state of ``target`` (``latest`` falls back to older checkpoints).

        Returns the checkpoint, its trainer state and a reader of its extras
        (``read("clipper")`` -> the object or None; per-process keys are read
        for this process's rank).
        """
        candidates = resume_candidates(self.output_dir, target)
        for i, path in enumerate(candidates):
            try:
                state = read_trainer_state(path)
                self.state.load(str(path / "state"))
                read = self._reader(path)
                for key in state.get("extras", []):
                    read(key)  # fail here, not later, on a damaged file
                return path, state, read
            except _load_errors() as err:
                problem = f"checkpoint {path} cannot be loaded ({_reason(err)})"
                if i + 1 < len(candidates):
                    warn(f"{problem}; falling back to {candidates[i + 1].name}")
                    continue
                fix = ("delete it or pass an older checkpoint-N" if target != "latest" or len(candidates) == 1
                       else "no older checkpoint loads either; start afresh with --overwrite_output_dir true")
                raise ConfigError(f"{problem}; {fix}") from None
        raise AssertionError("unreachable")

    def _reader(self, path: Path) -> Callable[[str], Any]:
        import torch

        rank = self.accelerator.process_index

        def read(key: str) -> Any:
            for name in (f"{key}_{rank}.pt", f"{key}.pt"):
                if (path / name).is_file():
                    return torch.load(path / name, weights_only=False)
            return None

        return read


def save_run(trainer: Any) -> Path:
    """A running Trainer's ``checkpoint-N/`` (atomic): model, optimizer/scheduler/RNG state, clipper,
    guard, entropy-coefficient and objective state, an unfinished rollout when a signal cut it short, and the
    rollouts waiting in the staleness queue."""
    state = {"rollout_index": trainer.rollout_index, "guard": trainer.guard.state_dict(),
             "entropy_bonus": trainer.entropy_bonus.state_dict(),
             "objective": trainer.objective.state_dict(),  # adaptive kl_coef, BAPO's bounds (rlclip/kl_control.py)
             "num_processes": trainer.accelerator.num_processes, "extras": ["clipper"]}
    per_process = {}
    if trainer.pending is not None:
        rollout, rollout_metrics, done = trainer.pending
        state.update(update_position=done)
        per_process["rollout"] = {"batch": rollout, "metrics": rollout_metrics}
    queue = trainer.queue.state_dict()  # rollouts sampled but not yet trained on (rollout.staleness > 0)
    state.update(sampled=queue["sampled"], staleness=trainer.queue.staleness)
    if queue["waiting"]:
        per_process["queue"] = queue
    state["extras"] = ["clipper", *per_process]
    return trainer.checkpointer.save(trainer.step, state, {"clipper": trainer.clipper.state_dict()},
                                     per_process or None)


def resume_run(trainer: Any) -> None:
    """Restore a Trainer from ``config.resume_from_checkpoint`` (a no-op without one): weights, optimizer,
    scheduler and RNG state, step counters, guard, clipper and entropy-coefficient state, an interrupted
    rollout; say where from."""
    target = trainer.config.resume_from_checkpoint
    if not target:
        return
    path, state, read = trainer.checkpointer.load(target, trainer._say)
    trainer.step, trainer.rollout_index = int(state["step"]), int(state["rollout_index"])
    trainer.guard.load_state_dict(state.get("guard", {}))
    trainer.entropy_bonus.load_state_dict(state.get("entropy_bonus", {}))
    trainer.objective.load_state_dict(state.get("objective", {}))  # older checkpoints have none: the constructor's
    clipper_state = read("clipper")
    if clipper_state is not None:
        trainer.clipper.load_state_dict(clipper_state)
    if "update_position" in state:
        saved = read("rollout")
        trainer.pending = (saved["batch"], saved["metrics"], int(state["update_position"]))
    queue = read("queue") if "queue" in state.get("extras", []) else None
    layout = (state.get("staleness"), state.get("num_processes", trainer.accelerator.num_processes))
    if queue is not None and layout != (trainer.queue.staleness, trainer.accelerator.num_processes):
        raise ConfigError(f"{path.name} holds the rollouts of a staleness queue (rollout.staleness={layout[0]}, "
                          f"{layout[1]} processes, one queue each); resume with the same rollout.staleness and "
                          "number of processes")
    sampled = int(state.get("sampled", trainer.rollout_index + (trainer.pending is not None)))
    trainer.queue.load_state_dict(queue or {"waiting": [], "sampled": sampled})
    saved_world = state.get("num_processes", trainer.accelerator.num_processes)
    if saved_world != trainer.accelerator.num_processes:
        trainer._say(f"{path.name} was written by {saved_world} processes and resumes on "
                     f"{trainer.accelerator.num_processes}: each rollout now has a different number of prompts")
    if trainer.accelerator.is_main_process:
        truncate_metrics(trainer.output_dir, trainer.step)
    left = trainer.config.max_steps - trainer.step
    trainer._say(f"resumed from {path} at step {trainer.step}" +
                 ("" if left > 0 else f"; max_steps={trainer.config.max_steps} is already reached, nothing to "
                                      "train (raise --max_steps to continue)"))
