"""Named training datasets: where they live, their schema, and how to load them as records.

``load_records(name, data_dir=None)`` is the one entry point. ``name`` is resolved in order:

1. ``humaneval`` / ``openai_humaneval``: refused, they are the evaluation benchmark.
2. A path to a ``.json``, ``.jsonl`` or ``.parquet`` file: loaded with its schema detected from
   the columns (see :mod:`dylora_moe.data.schemas`).
3. ``stdlib_functions``: the built-in set (:mod:`dylora_moe.data.builtin`), needs no files.
4. A registered name (or its Hugging Face id): first looked for in the offline directory
   (``data_dir`` or ``$DYLORA_DATA_DIR``) as ``<name>.json|jsonl|parquet``, ``<name>*.<ext>``
   (e.g. ``code_alpaca_2k.json``, ``mbpp.jsonl``) or a folder ``<name>/`` of such files, in the
   hub schema; otherwise ``datasets.load_dataset(hub_id, config, split=...)``.

Anything else is a :class:`~dylora_moe.errors.DataError` that lists the known names.

MBPP is restricted to its train split (task ids 601-974) however it is loaded: task ids 11-510
are the evaluation's test split and must never be trained on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..errors import DataError
from .schemas import detect_schema, records_from_batch

log = logging.getLogger(__name__)

DATA_DIR_ENV = "DYLORA_DATA_DIR"
BUILTIN_NAME = "stdlib_functions"
FILE_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset on the Hugging Face Hub and the local files that stand in for it."""

    name: str
    hub_id: str
    schema: str
    split: str = "train"
    config: str | None = None
    task_id_range: tuple[int, int] | None = None  # inclusive; rows outside are not ours to use
    description: str = ""

    @property
    def file_stems(self) -> tuple[str, ...]:
        """Stems an offline file may start with: the registry name and the hub repo's name."""
        return (self.name, self.hub_id.split("/")[-1])


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("code_alpaca", "sahil2801/CodeAlpaca-20k", "alpaca",
                    description="20k instruction/input/output code tasks"),
        DatasetSpec("mbpp", "google-research-datasets/mbpp", "mbpp", split="train",
                    config="full", task_id_range=(601, 974),
                    description="MBPP train split only (task ids 601-974)"),
        DatasetSpec("evol_instruct", "nickrosh/Evol-Instruct-Code-80k-v1", "alpaca",
                    description="80k evolved code instructions (instruction/output)"),
        DatasetSpec("code_feedback", "m-a-p/CodeFeedback-Filtered-Instruction", "query_answer",
                    description="156k filtered code queries and answers"),
        DatasetSpec("python_codes_25k", "flytech/python-codes-25k", "alpaca",
                    description="25k Python instruction/input/output"),
        DatasetSpec("python_code_instructions_18k", "iamtarun/python_code_instructions_18k_alpaca",
                    "alpaca", description="18k Python tasks in Alpaca form"),
        DatasetSpec("python_code_23k_sharegpt", "ajibawa-2023/Python-Code-23k-ShareGPT",
                    "sharegpt", description="23k Python conversations (ShareGPT)"),
    )
}

# Evaluation benchmarks: training on them would make every reported score meaningless.
REFUSED: dict[str, str] = {
    "humaneval": "HumanEval is the evaluation benchmark (`dylora eval`)",
    "openai_humaneval": "HumanEval is the evaluation benchmark (`dylora eval`)",
    "openai/openai_humaneval": "HumanEval is the evaluation benchmark (`dylora eval`)",
}


def known_names() -> list[str]:
    return [BUILTIN_NAME, *REGISTRY]


@dataclass
class LoadStats:
    """How many rows a dataset had and what became of them."""

    name: str
    origin: str  # "builtin", a file path, a directory, or "hub:<id>"
    rows: int = 0  # rows read
    excluded: int = 0  # rows outside the usable split (MBPP test/validation task ids)
    skipped: int = 0  # unusable rows: missing fields, empty instruction or response

    @property
    def loaded(self) -> int:
        return self.rows - self.excluded - self.skipped


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The offline directory: the argument, else ``$DYLORA_DATA_DIR``, else None."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    return Path(value).expanduser() if value is not None else None


def spec_for(name: str) -> DatasetSpec | None:
    """The registered spec for a registry name or a hub id, else None."""
    if name in REGISTRY:
        return REGISTRY[name]
    return next((s for s in REGISTRY.values() if s.hub_id.lower() == name.lower()), None)


def _looks_like_file(name: str) -> bool:
    return Path(name).suffix.lower() in FILE_SUFFIXES or (os.sep in name and Path(name).is_file())


def find_local_files(spec: DatasetSpec, data_dir: Path) -> list[Path]:
    """The files in ``data_dir`` that serve ``spec``; [] when there are none.

    An exact ``<stem>.<ext>`` wins; otherwise a single ``<stem>*.<ext>`` or every file of a
    folder ``<stem>/`` (shards). Several candidates and no exact match is an error, never a guess.
    """
    if not data_dir.is_dir():
        return []
    suffixes = tuple(FILE_SUFFIXES)
    for stem in spec.file_stems:
        exact = [data_dir / f"{stem}{s}" for s in suffixes if (data_dir / f"{stem}{s}").is_file()]
        if exact:
            return exact[:1]
        folder = data_dir / stem
        if folder.is_dir():
            shards = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
            if shards:
                return shards
    candidates = sorted(
        {p for stem in spec.file_stems for p in data_dir.glob(f"{stem}*")
         if p.is_file() and p.suffix.lower() in suffixes}
    )
    if len(candidates) > 1:
        raise DataError(
            f"Several files in {data_dir} could be dataset {spec.name!r}: "
            f"{', '.join(p.name for p in candidates)}. Keep one, rename one to "
            f"{spec.name}.json/.jsonl/.parquet, or pass the file path instead of the name."
        )
    return candidates


