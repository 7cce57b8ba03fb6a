"""Loading named datasets and files of every supported schema as normalised records."""

from __future__ import annotations

import json
import os
import shutil

import datasets
import pytest

from dylora_moe.data import registry
from dylora_moe.data.registry import REGISTRY, known_names, load_records
from dylora_moe.errors import DataError
from tests.data.conftest import FIXTURES

FIELDS = {"instruction", "input", "output", "source"}


def as_list(records):
    rows = list(records)
    assert rows and all(set(r) == FIELDS for r in rows)
    assert all(r["instruction"] and r["output"] for r in rows)
    return rows


def test_code_alpaca_from_offline_directory(datasets_dir):
    records, stats = load_records("code_alpaca", data_dir=datasets_dir)
    rows = as_list(records)
    raw = json.loads((datasets_dir / "code_alpaca_2k.json").read_text())
    assert stats.rows == len(raw) == 2017
    assert stats.loaded == len(rows) == stats.rows - stats.skipped
    assert stats.origin.endswith("code_alpaca_2k.json")
    assert rows[0] == {
        "instruction": "What are the distinct values from the given list?",
        "input": "dataList = [3, 9, 3, 5, 7, 9, 5]",
        "output": "The distinct values from the given list are 3, 5, 7 and 9.",
        "source": "code_alpaca",
    }
    unusable = [r for r in raw if not r["instruction"].strip() or not r["output"].strip()]
    assert stats.skipped == len(unusable)


def test_data_dir_from_environment(datasets_dir, monkeypatch):
    monkeypatch.setenv("DYLORA_DATA_DIR", str(datasets_dir))
    _, stats = load_records("evol_instruct")
    assert stats.origin.endswith("evol_instruct_code_2k.json")


def test_evol_instruct_has_no_input(datasets_dir):
    records, stats = load_records("evol_instruct", data_dir=datasets_dir)
    rows = as_list(records)
    assert stats.rows == 1966 and len(rows) == 1966
    assert all(r["input"] == "" for r in rows)
    assert rows[0]["output"].startswith("SELECT name\nFROM employees")


def _mbpp_rows(datasets_dir):
    return [json.loads(line) for line in (datasets_dir / "mbpp.jsonl").read_text().splitlines()]


def test_mbpp_uses_train_task_ids_only(datasets_dir):
    records, stats = load_records("mbpp", data_dir=datasets_dir)
    rows = as_list(records)
    raw = _mbpp_rows(datasets_dir)
    train = [r for r in raw if 601 <= r["task_id"] <= 974]
    assert len(rows) == len(train) == 374
    assert stats.excluded == len(raw) - len(train) == 600
    # Each record is the task with the same position among the train ids: text, first test, code.
    for record, task in zip(rows, train):
        assert record["instruction"] == task["text"].strip()
        assert record["input"] == task["test_list"][0].strip()
        assert record["output"] == task["code"].replace("\r\n", "\n").strip("\n").rstrip()
    # (Some solutions repeat across MBPP splits, so the check is on the tasks, not on code text.)
    test_tasks = {(r["text"].strip(), r["test_list"][0].strip()) for r in raw if 11 <= r["task_id"] <= 510}
    assert not test_tasks & {(r["instruction"], r["input"]) for r in rows}


def test_mbpp_by_path_is_restricted_too(datasets_dir):
    records, stats = load_records(str(datasets_dir / "mbpp.jsonl"))
    assert len(records) == 374 and stats.excluded == 600


def test_mbpp_without_first_test(datasets_dir):
    records, _ = load_records("mbpp", data_dir=datasets_dir, mbpp_first_test=False)
    assert all(r["input"] == "" for r in records)


