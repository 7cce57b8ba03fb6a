"""`dylora train --eval_benchmarks humaneval`: real pass@1 at evaluation points, in the run's metrics."""

import json

import pytest

from dylora_moe.cli import main

FAST = ["--report_to", "none", "--progress", "false", "--save_steps", "0", "--max_seq_length", "128",
        "--training_subset", "5", "--eval_subset", "10", "--train_batch_size", "4"]


@pytest.mark.slow  # a training run with real pass@1 in the sandbox: about a minute
def test_training_logs_real_pass_at_1_at_evaluation_points(tmp_path, capsys):
    code = main(["train", "--output_dir", str(tmp_path), "--run_id", "ev", *FAST, "--max_steps", "2",
                 "--eval_steps", "2", "--eval_benchmarks", "humaneval", "--eval_every", "1", "--eval_max_tasks", "2"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in open(tmp_path / "ev" / "history.jsonl")]
    measured = {row["step"]: row for row in rows if "eval/humaneval/pass@1" in row}
    assert sorted(measured) == [1, 2]
    for row in measured.values():
        assert 0.0 <= row["eval/humaneval/pass@1"] <= 1.0
        rates = [row[f"eval/humaneval/{o}_rate"] for o in ("passed", "failed", "timeout", "memory", "syntax", "crash")]
        assert abs(sum(rates) - 1.0) < 1e-9


def test_an_unknown_training_benchmark_is_refused_before_training(tmp_path, capsys):
    code = main(["train", "--output_dir", str(tmp_path), *FAST, "--eval_benchmarks", "humaneval,nope"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--eval_benchmarks 'humaneval,nope': unknown benchmark(s) 'nope'; known: humaneval, mbpp" in err
    assert not any(tmp_path.iterdir())  # nothing was started
