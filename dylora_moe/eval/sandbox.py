"""Running generated programs where they cannot hurt anything: a pool of warm sandboxed workers.

Each worker is one long-lived Python process (:mod:`dylora_moe.eval.sandbox_worker`) that forks a
fresh child for every program. Where ``bwrap`` (Debian ``bubblewrap``) is installed, each worker
lives in its own bubblewrap sandbox:

* a new, empty root file system holding read-only binds of ``/usr``, ``/etc`` and the Python
  installation only: the home directory, the project, ``/var``, ``/work`` ... are not there;
* a private ``/tmp`` (a small tmpfs, emptied after every program) as the only writable place;
* its own network namespace (loopback only, nothing of the host's 127.0.0.1 is reachable), PID
  namespace (it sees and can signal only its own processes), IPC and UTS namespaces;
* a new session (no terminal), a cleared environment, ``no_new_privs`` (set-uid binaries do not
  elevate), and, when started as root, a user id of its own with no capabilities, so that
  ``RLIMIT_NPROC`` bounds fork bombs.

Without ``bwrap`` the workers run as plain processes with the limits only (``isolation ==
"limits"``; :meth:`Sandbox.describe` says so in every report). In both modes every program gets
its own process group and session, a wall-clock timeout, CPU-time, address-space, file-size and
process-count limits, a fresh working directory and a scrubbed environment, and everything it left
running is killed before the next program starts. ``docs/evaluation.md`` lists exactly what is and
is not contained.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ConfigError, DyLoRAError

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("sandbox_worker.py")
OUTCOMES = ("passed", "failed", "timeout", "memory", "syntax", "crash")
ISOLATION_MODES = ("auto", "bwrap", "limits")
_SANDBOX_WORKER_PATH = "/sandbox/worker.py"  # where the worker script appears inside bwrap
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_SCRUBBED_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
                 "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
_WATCHDOG_GRACE_S = 15.0  # beyond the program's own timeout, before the worker itself counts as hung


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``timeout_s`` is wall-clock; the CPU limit is its ceiling in seconds."""

    timeout_s: float = 3.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 64
    tmp_mb: int = 256  # size of the private /tmp (bwrap only)
    max_program_kb: int = 256  # a longer program is not run (nor compiled): it fails at once

    def validate(self) -> "SandboxLimits":
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout {self.timeout_s!r} is invalid: give seconds > 0 per program.")
        if self.memory_mb < 64:
            raise ConfigError(f"--memory_mb {self.memory_mb!r} is too small: Python needs at least 64 MB.")
        if self.max_processes < 1:
            raise ConfigError(f"--max_processes {self.max_processes!r} is invalid: give at least 1.")
        if self.max_program_kb < 1:
            raise ConfigError(f"--max_program_kb {self.max_program_kb!r} is invalid: give at least 1 (KB).")
        return self


@dataclass(frozen=True)
class ExecutionResult:
    """How one program ended: ``outcome`` is one of :data:`OUTCOMES`."""

    outcome: str
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def syntax_error(program: str) -> str | None:
    """The syntax error of ``program`` (checked without running it), or None."""
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences: the program's business, not ours
            warnings.simplefilter("ignore")
            compile(program, "<program>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parts[1:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _world_readable(path: str) -> bool:
    """Can any user reach and read ``path`` (every ancestor o+x, the path itself o+rx)?"""
    try:
        for p in [*_ancestors(path), path]:
            mode = os.stat(p).st_mode
            if not mode & stat.S_IXOTH or (p == path and not mode & stat.S_IROTH):
                return False
    except OSError:
        return False
    return True


def _python_roots() -> list[str]:
    """The directories a worker's Python needs to run and import (outside the system dirs)."""
    roots = []
    for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              str(Path(os.path.realpath(sys.executable)).parent.parent)}:
        real = os.path.realpath(p)
        if not any(real == d or real.startswith(d + "/") for d in _SYSTEM_DIRS):
            roots.append(real)
    # The venv keeps the path it was created with; bind that too when it is a symlink.
    if os.path.realpath(sys.prefix) != os.path.abspath(sys.prefix):
        roots.append(os.path.abspath(sys.prefix))
    roots = sorted(set(roots))
    return [r for r in roots if not any(r.startswith(o + "/") for o in roots if o != r)]


def _unique_uid() -> int:
    """A user id no one else uses, so RLIMIT_NPROC counts only this worker's processes."""
    return random.SystemRandom().randrange(2**20, 2**31 - 2)


