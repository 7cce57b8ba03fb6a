"""The sandbox's limits hold at the values configured, not merely somewhere, and what one program
leaves behind never reaches the next one; a timed-out sample never counts as passed."""

import pytest

from dylora_moe.eval.sandbox import Sandbox, SandboxLimits
from dylora_moe.eval.scoring import score_completions
from dylora_moe.eval.task import Task


def allocate(mb: int) -> str:
    # bytearray touches every page, so the allocation is real, not only reserved
    return f"block = bytearray({mb} * 2**20)\nassert len(block) == {mb} * 2**20\n"


@pytest.fixture(scope="module")
def small_tmp_sandbox():
    """bwrap with a 16 MB private /tmp and a 256 MB address-space limit; one warm worker."""
    with Sandbox(SandboxLimits(timeout_s=5.0, memory_mb=256, tmp_mb=16), workers=1, isolation="bwrap") as sandbox:
        yield sandbox


@pytest.mark.needs_bwrap
def test_the_memory_limit_is_the_configured_one(small_tmp_sandbox):
    # Python itself takes tens of MB of address space: well under the limit passes, over it fails,
    # and twice the limit (which a limit set too loosely would still allow) fails too
    under, over, double = small_tmp_sandbox.run([allocate(64), allocate(300), allocate(512)])
    assert under.passed, under.detail
    assert over.outcome == "memory" and double.outcome == "memory", (over, double)


def test_the_memory_limit_holds_without_bwrap_too():
    with Sandbox(SandboxLimits(timeout_s=5.0, memory_mb=256), workers=1, isolation="limits") as sandbox:
        under, over = sandbox.run([allocate(64), allocate(300)])
    assert under.passed, under.detail
    assert over.outcome == "memory", over


@pytest.mark.needs_bwrap
def test_the_private_tmp_is_emptied_between_programs(small_tmp_sandbox):
    write = "open('/tmp/left-behind', 'w').write('from the previous program')\n"
    read = "import os\nassert not os.path.exists('/tmp/left-behind'), open('/tmp/left-behind').read()\n"
    first, second = small_tmp_sandbox.run([write, read])
    assert first.passed and second.passed, second.detail


@pytest.mark.needs_bwrap
def test_the_private_tmp_has_its_size_limit(small_tmp_sandbox):
    fill = ("import errno\ntry:\n    with open('/tmp/big', 'wb') as f:\n        for _ in range({n}):\n"
            "            f.write(b'x' * 2**20)\nexcept OSError as err:\n    assert err.errno == errno.ENOSPC\n"
            "    raise SystemExit(3)\n")
    fits, overflows = small_tmp_sandbox.run([fill.format(n=8), fill.format(n=32)])
    assert fits.passed, fits.detail
    assert overflows.detail == "SystemExit: 3", overflows  # ENOSPC from the 16 MB /tmp


def test_a_sample_that_times_out_is_not_scored_as_passed():
    task = Task(benchmark="humaneval", task_id="HumanEval/0", prompt="", program_prefix="", tests="",
                stop_sequences=(), reference="pass", timeout_s=1.0)
    with Sandbox(SandboxLimits(timeout_s=1.0), workers=1, isolation="limits") as sandbox:
        results, score = score_completions([task], {task.task_id: ["import time\ntime.sleep(30)\n", "pass\n"]},
                                           sandbox, [1], "m", progress=False)
    assert [(r.outcome, r.passed) for r in results] == [("timeout", False), ("passed", True)]
    assert score.outcomes["timeout"] == 1 and score.per_task["HumanEval/0"]["c"] == 1
    assert score.pass_at_k["pass@1"] == pytest.approx(0.5)


def test_a_program_over_the_size_cap_fails_without_being_compiled_or_run():
    huge = "x = 1\n" + "# filler\n" * 40_000  # about 350 KB: over the 256 KB default
    with Sandbox(SandboxLimits(timeout_s=5.0), workers=1, isolation="limits") as sandbox:
        small, big = sandbox.run(["assert True\n", huge])
    assert small.passed
    assert big.outcome == "failed"
    assert big.detail.startswith("not run: the program is 352 KB, over --max_program_kb 256")


def test_dylora_eval_samples_with_a_huge_completion_scores_it_as_failed(tmp_path):
    import json
    import subprocess
    import sys

    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0",
                                   "completion": "    return False\n" + "#" * 2_000_000}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "dylora_moe.cli", "eval", "--samples", str(samples), "--benchmarks",
                           "humaneval", "--out", str(tmp_path / "out"), "--report_to", "none", "--isolation", "limits"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (result,) = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert result["outcome"] == "failed" and "over --max_program_kb 256" in result["detail"]
