"""``TrainConfig``: every option of ``dylora train``, and the one place that fills it.

Precedence: dataclass defaults < ``--config FILE.yaml`` < flags given on the command line.
Flag names are the field names (``--num_epochs``, ``--lora_r``, ...), which are the seed's names;
``help`` metadata on each field is what ``dylora train --help`` prints. The mixture's options
(``--num_experts``, ``--lora_r``, ...) belong to :class:`~dylora_moe.model.config.DyLoRAConfig`:
their defaults are its fields' and their check is its ``validate``; ``model_config()`` builds it.
``to_argv()`` goes the other way: the flags that give a configuration back.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import ConfigError, InvalidOption
from ..model.base import DEFAULT_MODEL_NAME
from ..model.config import DEFAULT_TARGET_MODULES, DyLoRAConfig
from ..runtime.flags import parse_bool


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


_MIXTURE_DEFAULTS = {f.name: f.default for f in fields(DyLoRAConfig)}


def _mixture(name: str, help: str, **extra: Any) -> Any:
    """An option of the mixture: ``DyLoRAConfig.<name>`` gives its default and checks its value."""
    return _opt(_MIXTURE_DEFAULTS[name], help, mixture=name, **extra)


@dataclass
class TrainConfig:
    # base model and mixture
    model_name: str = _opt(DEFAULT_MODEL_NAME,
                           "base causal LM: hub id, local directory, or the shipped 'tiny-python-lm'")
    num_experts: int = _mixture("num_experts", "number of routed LoRA experts")
    shared_experts: int = _mixture(
        "shared_experts", "LoRA experts every example uses beside the routed ones, each with the fixed gate "
        "1/(num_experts + shared_experts), the routed ones sharing the rest; they learn what all datasets have in "
        "common, so the routed experts can specialise")
    lora_r: int = _mixture("r", "LoRA rank of every expert")
    lora_alpha: float | None = _mixture(
        "alpha", "LoRA alpha (scaling alpha/r); unset or 0: derived, so that a uniform gate updates like one LoRA "
        "of rank (num_experts + shared_experts) x lora_r with alpha 32 x that rank (2048 for 4 experts of rank 16). "
        "The scale was tuned together with --learning_rate (benchmarks/quality.py --tune, docs/benchmarks.md): what "
        "matters is their product, so lower one if you raise the other",
        shown_default="32 x (num_experts + shared_experts) x lora_r")
    lora_dropout: float = _mixture("dropout", "dropout on the LoRA input")
    # unset (None) is not the mixture's default: a resumed run keeps its checkpoint's
    target_modules: str | None = _opt(
        None, "the linear layers that get experts: comma-separated module names (e.g. 'q_proj,v_proj'), 'mlp' (every "
        "linear layer of the feed-forward blocks: gate/up/down_proj in Llama-style models, c_fc/c_proj in GPT-2) or "
        "'all-linear'; unset: 'mlp', and a resumed run keeps the checkpoint's",
        mixture="target_modules", shown_default=DEFAULT_TARGET_MODULES)
    top_k: int = _mixture("top_k", "experts per example (per token with --routing token) once all experts are "
                          "mature (sparse routing): only with --maturity_fraction below 1; by default routing stays "
                          "dense and every expert is used")
    router_temperature: float = _mixture("router_temperature", "softmax temperature of dense routing while experts are "
                                         "immature")
    routing: str = _mixture("routing", "'example': one gate per example, from its prompt (kept while generating); "
                            "'token': every token routed on its own")
    router_scale: float = _mixture("router_scale", "router logits = scale x W x, W initialised smaller by as much: "
                                   "the router learns this many times faster than the experts")
    balance_coefficient: float = _mixture("balance_coefficient", "weight of the load-balancing loss")
    router_mi_coefficient: float = _mixture(
        "router_mi_coefficient", "weight of a router loss that raises the mutual information between examples and "
        "experts in a batch (confident gates, every expert used; no labels needed; 0: off)")
    dataset_mi_coefficient: float = _mixture(
        "dataset_mi_coefficient", "weight of a router loss that raises the mutual information between each example's "
        "dataset and its expert in a batch (training only: the router still decides from the prompt; needs several "
        "--datasets; 0: off)")
    gate_floor: float = _mixture(
        "gate_floor", "dense routing: share of every gate spread evenly over the experts, so all of them keep a shared "
        "part of every example (0: off)")
    z_loss_coefficient: float = _mixture("z_loss_coefficient", "weight of the router z-loss (0: off)")
    maturity_fraction: float = _opt(
        1.0, "fraction of the planned optimizer steps after which all experts are marked mature "
        "(routing switches from dense to top-k); 1 keeps routing dense, 0 starts sparse")
    # data
    datasets: str = _opt("stdlib_functions",
                         "comma-separated dataset names or files; 'name:weight,...' sets mixing weights")
    data_dir: str | None = _opt(None,
                                "offline directory serving named datasets in their hub schema (env DYLORA_DATA_DIR)")
    interleaved_sampling: bool = _opt(False, "balance the datasets (equal share each) instead of concatenating them")
    max_seq_length: int = _opt(512, "longest tokenised example (prompt + response)")
    validation_fraction: float = _opt(0.05, "share of each dataset held out for validation")
    training_subset: float = _opt(100.0, "percent (1-100) of each training split to use")
    eval_subset: float = _opt(100.0, "percent (1-100) of each validation split to use")
    # optimisation
    num_epochs: float = _opt(1.0, "training epochs")
    max_steps: int = _opt(-1, "stop after this many optimizer steps (-1: from num_epochs)")
    learning_rate: float = _opt(5e-4, "peak learning rate (AdamW); chosen with --lora_alpha's default on a "
                                "validation split (benchmarks/quality.py --tune: shipped model, 4 code datasets, 300 "
                                "steps): with that alpha, 1e-3 and above trained worse. Other bases and longer runs "
                                "were not measured: tune both there")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_ratio: float = _opt(0.05, "share of steps for linear warm-up")
    cosine_restarts: int = _opt(0, "cosine schedule with this many hard restarts (0: plain cosine)")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    train_batch_size: int = _opt(8, "examples per micro-batch")
    eval_batch_size: int = _opt(16, "examples per evaluation batch")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    fp16: bool = _opt(False, "float16 autocast (CUDA only)")
    bf16: bool = _opt(False, "bfloat16 autocast")
    fsdp: bool = _opt(False, "under torchrun: shard the base model and the experts over the ranks with torch FSDP "
                      "(fully_shard), for bases that do not fit one GPU (default: DDP, each rank holds the whole base)")
    seed: int = _opt(42, "seed for data order, initialisation and dropout")
    # evaluation and early stopping
    eval_steps: int = _opt(50, "evaluate every N optimizer steps (0: only at the end)")
    early_stopping_patience: int = _opt(3, "stop after N evaluations without improvement")
    disable_early_stopping: bool = _opt(False, "never stop early")
    eval_benchmarks: str = _opt(
        "", "comma-separated benchmarks (humaneval, mbpp) whose real pass@1 is logged during training: greedy "
        "completions run with their tests in dylora eval's sandbox (empty: off)")
    eval_every: int = _opt(
        0, "log the --eval_benchmarks pass@1 every N optimizer steps (0: at every --eval_steps evaluation)")
    eval_max_tasks: int = _opt(20, "pass@1 on the first N tasks of each --eval_benchmarks benchmark")
    # output, logging, checkpoints
    output_dir: str = _opt("runs", "parent directory of run directories")
    run_id: str | None = _opt(None, "stable run id (default: CLOUD_ML_JOB_ID, SKYPILOT_TASK_ID, or a timestamp)")
    logging_steps: int = _opt(10, "log metrics every N optimizer steps")
    save_steps: int = _opt(100, "checkpoint every N optimizer steps (0: only at the end)")
    report_to: str = _opt("auto", "metrics sink: 'wandb', 'tensorboard', 'none', or 'auto' (wandb when configured)")
    wandb_project: str = _opt("dylora-moe", "W&B project")
    wandb_entity: str | None = _opt(None, "W&B entity")
    resume: str | None = _opt(
        None, "resume from a checkpoint reference: a directory, 'latest', 'auto' (newest complete checkpoint "
        "of this run id, locally then in the store; none means a fresh start), wandb://E/P/NAME:ALIAS, "
        "s3://, gs://, file://, memory:// URLs")
    resume_from_checkpoint: str | None = _opt(None, "the seed's name for --resume")
    wandb_checkpoint_artifact: str | None = _opt(
        None, "the seed's form: resume from W&B artifact ENTITY/PROJECT/NAME:ALIAS")
    start_from: str | None = _opt(
        None, "where a run with no checkpoint of its own starts (any reference, as for --resume): with "
        "--resume auto (implied), the run's own newest checkpoint always wins, so a restarted job continues "
        "from its own latest checkpoint, never from this reference again")
    allow_fresh_start: bool = _opt(
        False, "if the resume reference cannot be fetched, warn and start fresh instead of failing")
    grow_experts: bool = _opt(False, "allow resuming with a larger --num_experts (the new experts start immature)")
    save_total_limit: int = _opt(3, "keep the newest N local checkpoints (plus the best)")
    checkpoint_store: str | None = _opt(
        None, "where checkpoints are published as versions: a directory, an fsspec URL (s3://, gs://, "
        "file://, memory://), wandb://ENTITY/PROJECT/NAME, or 'wandb' for this W&B run's artifact "
        "RUN_ID-checkpoint", shown_default="RUN_DIR/store")
    store_timeout_s: float = _opt(
        15.0, "seconds the start-up check of the checkpoint store (a small write, read and delete) may take in "
        "all, transient errors retried inside it: a store that cannot answer fails the run before training, "
        "and missing credentials, access denied or no such bucket fail at once. Also the deadline of fetching a "
        "--resume/--start_from reference from a store, all attempts included, plus one second per MB for the "
        "transfer")
    publish_timeout_s: float = _opt(
        300.0, "at the end of a run: seconds to wait for checkpoints still being published; a run that ends "
        "with unpublished checkpoints exits with status 3 (local copies are kept)")
    preemption_budget_s: float = _opt(25.0, "on SIGTERM/SIGINT: seconds to checkpoint and publish before exiting")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        try:
            self.model_config()  # the mixture's options are checked where they are owned
        except InvalidOption as err:
            raise err.as_flag() from None
        positive = ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_seq_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} {value!r} is invalid: it must be an integer >= 1.")
        for name in ("training_subset", "eval_subset"):
            value = getattr(self, name)
            if not 1 <= value <= 100:
                raise ConfigError(f"--{name} {value!r} is invalid: give a percentage from 1 to 100.")
        if self.num_epochs <= 0:
            raise ConfigError(f"--num_epochs {self.num_epochs!r} is invalid: it must be > 0.")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate {self.learning_rate!r} is invalid: it must be > 0.")
        if not 0 <= self.maturity_fraction <= 1:
            raise ConfigError(f"--maturity_fraction {self.maturity_fraction!r} is invalid: give a value from 0 to 1.")
        if not self.lora_alpha and self.learning_rate > 5e-4:
            logging.getLogger(__name__).warning(
                "--learning_rate %g with the default --lora_alpha (32 x experts x rank: alpha/r 128) trained worse "
                "than lr 5e-4 when both were tuned, and diverged from 2e-3 (docs/benchmarks.md): lower --lora_alpha "
                "as you raise the learning rate (their product is what matters), e.g. --lora_alpha %g.",
                self.learning_rate, max(1.0, DyLoRAConfig(num_experts=self.num_experts, r=self.lora_r,
                                                          shared_experts=self.shared_experts).alpha
                                        * 5e-4 / self.learning_rate))
        if self.top_k != _MIXTURE_DEFAULTS["top_k"] and self.maturity_fraction >= 1:
            logging.getLogger(__name__).warning(
                "--top_k %d has no effect: routing stays dense while any expert is immature, and with "
                "--maturity_fraction 1 (the default) they never mature. Give --maturity_fraction below 1 (e.g. 0.5) "
                "to switch to top-%d routing during the run.", self.top_k, self.top_k)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio {self.warmup_ratio!r} is invalid: give a value in [0, 1).")
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 were both given: choose one precision.")
        if self.fsdp and self.eval_benchmarks:
            raise ConfigError(f"--eval_benchmarks {self.eval_benchmarks} cannot run with --fsdp: "
                              "generating completions "
                              "needs the whole model in one process. Score the checkpoints with dylora eval instead.")
        if self.save_total_limit < 1:
            raise ConfigError(f"--save_total_limit {self.save_total_limit!r} is invalid: keep at least 1 checkpoint.")
        given = [r for r in (self.resume, self.resume_from_checkpoint, self.wandb_checkpoint_artifact) if r]
        if len(set(given)) > 1:
            raise ConfigError(
                f"conflicting resume references {given}: give one of --resume, --resume_from_checkpoint, "
                "--wandb_checkpoint_artifact.")
        if self.run_id is not None:
            check_run_id(self.run_id, "--run_id")
        for name in ("store_timeout_s", "publish_timeout_s", "preemption_budget_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} {getattr(self, name)!r} is invalid: give a number of seconds > 0.")
        self._check_references()
        if self.report_to not in ("auto", "wandb", "tensorboard", "none"):
            raise ConfigError(f"--report_to {self.report_to!r} is invalid: choose auto, wandb, tensorboard or none.")
        if self.eval_benchmarks:
            from ..eval.benchmarks import check_benchmarks

            check_benchmarks(self.eval_benchmark_list, "--eval_benchmarks")
        if self.eval_max_tasks < 1:
            raise ConfigError(f"--eval_max_tasks {self.eval_max_tasks!r} is invalid: it must be at least 1.")
        for name in ("eval_steps", "save_steps", "logging_steps", "early_stopping_patience", "cosine_restarts",
                     "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} {getattr(self, name)!r} is invalid: it must be >= 0.")

    def _check_references(self) -> None:
        """The reference syntax is owned by ``checkpoint.references``; a malformed one is bad input."""
        from ..checkpoint.references import parse_reference

        reference, bare_is_wandb = self.resume_reference
        if reference:
            parse_reference(reference, bare_is_wandb=bare_is_wandb)
        if self.start_from:
            if reference and reference != "auto":
                raise ConfigError(
                    f"--start_from {self.start_from!r} and the resume reference {reference!r} were both given: "
                    "--start_from is where a run without checkpoints of its own starts (with --resume auto); "
                    "give one of them.")
            if self.start_from == "auto":
                raise ConfigError("--start_from auto is not a starting point: give a checkpoint reference "
                                  "(a directory, wandb://E/P/NAME:ALIAS, s3://…:latest, gs://…:latest, …).")
            parse_reference(self.start_from)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_config(self) -> DyLoRAConfig:
        """The mixture these options describe; an unset option takes DyLoRAConfig's default (alpha derived from
        the experts and the rank, target_modules 'mlp')."""
        values = {f.metadata["mixture"]: getattr(self, f.name) for f in fields(self) if "mixture" in f.metadata}
        return DyLoRAConfig(**{name: value for name, value in values.items() if value is not None})

    def to_argv(self, options: Iterable[str] | None = None) -> list[str]:
        """The ``dylora train`` flags that give this configuration: one per option that differs from its default,
        or one per option in ``options`` (those a user gave), in the order of ``--help``. Unset options are left out."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            wanted = f.name in options if options is not None else value != f.default
            if wanted and value is not None:
                argv += [f"--{f.name}", _render(value)]
        return argv

    @property
    def eval_benchmark_list(self) -> list[str]:
        return [b.strip() for b in self.eval_benchmarks.split(",") if b.strip()]

    @property
    def resume_reference(self) -> tuple[str | None, bool]:
        """(reference, whether a bare ENTITY/PROJECT/NAME:ALIAS means W&B); --start_from implies auto."""
        if self.wandb_checkpoint_artifact:
            return self.wandb_checkpoint_artifact, True
        return self.resume or self.resume_from_checkpoint or ("auto" if self.start_from else None), False

    def resolved_run_id(self) -> str:
        import time

        sources = (("--run_id", self.run_id), ("CLOUD_ML_JOB_ID", os.environ.get("CLOUD_ML_JOB_ID")),
                   ("SKYPILOT_TASK_ID", os.environ.get("SKYPILOT_TASK_ID")))
        for source, candidate in sources:
            if candidate:
                return check_run_id(str(candidate), source)
        return time.strftime("run-%Y%m%d-%H%M%S")


