"""The warm worker that runs generated programs, one forked child per program.

This file is a stand-alone script (standard library only): :mod:`dylora_moe.eval.sandbox` starts
it inside bubblewrap (or, without bwrap, as a plain process) and talks to it over its stdin and
stdout, one JSON object per line:

    request   {"program": "<python source>", "timeout": 3.0}
    reply     {"outcome": "passed|failed|timeout|memory|crash", "detail": "...", "seconds": 0.01}

For each request the worker forks a child that starts its own session and process group, moves
into a fresh empty working directory, sets its limits (CPU seconds, address space, file size,
number of processes, no core files), points stdin/stdout/stderr at /dev/null and executes the
program. The child reports how the program ended on a pipe only after the program returned (a
program that calls ``os._exit(0)`` or ``sys.exit()`` did not pass). The worker waits up to the
wall-clock timeout, then kills every process the program left behind (its process group and,
when the worker runs under a user id of its own or in its own PID namespace, every other
process it may signal), reaps them as their sub-reaper, and deletes the working directory.

Forking a warm interpreter costs about a millisecond, against about a hundred for starting
Python, which is why a pool of these beats one fresh process (or sandbox) per program.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import sys
import time
import traceback

# Where this interpreter lives (a venv under /tmp is bind-mounted into the private /tmp read-only).
_OWN_PYTHON = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}

PR_SET_CHILD_SUBREAPER = 36
RESULT_LIMIT = 2000  # characters of an error message reported back

# Imported once here so each forked program finds them in sys.modules (their import is then a
# dictionary look-up); the program still starts with an empty namespace of its own.
WARM_MODULES = ("math", "re", "collections", "itertools", "functools", "heapq", "string", "hashlib",
                "bisect", "typing", "operator", "statistics", "fractions", "decimal", "random", "copy")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=float, required=True, help="default wall-clock seconds per program")
    parser.add_argument("--memory_mb", type=int, required=True, help="address-space limit per process")
    parser.add_argument("--max_processes", type=int, required=True, help="RLIMIT_NPROC for the program's user")
    parser.add_argument("--max_file_mb", type=int, required=True, help="largest file a program may write")
    parser.add_argument("--work_root", required=True, help="where each program's fresh directory is made")
    parser.add_argument("--uid", type=int, default=None, help="run as this user id (set when started as root)")
    parser.add_argument("--own_pid_namespace", action="store_true", help="the worker is alone in its PID namespace")
    parser.add_argument("--clear_work_root", action="store_true", help="empty work_root after each program")
    return parser.parse_args(argv)


def drop_privileges(uid: int) -> None:
    """Become ``uid`` (user and group) with no supplementary groups and no capabilities."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def become_subreaper() -> None:
    """Orphaned descendants of a program are re-parented to us, so we can reap (and find) them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def process_count(uid: int) -> int:
    """Processes whose real user id is ``uid`` (RLIMIT_NPROC counts these)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            count += int(line.split()[1]) == uid
                            break
            except OSError:
                continue
    return count


def classify_exception(err: BaseException) -> str:
    if isinstance(err, MemoryError):
        return "memory"
    if isinstance(err, SyntaxError):
        return "syntax"
    if isinstance(err, (SystemExit, KeyboardInterrupt)):
        return "crash"  # the program ended itself before its tests finished
    return "failed"  # an assertion of the tests, or an exception of the code under test


def run_child(program: str, workdir: str, result_fd: int, limits: argparse.Namespace, nproc: int,
              timeout: float) -> None:
    """In the forked child: isolate, limit, run the program, report. Never returns."""
    try:
        os.setsid()
        os.chdir(workdir)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        cpu = max(1, int(timeout + 0.999))
        memory = limits.memory_mb * 2**20
        file_size = limits.max_file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.environ["HOME"] = workdir
        os.environ["TMPDIR"] = workdir
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    except BaseException as err:  # noqa: BLE001 - report anything, never run unlimited
        os.write(result_fd, json.dumps({"outcome": "crash", "detail": f"sandbox setup failed: {err!r}"}).encode())
        os._exit(70)
    try:
        code = compile(program, "<program>", "exec", dont_inherit=True)
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102 - the point of this file
        report = {"outcome": "passed", "detail": ""}
    except BaseException as err:  # noqa: BLE001 - every way a program can fail is an outcome
        frames = traceback.format_exception_only(type(err), err)
        report = {"outcome": classify_exception(err), "detail": "".join(frames).strip()[:RESULT_LIMIT]}
    try:
        os.write(result_fd, json.dumps(report).encode()[:60000])
    finally:
        os._exit(0)


