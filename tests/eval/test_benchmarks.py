from pathlib import Path

import pytest

from dylora_moe.errors import ConfigError
from dylora_moe.eval.benchmarks import check_benchmarks, load_tasks, select_tasks

SHARED_DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


@pytest.fixture(scope="module")
def humaneval():
    return load_tasks("humaneval")


@pytest.fixture(scope="module")
def mbpp():
    return load_tasks("mbpp", str(SHARED_DATASETS))


def test_all_164_canonical_humaneval_solutions_pass_and_broken_ones_fail(humaneval, pool):
    assert len(humaneval) == 164
    canonical = pool.run([t.program(t.reference) for t in humaneval])
    assert [t.task_id for t, r in zip(humaneval, canonical) if not r.passed] == []
    # Broken: the body returns nothing, or raises; the tests catch both everywhere.
    broken = pool.run([t.program(c) for t in humaneval
                       for c in ("    return None\n", "    raise NotImplementedError\n")])
    assert sum(r.passed for r in broken) == 0
    assert {r.outcome for r in broken} == {"failed"}
    unparsable = pool.run([humaneval[0].program(humaneval[0].reference + "\n    return (\n")])[0]
    assert unparsable.outcome == "syntax"


@pytest.mark.slow
def test_mbpp_reference_code_passes_its_tests_on_the_test_split(mbpp, pool):
    assert [int(t.task_id.split("/")[1]) for t in mbpp] == list(range(11, 511))
    # MBPP/123 takes seconds on a busy machine
    results = pool.run([t.program(t.reference) for t in mbpp], timeout_s=20.0)
    assert [(t.task_id, r.outcome) for t, r in zip(mbpp, results) if not r.passed] == []
    wrong = pool.run([t.program("def unrelated():\n    return 0\n") for t in mbpp[:20]])
    assert {r.outcome for r in wrong} == {"failed"}


def test_humaneval_prompt_form_and_stop_sequences(humaneval):
    task = humaneval[0]
    assert task.task_id == "HumanEval/0" and task.prompt.startswith("from typing import List")
    assert task.program("    return 1\n").startswith(task.prompt + "    return 1\n")
    assert task.program("").rstrip().endswith("check(has_close_elements)")
    text = "    return True\n\n\ndef extra():\n    pass\n"
    assert task.truncate(text) == "    return True\n\n"
    assert task.truncate("    x = 1\nif __name__ == '__main__':\n") == "    x = 1"
    assert task.truncate("    return 2") == "    return 2"


def test_mbpp_prompt_is_the_papers_three_shot_form(mbpp):
    task = mbpp[0]
    assert task.task_id == "MBPP/11"
    assert task.prompt.count("[BEGIN]") == 4 and task.prompt.count("[DONE]") == 3
    assert task.prompt.startswith("You are an expert Python programmer, and here is your task: "
                                  "Write a function to find the similar elements")
    assert task.prompt.endswith("assert remove_Occ(\"PHP\",\"P\") == \"H\"\n[BEGIN]\n")
    assert task.truncate("def f():\n    return 1\n[DONE]\nYou are") == "def f():\n    return 1\n"
    assert task.program("def remove_Occ(s, ch): return s").startswith(
        "def remove_Occ(s, ch): return s\nassert remove_Occ")


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown benchmark\(s\) 'nope'; known: humaneval, mbpp"):
        check_benchmarks(["humaneval", "nope"])


def test_task_selection(humaneval):
    assert [t.task_id for t in select_tasks(humaneval, None, 3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert [t.task_id for t in select_tasks(humaneval, ["HumanEval/7", "3"], None)] == ["HumanEval/7", "HumanEval/3"]