_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str, source: str) -> str:
    """A run id names a directory directly under --output_dir: no '/', no '..', no hidden names."""
    if not _RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ConfigError(
            f"{source} {run_id!r} is not a valid run id: use 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, without '/' or '..' (it names a directory under --output_dir).")
    return run_id


def _render(value: Any) -> str:
    """A value as its flag reads it back (``parse_bool`` for booleans, the type's constructor otherwise)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _flag_type(f) -> Any:
    text = str(f.type)
    if "bool" in text:
        return "bool"
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


# --help groups: the first field of each section of TrainConfig, and its title.
_SECTIONS = {
    "model_name": "base model and mixture",
    "datasets": "data",
    "num_epochs": "optimisation",
    "eval_steps": "evaluation and early stopping",
    "output_dir": "output, logging, checkpoints and resume",
}
_METAVARS = {int: "N", float: "X", str: "VALUE", "bool": "BOOL"}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; every default is SUPPRESS so we know what the user actually gave."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these options; flags override it")
    group = parser
    for f in fields(TrainConfig):
        if f.name in _SECTIONS:
            group = parser.add_argument_group(_SECTIONS[f.name])
        default = f.default if f.default is not MISSING else None
        kind = _flag_type(f)
        help_text = f"{f.metadata['help']} (default: {f.metadata.get('shown_default', default)})"
        if kind == "bool":
            # `--bf16` alone means true; `--bf16 false` is accepted too (seed scripts pass values).
            group.add_argument(f"--{f.name}", nargs="?", const=True, type=parse_bool, metavar=_METAVARS[kind],
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS, metavar=_METAVARS[kind],
                               help=help_text)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value.")
    data.pop("vertex", None)  # `dylora submit vertex`'s section of the same file (see docs/cloud.md)
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"config file {str(path)!r} has unknown option(s) {', '.join(unknown)}; "
            f"known options are the flags of `dylora train --help` without dashes."
        )
    return {k: _coerce(known[k], v, path) for k, v in data.items()}


def _coerce(f, value: Any, path: Path) -> Any:
    """YAML reads ``2e-4`` as a string and ``1`` where a float is meant: convert by field type."""
    if value is None:
        return None
    kind = _flag_type(f)
    try:
        if kind == "bool":
            return value if isinstance(value, bool) else parse_bool(str(value))
        if kind is str and isinstance(value, list):
            return ",".join(str(v) for v in value)
        return kind(value)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"config file {str(path)!r}: {f.name}: {value!r} is not a valid "
                          f"{getattr(kind, '__name__', kind)}.") from err


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    values.update({k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    if values.get("data_dir") is None and os.environ.get("DYLORA_DATA_DIR"):
        values["data_dir"] = os.environ["DYLORA_DATA_DIR"]
    try:
        return TrainConfig(**values)
    except TypeError as err:
        raise ConfigError(f"bad option value: {err}") from err