def child_pids() -> list[int]:
    """Our direct children (orphaned descendants become ours: we are their sub-reaper)."""
    me, children = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[1] == me:
                    children.append(int(entry))
            except (OSError, IndexError):
                continue
    return children


def reap_all(pid: int, may_kill_all: bool) -> None:
    """Kill and reap everything the program left running; returns when we have no children."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if may_kill_all:
        try:
            os.kill(-1, signal.SIGKILL)  # all processes we may signal, except ourselves (see worker docs)
        except ProcessLookupError:
            pass
    while True:
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if reaped:
            continue
        for child in child_pids():  # ones that left the process group (setsid) and still run
            for kill in (lambda: os.killpg(child, signal.SIGKILL), lambda: os.kill(child, signal.SIGKILL)):
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass
        time.sleep(0.001)


def wait_for(pid: int, timeout: float) -> tuple[int | None, bool]:
    """(wait status or None, timed_out): wait for ``pid`` to exit, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pass
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, False
            left = deadline - time.monotonic()
            if left <= 0:
                return None, True
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.002))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def outcome_of(status: int | None, timed_out: bool, report: dict | None) -> dict:
    if timed_out:
        return {"outcome": "timeout", "detail": "wall-clock time limit reached"}
    if report is not None:
        return report
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return {"outcome": "timeout", "detail": "CPU time limit reached (SIGXCPU)"}
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXFSZ:
            return {"outcome": "crash", "detail": "file size limit reached (SIGXFSZ)"}
        return {"outcome": "crash", "detail": f"killed by {name}"}
    code = os.WEXITSTATUS(status)
    return {"outcome": "crash", "detail": f"exited with status {code} before its tests finished"}


def run_one(program: str, timeout: float, limits: argparse.Namespace, nproc: int, sample_number: int) -> dict:
    workdir = os.path.join(limits.work_root, f"program-{sample_number}")
    os.mkdir(workdir, 0o700)
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        run_child(program, workdir, write_fd, limits, nproc, timeout)
    os.close(write_fd)
    status, timed_out = wait_for(pid, timeout)
    seconds = time.monotonic() - start
    if timed_out:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _, status = os.waitpid(pid, 0)
    reap_all(pid, may_kill_all=limits.uid is not None or limits.own_pid_namespace)
    os.set_blocking(read_fd, False)
    try:
        raw = os.read(read_fd, 65536)
    except BlockingIOError:
        raw = b""
    os.close(read_fd)
    try:
        report = json.loads(raw) if raw else None
    except ValueError:
        report = {"outcome": "crash", "detail": "unreadable result"}
    result = outcome_of(status, timed_out, report)
    result["seconds"] = round(seconds, 4)
    shutil.rmtree(workdir, ignore_errors=True)
    if limits.clear_work_root:  # our private /tmp: nothing a program wrote outlives it
        for entry in os.listdir(limits.work_root):
            path = os.path.join(limits.work_root, entry)
            if any(root == path or root.startswith(path + "/") for root in _OWN_PYTHON):
                continue  # the folders holding this Python's read-only mount, when it lives under /tmp
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                _unlink(path)
    return result


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    limits = parse_args(argv)
    if limits.uid is not None:
        drop_privileges(limits.uid)
    become_subreaper()
    for name in WARM_MODULES:
        try:
            __import__(name)
        except ImportError:
            pass
    uid = os.getuid()
    # RLIMIT_NPROC counts all processes of the user: with a user id of our own that is just us;
    # otherwise leave room for what the user already runs.
    nproc = limits.max_processes + (1 if limits.uid is not None else process_count(uid))
    out = sys.stdout
    sample_number = 0
    for line in sys.stdin:
        request = json.loads(line)
        sample_number += 1
        try:
            result = run_one(request["program"], float(request.get("timeout") or limits.timeout), limits, nproc,
                             sample_number)
        except OSError as err:  # e.g. fork refused: say so and keep serving
            result = {"outcome": "crash", "detail": f"sandbox could not run the program: {err}", "seconds": 0.0}
        out.write(json.dumps(result) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
