"""Each attack is contained and the next program, in the same warm worker, still runs normally."""

import socket
import uuid
from pathlib import Path

import pytest

from dylora_moe.eval.sandbox import Sandbox, SandboxLimits, syntax_error

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs after every attack: it must pass, and see nothing the attack left running in its PID
# namespace (bubblewrap's init, the worker, this program).
FOLLOW_UP = "import os\nleft = [p for p in os.listdir('/proc') if p.isdigit()]\nassert len(left) <= 3, left\n"


def run_attack(sandbox, program):
    attack, follow_up = sandbox.run([program, FOLLOW_UP])
    assert follow_up.outcome == "passed", follow_up
    return attack


def test_infinite_loop_times_out(bwrap_sandbox):
    result = run_attack(bwrap_sandbox, "while True:\n    pass\n")
    assert result.outcome == "timeout"
    assert result.seconds >= 1.9  # killed at the 2 s limit, not earlier


def test_memory_hog_hits_the_address_space_limit(bwrap_sandbox):
    result = run_attack(bwrap_sandbox, "hog = []\nwhile True:\n    hog.append(bytearray(32 * 2**20))\n")
    assert result.outcome == "memory", result


def test_fork_count_is_capped_by_rlimit_nproc(bwrap_sandbox):
    # Bounded even if the limit failed: at most 200 sleeping children, all killed afterwards.
    program = (
        "import os, time\nchildren = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "    children += 1\nraise AssertionError(f'forked {children}')\n"
    )
    result = run_attack(bwrap_sandbox, program)
    assert result.outcome == "failed"
    forked = int(result.detail.rsplit(" ", 1)[1])
    assert 1 <= forked < 16, result.detail


def test_fork_bomb_is_contained_and_cleaned_up(bwrap_sandbox):
    # At most 2**6 = 64 spinning processes even without limits; RLIMIT_NPROC stops it at 16.
    program = ("import os\nfor _ in range(6):\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
               "while True:\n    pass\n")
    result = run_attack(bwrap_sandbox, program)
    assert result.outcome == "timeout"


def test_writes_outside_the_temporary_directory_are_refused(bwrap_sandbox):
    targets = [REPO_ROOT / f"sandbox-escape-{uuid.uuid4().hex}.txt",
               Path.home() / f".sandbox-escape-{uuid.uuid4().hex}"]
    try:
        for target in targets:
            result = run_attack(bwrap_sandbox, f"open({str(target)!r}, 'w').write('escaped')\n")
            assert result.outcome == "failed"
            assert result.detail.startswith(("PermissionError", "OSError", "FileNotFoundError")), result.detail
            assert not target.exists()
        # ... while its own /tmp works
        assert bwrap_sandbox.run(
            ["open('/tmp/scratch', 'w').write('ok')\nassert open('/tmp/scratch').read() == 'ok'\n"])[0].passed
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_a_file_in_the_users_home_cannot_be_read(bwrap_sandbox):
    secret = Path.home() / f".dylora-sandbox-secret-{uuid.uuid4().hex}"
    secret.write_text("TOP-SECRET-TOKEN")
    try:
        assert secret.read_text() == "TOP-SECRET-TOKEN"  # readable outside the sandbox
        result = run_attack(bwrap_sandbox, f"raise ValueError(open({str(secret)!r}).read())\n")
        assert result.outcome == "failed"
        assert result.detail.startswith(("FileNotFoundError", "PermissionError")), result.detail
        assert "TOP-SECRET" not in result.detail
    finally:
        secret.unlink()


def test_a_server_on_the_hosts_loopback_is_unreachable(bwrap_sandbox):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            server.accept()[0].close()  # reachable from the host
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
        result = run_attack(bwrap_sandbox, program)
        assert result.outcome == "failed"
        assert result.detail.startswith(("ConnectionRefusedError", "OSError", "TimeoutError")), result.detail
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing connected


def test_a_program_that_exits_early_has_not_passed(bwrap_sandbox):
    exit_zero, hard_exit, raised, syntax = bwrap_sandbox.run(
        ["import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\n", "assert 1 == 2, 'wrong'\n",
         "def f(:\n"])
    assert (exit_zero.outcome, hard_exit.outcome) == ("crash", "crash")
    assert (raised.outcome, raised.detail) == ("failed", "AssertionError: wrong")
    assert syntax.outcome == "syntax" and syntax.seconds == 0.0  # rejected before execution
    assert syntax_error("x = (1,\n") is not None and syntax_error("x = 1\n") is None


def test_without_bwrap_the_limits_still_hold_and_the_report_says_so():
    with Sandbox(SandboxLimits(timeout_s=1.0, memory_mb=256), workers=1, isolation="limits") as sandbox:
        assert sandbox.describe().startswith(
            "limits only (--isolation limits): NO file-system, network or PID isolation")
        loop, hog, ok = sandbox.run(["while True:\n    pass\n", "x = bytearray(2**30)\n",
                                     "assert sum(range(4)) == 6\n"])
    assert (loop.outcome, hog.outcome, ok.outcome) == ("timeout", "memory", "passed")


def test_bwrap_describes_its_isolation(bwrap_sandbox):
    text = bwrap_sandbox.describe()
    assert text.startswith("bubblewrap: read-only /usr /etc and Python only")
    assert "no network, own PID namespace" in text


@pytest.mark.needs_bwrap
def test_a_sandbox_that_cannot_start_is_an_error_not_a_row_of_crashes(monkeypatch):
    from dylora_moe.errors import DyLoRAError

    sandbox = Sandbox(workers=1, isolation="bwrap")
    monkeypatch.setattr(sandbox, "bwrap", "/bin/false")  # a bwrap that exits at once, as with user namespaces off
    with pytest.raises(DyLoRAError, match="the bwrap sandbox cannot run programs on this machine: sandbox worker"):
        sandbox.run(["assert True\n"])