def test_mbpp_from_hub_asks_for_full_config_train_split(monkeypatch):
    calls = []
    rows = [{"task_id": t, "text": f"task {t}", "code": f"def f{t}(): return {t}",
             "test_list": [f"assert f{t}() == {t}"], "test_setup_code": "",
             "challenge_test_list": []} for t in (11, 510, 601, 974)]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(registry.datasets, "load_dataset", fake_load_dataset)
    records, stats = load_records("mbpp")
    assert calls == [(("google-research-datasets/mbpp", "full"), {"split": "train"})]
    assert [r["instruction"] for r in records] == ["task 601", "task 974"]
    assert stats.origin == "hub:google-research-datasets/mbpp"


@pytest.mark.parametrize("name", ["code_feedback", "m-a-p/CodeFeedback-Filtered-Instruction"])
def test_query_answer_schema_via_offline_dir(tmp_path, name):
    shutil.copy(FIXTURES / "code_feedback.jsonl", tmp_path / "code_feedback.jsonl")
    records, stats = load_records(name, data_dir=tmp_path)
    rows = as_list(records)
    assert stats.rows == 6 and stats.skipped == 2 and len(rows) == 4
    assert rows[0] == {
        "instruction": "Write a Python function that returns the square of a number.",
        "input": "",
        "output": "```python\ndef square(x):\n    return x * x\n```",
        "source": "code_feedback",
    }


def test_sharegpt_conversations(tmp_path):
    shutil.copy(FIXTURES / "python_code_23k_sharegpt.json", tmp_path)
    records, stats = load_records("python_code_23k_sharegpt", data_dir=tmp_path)
    rows = as_list(records)
    assert stats.skipped == 1  # the conversation without a reply
    assert [r["instruction"] for r in rows] == [
        "Write a function that checks whether a number is prime.",
        "Merge two sorted lists into one sorted list.",  # the system turn is not the instruction
        "Flatten a nested list one level deep.",
    ]
    assert rows[1]["output"].startswith("def merge(a, b):") and "merge3" not in rows[1]["output"]


def test_python_codes_25k_alpaca_with_text_column(tmp_path):
    shutil.copy(FIXTURES / "python_codes_25k.json", tmp_path)
    records, stats = load_records("python_codes_25k", data_dir=tmp_path)
    rows = as_list(records)
    assert (stats.rows, stats.skipped) == (5, 1)
    assert rows[1]["input"] == "celsius = 25"
    assert rows[3]["output"] == "with open(path) as f:\n    print(sum(1 for _ in f))"


def test_python_code_instructions_18k_ignores_prompt_column():
    records, _ = load_records(str(FIXTURES / "python_code_instructions_18k.json"))
    rows = as_list(records)
    assert len(rows) == 3
    assert rows[0]["instruction"] == "Create a function to calculate the sum of a sequence of integers."
    assert rows[0]["input"] == "[1, 2, 3, 4, 5]"
    assert rows[0]["source"] == "python_code_instructions_18k"


def test_prompt_completion_file():
    records, stats = load_records(str(FIXTURES / "prompt_completion.jsonl"))
    rows = as_list(records)
    assert (len(rows), stats.skipped) == (3, 1)
    assert rows[0]["output"] == "    return a + b"  # indentation of a completion is kept


def test_parquet_file(tmp_path):
    rows = json.loads((FIXTURES / "python_codes_25k.json").read_text())
    path = tmp_path / "my_set.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    records, stats = load_records(str(path))
    assert len(records) == 4 and stats.skipped == 1
    assert records[0]["source"] == "my_set"


def test_unknown_name_lists_known_names():
    with pytest.raises(DataError) as err:
        load_records("code_alpacca")
    message = str(err.value)
    assert "'code_alpacca'" in message
    for name in known_names():
        assert name in message
    assert "stdlib_functions" in message and "python_code_23k_sharegpt" in message


@pytest.mark.parametrize("name", ["humaneval", "openai_humaneval", "HumanEval"])
def test_humaneval_is_refused(name):
    with pytest.raises(DataError, match="evaluation benchmark") as err:
        load_records(name)
    assert repr(name) in str(err.value)