def _load_files(files: list[Path], what: str) -> datasets.Dataset:
    builders = {FILE_SUFFIXES[p.suffix.lower()] for p in files}
    if len(builders) != 1:
        raise DataError(f"The files of {what} mix formats ({', '.join(map(str, files))}); use one.")
    try:
        return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files],
                                     split="train")
    except Exception as err:  # the json/parquet builders raise many kinds
        raise DataError(
            f"Cannot read {what} from {', '.join(map(str, files))}: {type(err).__name__}: "
            f"{_first_line(err)}. Expected JSON (a list of objects), JSON lines or Parquet."
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def load_from_hub(spec: DatasetSpec) -> datasets.Dataset:
    """The hub copy of ``spec`` (a separate function so tests can stand in for the network)."""
    return datasets.load_dataset(spec.hub_id, spec.config, split=spec.split)


def _normalise(raw: datasets.Dataset, stats: LoadStats, mbpp_first_test: bool,
               schema: str | None = None) -> datasets.Dataset:
    """Records from ``raw``, filling ``stats``; the schema is detected unless given."""
    stats.rows = len(raw)
    schema = schema or detect_schema(raw.column_names, f"dataset {stats.name!r} ({stats.origin})")
    if schema == "mbpp" and "task_id" in raw.column_names:
        # However MBPP arrives (hub, offline copy, file path), only its train split is used.
        low, high = REGISTRY["mbpp"].task_id_range
        raw = raw.filter(lambda ids: [low <= int(i) <= high for i in ids],
                         input_columns="task_id", batched=True)
        stats.excluded = stats.rows - len(raw)
    records = raw.map(
        records_from_batch, batched=True, remove_columns=raw.column_names,
        fn_kwargs={"schema": schema, "source": stats.name, "mbpp_first_test": mbpp_first_test},
        load_from_cache_file=False,  # cheap, and a cache would not notice edits to schemas.py
        desc=f"normalising {stats.name}",
    )
    stats.skipped = stats.rows - stats.excluded - len(records)
    log.info("%s: %d usable records from %d rows (%d skipped as unusable, %d outside the "
             "split) [%s]", stats.name, len(records), stats.rows, stats.skipped, stats.excluded,
             stats.origin)
    if len(records) == 0:
        raise DataError(
            f"Dataset {stats.name!r} ({stats.origin}) has no usable records: {stats.rows} rows "
            f"read, {stats.excluded} outside its training split, {stats.skipped} without a "
            f"non-empty instruction and response (schema {schema}). Give a dataset with at least "
            f"one complete example."
        )
    return records


def load_records(
    name: str, data_dir: str | os.PathLike | None = None, mbpp_first_test: bool = True
) -> tuple[datasets.Dataset, LoadStats]:
    """Load one dataset by name or file path as records {instruction, input, output, source}.

    Returns the records (a ``datasets.Dataset``) and their :class:`LoadStats`. Raises
    :class:`DataError` for a refused, unknown, unreadable or empty dataset.
    """
    key = name.strip()
    if key.lower() in REFUSED:
        raise DataError(
            f"Dataset {name!r} cannot be used for training: {REFUSED[key.lower()]}, and a model "
            f"trained on it would report meaningless scores. Train on any of: "
            f"{', '.join(known_names())}."
        )

    if _looks_like_file(key):
        path = Path(key).expanduser()
        if not path.is_file():
            raise DataError(
                f"Dataset file {str(path)!r} does not exist. Give an existing .json, .jsonl or "
                f".parquet file or one of: {', '.join(known_names())}.")
        stats = LoadStats(name=path.stem, origin=str(path))
        return _normalise(_load_files([path], f"file {path.name}"), stats, mbpp_first_test), stats

    if key == BUILTIN_NAME:
        from .builtin import stdlib_function_records

        stats = LoadStats(name=BUILTIN_NAME, origin="builtin")
        raw = datasets.Dataset.from_list(stdlib_function_records())
        return _normalise(raw, stats, mbpp_first_test, schema="alpaca"), stats

    spec = spec_for(key)
    if spec is None:
        raise DataError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(known_names())}; or give the "
            f"path of a .json, .jsonl or .parquet file in one of the supported schemas."
        )

    offline = resolve_data_dir(data_dir)
    files = find_local_files(spec, offline) if offline is not None else []
    if files:
        origin = str(files[0].parent if len(files) > 1 else files[0])
        stats = LoadStats(name=spec.name, origin=origin)
        raw = _load_files(files, f"dataset {spec.name!r}")
        return _normalise(raw, stats, mbpp_first_test), stats

    try:
        raw = load_from_hub(spec)
    except Exception as err:  # network, auth, offline mode, missing config: all the same to a user
        where = (f"no file named {spec.name}*.json/.jsonl/.parquet or "
                 f"{spec.file_stems[1]}* in {offline}" if offline is not None
                 else f"no offline directory (pass data_dir or set {DATA_DIR_ENV})")
        raise DataError(
            f"Dataset {spec.name!r} could not be loaded: {where}, and the Hugging Face Hub copy "
            f"{spec.hub_id!r} failed with {type(err).__name__}: {_first_line(err)}. Put a copy in "
            f"the hub schema ({spec.schema}) in the offline directory or connect to the Hub."
        ) from err
    stats = LoadStats(name=spec.name, origin=f"hub:{spec.hub_id}")
    return _normalise(raw, stats, mbpp_first_test), stats