class _Worker:
    """One sandboxed worker process and the pipe protocol to it."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: str, limits: SandboxLimits):
        self.limits = limits
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, cwd=cwd, start_new_session=True, text=True, bufsize=1)

    def run(self, program: str, timeout_s: float) -> ExecutionResult:
        try:
            self.proc.stdin.write(json.dumps({"program": program, "timeout": timeout_s}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return ExecutionResult("crash", f"sandbox worker is gone: {self._why_dead()}", 0.0)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s + _WATCHDOG_GRACE_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            hung = not ready
            self.kill()
            what = "did not answer in time" if hung else f"exited: {self._why_dead()}"
            return ExecutionResult("timeout" if hung else "crash", f"sandbox worker {what}", 0.0)
        reply = json.loads(line)
        return ExecutionResult(reply["outcome"], reply.get("detail", ""), float(reply.get("seconds", 0.0)))

    def _why_dead(self) -> str:
        try:
            self.proc.wait(timeout=5)
            err = self.proc.stderr.read().strip().splitlines()
        except (subprocess.TimeoutExpired, OSError, ValueError):
            err = []
        return f"status {self.proc.returncode}" + (f" ({err[-1]})" if err else "")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the worker's loop ends at EOF
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


class Sandbox:
    """A pool of warm sandboxed workers; use as a context manager, or call :meth:`close`.

    ``isolation``: ``auto`` (bwrap when installed, else limits only), ``bwrap`` (an error when it
    is missing) or ``limits``.
    """

    _warned = False

    def __init__(self, limits: SandboxLimits | None = None, workers: int | None = None, isolation: str = "auto"):
        self.limits = (limits or SandboxLimits()).validate()
        if isolation not in ISOLATION_MODES:
            raise ConfigError(f"--isolation {isolation!r} is unknown: use one of {', '.join(ISOLATION_MODES)}.")
        self.bwrap = bwrap_path() if isolation in ("auto", "bwrap") else None
        if isolation == "bwrap" and self.bwrap is None:
            raise ConfigError("--isolation bwrap asks for bubblewrap, but no 'bwrap' is on PATH: install the "
                              "Debian/Ubuntu package 'bubblewrap' (apt-get install bubblewrap) "
                              "or use --isolation auto.")
        self.isolation = "bwrap" if self.bwrap else "limits"
        self.num_workers = max(1, workers or min(8, os.cpu_count() or 1))
        self.is_root = os.geteuid() == 0
        # Without bwrap, a root worker only switches to a user id of its own when that user can
        # still read the Python installation (else imports would fail).
        self.own_uid = self.is_root and (self.isolation == "bwrap" or all(
            _world_readable(p) for p in [*_python_roots(), str(WORKER_SCRIPT)]))
        self._workers: list[_Worker | None] = [None] * self.num_workers
        self._work_roots: list[str] = []
        self._why_limits = "bwrap not found" if isolation == "auto" else "--isolation limits"
        if self.isolation == "limits" and not Sandbox._warned:
            Sandbox._warned = True  # once per process, not at every evaluation point of a training run
            log.warning("%s: generated code runs with resource limits only, without file-system, network or "
                        "PID isolation. Install 'bubblewrap' for the full sandbox.", self._why_limits)

    # ------------------------------------------------------------------ description
    def describe(self) -> str:
        """One line for reports: what contains the programs."""
        limits = (f"per program: own process group, wall-clock timeout and CPU-time limit, {self.limits.memory_mb} MB "
                  f"address space, {self.limits.max_processes} processes, {self.limits.max_file_mb} MB files, fresh "
                  "working directory, scrubbed environment")
        user = "its own user id, no capabilities" if self.own_uid else (
            "runs as root: RLIMIT_NPROC is not enforced" if self.is_root else "runs as the current user")
        if self.isolation == "bwrap":
            return (f"bubblewrap: read-only /usr /etc and Python only (no home, no project), private /tmp, "
                    f"no network, own PID namespace, {user}; {limits}")
        return (f"limits only ({self._why_limits}): NO file-system, network or PID isolation, {user}; {limits}")

    # ------------------------------------------------------------------ workers
    def _command(self, uid: int | None, work_root: str) -> tuple[list[str], str]:
        python = os.path.abspath(sys.executable)
        worker_args = ["--timeout", str(self.limits.timeout_s), "--memory_mb", str(self.limits.memory_mb),
                       "--max_processes", str(self.limits.max_processes), "--max_file_mb", str(self.limits.max_file_mb)]
        if uid is not None:
            worker_args += ["--uid", str(uid)]
        if self.isolation == "limits":
            return [python, "-I", "-B", str(WORKER_SCRIPT), *worker_args, "--work_root", work_root], work_root
        # No --die-with-parent: its PR_SET_PDEATHSIG fires when the *thread* that started bwrap ends.
        # A worker whose parent dies reads EOF on stdin and exits after the program it runs.
        cmd = [self.bwrap, "--new-session", "--unshare-net", "--unshare-pid", "--unshare-ipc",
               "--unshare-uts", "--unshare-cgroup-try", "--tmpfs", "/"]
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                cmd += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                cmd += ["--ro-bind", d, d]
        cmd += ["--perms", "0755", "--dir", "/sandbox", "--ro-bind", str(WORKER_SCRIPT), _SANDBOX_WORKER_PATH,
                "--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--size", str(self.limits.tmp_mb * 2**20),
                "--tmpfs", "/tmp", "--chdir", "/tmp", "--cap-drop", "ALL"]
        # After the private /tmp: a Python installed under /tmp (a checkout there, as CI may use) stays visible.
        made = {"/tmp"}
        for root in _python_roots():
            for parent in _ancestors(root + "/x"):  # readable parents even where the host's are 0700 (/root)
                if parent not in made and not any(parent == d or parent.startswith(d + "/") for d in _SYSTEM_DIRS):
                    cmd += ["--perms", "0755", "--dir", parent]
                    made.add(parent)
            cmd += ["--ro-bind", root, root]
        if uid is not None:  # the worker needs these two to become its own user; then it has none
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        cmd += ["--", python, "-I", "-B", _SANDBOX_WORKER_PATH, *worker_args, "--work_root", "/tmp",
                "--own_pid_namespace", "--clear_work_root"]
        return cmd, "/"

    def _start_worker(self) -> _Worker:
        uid = _unique_uid() if self.own_uid else None
        work_root = "/tmp"  # the sandbox's private one
        if self.isolation == "limits":
            work_root = tempfile.mkdtemp(prefix="dylora-sandbox-")
            self._work_roots.append(work_root)
            if uid is not None:
                os.chown(work_root, uid, uid)
        command, cwd = self._command(uid, work_root)
        env = dict(_SCRUBBED_ENV, HOME=work_root if self.isolation == "limits" else "/tmp")
        return _Worker(command, env, cwd, self.limits)

    def _worker(self, slot: int) -> _Worker:
        worker = self._workers[slot]
        if worker is None or not worker.alive:
            worker = self._workers[slot] = self._start_worker()
        return worker

    def _check_started(self, slots: int) -> None:
        """Start the first workers and run a trivial program in each: a sandbox that cannot start is
        an error now, not every sample counted as a crash."""
        for slot in range(slots):
            if self._workers[slot] is None:
                probe = self._worker(slot).run("pass\n", self.limits.timeout_s)
                if not probe.passed:
                    self.close()
                    fallback = " (or --isolation limits, without isolation)" if self.isolation == "bwrap" else ""
                    raise DyLoRAError(f"the {self.isolation} sandbox cannot run programs on this machine: "
                                      f"{probe.detail}. Check the command{fallback}.")

    # ------------------------------------------------------------------ running
    def run(self, programs: Iterable[str], on_result: Callable[[int, ExecutionResult], None] | None = None,
            timeout_s: float | None = None) -> list[ExecutionResult]:
        """Run every program (syntax-checked first); results in the order given.

        ``timeout_s`` overrides the limits' wall-clock timeout for these programs.
        ``on_result(index, result)`` is called as each finishes (from worker threads), e.g. to move
        a progress bar.
        """
        programs = list(programs)
        timeout = timeout_s or self.limits.timeout_s
        results: list[ExecutionResult | None] = [None] * len(programs)
        jobs: queue.Queue = queue.Queue()
        for index, program in enumerate(programs):
            # Size first: a huge completion costs nothing to refuse, but minutes to compile, send and record.
            size_kb = len(program.encode("utf-8", "replace")) / 1024
            if size_kb > self.limits.max_program_kb:
                results[index] = ExecutionResult(
                    "failed", f"not run: the program is {size_kb:,.0f} KB, over --max_program_kb "
                    f"{self.limits.max_program_kb}", 0.0)
                error = None
            else:
                error = syntax_error(program)
            if results[index] is not None:
                if on_result:
                    on_result(index, results[index])
            elif error is not None:
                results[index] = ExecutionResult("syntax", error, 0.0)
                if on_result:
                    on_result(index, results[index])
            else:
                jobs.put(index)

        def serve(slot: int) -> None:
            while True:
                try:
                    index = jobs.get_nowait()
                except queue.Empty:
                    return
                result = self._worker(slot).run(programs[index], timeout)
                results[index] = result
                if on_result:
                    on_result(index, result)

        slots = min(self.num_workers, jobs.qsize())
        self._check_started(slots)
        threads = [threading.Thread(target=serve, args=(slot,), daemon=True) for slot in range(slots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for worker in self._workers:
            if worker is not None:
                worker.close()
        self._workers = [None] * self.num_workers
        for root in self._work_roots:
            shutil.rmtree(root, ignore_errors=True)
        self._work_roots = []

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