def test_hub_failure_names_dataset_directory_and_error(tmp_path, monkeypatch):
    def offline(spec):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode)")

    monkeypatch.setattr(registry, "load_from_hub", offline)
    with pytest.raises(DataError) as err:
        load_records("code_feedback", data_dir=tmp_path)
    message = str(err.value)
    assert "'code_feedback'" in message and str(tmp_path) in message
    assert "m-a-p/CodeFeedback-Filtered-Instruction" in message
    assert "ConnectionError: Couldn't reach the Hugging Face Hub" in message

    with pytest.raises(DataError, match="no offline directory .*DYLORA_DATA_DIR"):
        load_records("code_feedback")


def test_every_registered_name_has_a_real_hub_id():
    assert {s.name: s.hub_id for s in REGISTRY.values()} == {
        "code_alpaca": "sahil2801/CodeAlpaca-20k",
        "mbpp": "google-research-datasets/mbpp",
        "evol_instruct": "nickrosh/Evol-Instruct-Code-80k-v1",
        "code_feedback": "m-a-p/CodeFeedback-Filtered-Instruction",
        "python_codes_25k": "flytech/python-codes-25k",
        "python_code_instructions_18k": "iamtarun/python_code_instructions_18k_alpaca",
        "python_code_23k_sharegpt": "ajibawa-2023/Python-Code-23k-ShareGPT",
    }


def test_dataset_without_usable_rows_is_an_error():
    with pytest.raises(DataError, match=r"no usable records: 3 rows read.* 3 without a non-empty"):
        load_records(str(FIXTURES / "all_bad.jsonl"))


def test_unknown_schema_names_columns_and_accepted_schemas():
    with pytest.raises(DataError) as err:
        load_records(str(FIXTURES / "unknown_schema.jsonl"))
    message = str(err.value)
    assert "['question', 'reply']" in message
    assert "query_answer (query, answer)" in message and "sharegpt (conversations)" in message


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_ambiguous_offline_files_are_an_error(tmp_path):
    for stem in ("code_alpaca_2k", "code_alpaca_20k"):
        shutil.copy(FIXTURES / "python_codes_25k.json", tmp_path / f"{stem}.json")
    with pytest.raises(DataError, match="code_alpaca_20k.json, code_alpaca_2k.json"):
        load_records("code_alpaca", data_dir=tmp_path)
    shutil.copy(FIXTURES / "python_codes_25k.json", tmp_path / "code_alpaca.json")
    _, stats = load_records("code_alpaca", data_dir=tmp_path)  # an exact name wins
    assert stats.origin.endswith("code_alpaca.json")


def test_sharded_folder(tmp_path):
    folder = tmp_path / "code_feedback"
    folder.mkdir()
    lines = (FIXTURES / "code_feedback.jsonl").read_text().splitlines(keepends=True)
    (folder / "part-0.jsonl").write_text("".join(lines[:3]))
    (folder / "part-1.jsonl").write_text("".join(lines[3:]))
    records, stats = load_records("code_feedback", data_dir=tmp_path)
    assert stats.rows == 6 and len(records) == 4 and stats.origin == str(folder)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (make test sets it)")
def test_real_offline_hub_gives_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"'python_codes_25k' could not be loaded: no file named .*"
                                        r"flytech/python-codes-25k' failed with"):
        load_records("python_codes_25k", data_dir=tmp_path)


def test_role_content_conversations(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"conversations": [{"role": "user", "content": "Add one to x."},
                           {"role": "assistant", "content": "x += 1"}]},
        {"conversations": [{"from": "human", "value": "Print hello."},
                           {"from": "gpt", "value": "print('hello')"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, stats = load_records(str(path))
    assert [(r["instruction"], r["output"]) for r in records] == [
        ("Add one to x.", "x += 1"), ("Print hello.", "print('hello')")]
