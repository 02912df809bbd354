"""Run math-verify in reusable worker processes, with a timeout that works on any thread.

math-verify protects its sympy calls with ``signal.alarm``, which only works on the
main thread of the main interpreter. Rollout and evaluation code grade from worker
threads, so here math-verify's own timeouts are switched off and every ``parse`` +
``verify`` instead runs in a separate Python process. The parent waits for the
answer with a timeout; a worker that overruns is killed and replaced.

The workers are plain ``subprocess`` children started from this file's path (not
``multiprocessing``), so they never re-import the caller's ``__main__`` module and
are safe to use from scripts without a ``if __name__ == "__main__"`` guard.
Protocol: one JSON object per line on stdin (``{"gold": str, "pred": str}``), one
JSON object per line on stdout (``{"ok": bool}``); the worker prints ``ready``
once its imports are done.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import threading
import time

DEFAULT_TIMEOUT_S = float(os.environ.get("RLCLIP_GRADE_TIMEOUT", "5"))
STARTUP_TIMEOUT_S = 120.0
_READY = "ready"


class VerifyTimeout(Exception):
    """A worker did not answer within the timeout (it has been killed)."""


class _Worker:
    """One child process running :func:`_serve`, with a thread reading its stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=self._read, daemon=True, name="rlclip-verify-reader")
        reader.start()
        try:
            first = self._next_line(STARTUP_TIMEOUT_S)
        except VerifyTimeout:
            first = None
        if first != _READY:
            self.kill()
            raise RuntimeError("math-verify worker failed to start (is math-verify installed?)")

    def _read(self) -> None:
        """Forward every stdout line into ``self.lines``; ``None`` marks EOF."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty as exc:
            raise VerifyTimeout from exc

    def request(self, gold: str, pred: str, timeout: float) -> bool:
        """Ask the worker whether ``pred`` equals ``gold``; raises VerifyTimeout/RuntimeError."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"gold": gold, "pred": pred}) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise RuntimeError("math-verify worker died") from exc
        line = self._next_line(timeout)
        if line is None:
            raise RuntimeError("math-verify worker died")
        try:
            return bool(json.loads(line)["ok"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"math-verify worker sent {line[:80]!r}") from exc

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill the child and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


class VerifyPool:
    """A lazily grown pool of math-verify workers, safe to share between threads."""

    def __init__(self, max_workers: int | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self.timeout = timeout
        self._idle: list[_Worker] = []
        self._count = 0
        self._cond = threading.Condition()

    def _acquire(self) -> _Worker:
        with self._cond:
            while not self._idle and self._count >= self.max_workers:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            return _Worker()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._cond:
            if healthy and worker.alive():
                self._idle.append(worker)
            else:
                self._count -= 1
            self._cond.notify()
        if not healthy:
            worker.kill()

    def verify(self, gold: str, pred: str, timeout: float | None = None) -> bool:
        """True when math-verify finds ``pred`` equivalent to ``gold`` (both LaTeX answers).

        A comparison that runs past ``timeout`` seconds (default: the pool's) is
        killed and counts as False.
        """
        try:
            worker = self._acquire()
        except (RuntimeError, OSError) as exc:
            _warn_once(f"rlclip: math-verify unavailable, symbolic answers graded False ({exc})")
            return False
        healthy = False
        try:
            result = worker.request(gold, pred, self.timeout if timeout is None else timeout)
            healthy = True
            return result
        except (VerifyTimeout, RuntimeError):
            return False
        finally:
            self._release(worker, healthy)

    def close(self) -> None:
        """Kill every idle worker (busy ones are killed when released)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.kill()


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Print ``message`` to stderr the first time it occurs."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr)


_POOL: VerifyPool | None = None
_POOL_PID = 0
_POOL_LOCK = threading.Lock()


def get_pool() -> VerifyPool:
    """The process-wide pool, created on first use (and anew in a forked child process,
    which must not share its parent's worker pipes)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL, _POOL_PID = VerifyPool(), os.getpid()
            atexit.register(_POOL.close)
        return _POOL


# ----------------------------------------------------------------------------- child side


def _watch_parent(parent_pid: int) -> None:
    """Exit the worker when its parent disappears (even in the middle of a computation)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _compare(gold: str, pred: str) -> bool:
    """parse + verify with math-verify's signal timeouts disabled (we are the timeout)."""
    from math_verify import parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _serve() -> None:
    """Worker main loop: answer one JSON request per stdin line until EOF."""
    import logging

    logging.disable(logging.WARNING)
    import math_verify  # noqa: F401  (import before announcing readiness)

    # The first parse, the first symbolic simplification and the first numeric comparison load more of
    # sympy (about 15 s on a busy 2-core machine): do them before announcing readiness, so that the
    # per-comparison timeout measures comparisons, not warm-up.
    _compare("(x+1)^2", "x^2+2x+1")
    _compare("\\frac{\\sqrt{3}}{2}", "0.866")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    replies, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol
    print(_READY, file=replies, flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            ok = _compare(str(request["gold"]), str(request["pred"]))
        except Exception:
            ok = False
        print(json.dumps({"ok": ok}), file=replies, flush=True)


if __name__ == "__main__" and "--serve" in sys.argv[1:]:
    # Run by path: drop this file's folder from sys.path so nothing in it shadows a module.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    _serve()
