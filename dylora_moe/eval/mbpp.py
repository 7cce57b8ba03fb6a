"""MBPP (Austin et al. 2021): the test split, task ids 11-510, in the paper's three-shot prompt.

Data: the Hugging Face Hub (``google-research-datasets/mbpp``, config ``full``: split ``test`` for
the tasks, split ``prompt`` for the shots) or, offline, a file in the hub schema found in the data
directory (``--data_dir`` or ``$DYLORA_DATA_DIR``, e.g. ``../shared/datasets/mbpp.jsonl``); the
same lookup as training's named datasets. Rows outside 11-510 are ignored, so a file with every
split serves too.

The prompt is the paper's: three solved examples (task ids 2, 3 and 4, from the prompt split set
aside for this) followed by the task, each as "You are an expert Python programmer, and here is
your task: {text} Your code should pass these tests:\\n\\n{tests}\\n[BEGIN]\\n"; the model writes
code up to ``[DONE]``. The program that is run is the completion, the task's setup code and its
three ``assert`` tests.
"""

from __future__ import annotations

import dataclasses

from ..data.registry import REGISTRY, find_local_files, load_from_hub, resolve_data_dir
from ..errors import DataError
from .task import Task

TEST_IDS = (11, 510)
SHOT_IDS = (2, 3, 4)
STOP_SEQUENCES = ("[DONE]",)
# Reference solutions of a few tasks take seconds (MBPP/123 sums amicable numbers below 10,000:
# 6 s measured on a busy 2-core machine), so MBPP gets more time than HumanEval.
TIMEOUT_S = 10.0
_TEST_SPEC = dataclasses.replace(REGISTRY["mbpp"], split="test", task_id_range=TEST_IDS)
_PROMPT_SPEC = dataclasses.replace(REGISTRY["mbpp"], split="prompt", task_id_range=(1, 10))


def _code(row: dict) -> str:
    return row["code"].replace("\r\n", "\n").strip()


def _header(row: dict) -> str:
    tests = "\n".join(row["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {row['text'].strip()} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def _rows(data_dir: str | None) -> tuple[list[dict], list[dict]]:
    """(test rows, shot rows) from the offline directory when it has MBPP, else the hub."""
    offline = resolve_data_dir(data_dir)
    files = find_local_files(_TEST_SPEC, offline) if offline is not None else []
    if files:
        import datasets

        rows = []
        for path in files:
            builder = "parquet" if path.suffix == ".parquet" else "json"
            try:
                rows += list(datasets.load_dataset(builder, data_files=str(path), split="train"))
            except Exception as err:  # the json/parquet builders raise many kinds
                raise DataError(f"Cannot read MBPP from {path}: {type(err).__name__}: {err}") from err
        return rows, rows
    try:
        return list(load_from_hub(_TEST_SPEC)), list(load_from_hub(_PROMPT_SPEC))
    except Exception as err:  # offline hub, missing cache, ...
        where = (f"no MBPP file in {offline}" if offline is not None
                 else "no offline directory (--data_dir or $DYLORA_DATA_DIR)")
        raise DataError(f"Cannot load MBPP: {where}, and the hub copy {_TEST_SPEC.hub_id} failed "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Give --data_dir "
                        "with mbpp.jsonl in the hub schema (text, code, task_id, test_list, test_setup_code).") from err


def load_tasks(data_dir: str | None = None) -> list[Task]:
    rows, shot_rows = _rows(data_dir)
    missing = {"text", "code", "task_id", "test_list"} - set(rows[0] if rows else {})
    if missing:
        raise DataError(f"MBPP rows lack the hub schema's field(s) {', '.join(sorted(missing))}.")
    shots = {int(r["task_id"]): r for r in shot_rows if int(r["task_id"]) in SHOT_IDS}
    if len(shots) != len(SHOT_IDS):
        raise DataError(f"MBPP's few-shot examples (task ids {SHOT_IDS}) are missing from the data.")
    preamble = "".join(f"{_header(shots[i])}{_code(shots[i])}\n[DONE]\n" for i in SHOT_IDS)
    tasks = []
    for row in sorted(rows, key=lambda r: int(r["task_id"])):
        if not TEST_IDS[0] <= int(row["task_id"]) <= TEST_IDS[1]:
            continue
        setup = (row.get("test_setup_code") or "").strip()
        tests = "\n".join(([setup] if setup else []) + list(row["test_list"]))
        tasks.append(Task(benchmark="mbpp", task_id=f"MBPP/{int(row['task_id'])}", prompt=preamble + _header(row),
                          program_prefix="", tests=tests, stop_sequences=STOP_SEQUENCES, reference=_code(row),
                          timeout_s=TIMEOUT_S))
    if not tasks:
        raise DataError(f"The MBPP data holds no test-split task (ids {TEST_IDS[0]}-{TEST_IDS[1]}).")
    return tasks
