"""``dylora submit vertex | status | cancel``: flags, the YAML ``vertex:`` section, and the job's command.

Training options are those of ``dylora train`` (after ``--`` or in the ``--config`` file, whose
``vertex:`` section ``dylora train`` leaves to this command) and are validated by the same code
(``add_train_arguments`` / ``config_from_args``) before anything is sent; the job gets the ones the
user gave as ``TrainConfig.to_argv`` writes them. The job always runs::

    dylora train --run_id $(CLOUD_ML_JOB_ID) --resume auto [--start_from REF]
                 --checkpoint_store BASE_OUTPUT_DIR/$(CLOUD_ML_JOB_ID)/store <training options>

through the container's entrypoint (``dylora_moe.job.entrypoint``), which fills in
``$(CLOUD_ML_JOB_ID)`` (set by Vertex: the job's own id, unknown at submit time) and resolves
``--secret`` references. A restarted job therefore continues from its own newest checkpoint, and
``--resume REF`` / ``--start_from REF`` only chooses where its *first* start begins.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import EXIT_BAD_INPUT, EXIT_STATUS_HELP, ConfigError, DyLoRAError
from ..runtime.flags import parse_bool  # the same true/false words as `dylora train`
from ..runtime.signals import StartupInterrupted
from .secrets import SECRET_ENV_NAMES, parse_secret_refs
from .vertex import (
    VertexError,
    VertexJobs,
    VertexSettings,
    build_custom_job,
    job_name,
    job_to_json,
    parse_labels,
    region_of,
    state_name,
)

log = logging.getLogger(__name__)

JOB_ID = "$(CLOUD_ML_JOB_ID)"
_REFERENCE_OPTIONS = ("resume", "resume_from_checkpoint", "wandb_checkpoint_artifact", "start_from")
_OWN_OPTIONS = ("run_id", "config") + _REFERENCE_OPTIONS  # the submit command sets these itself
_SETTING_TYPES = {"accelerator_count": int, "replica_count": int, "boot_disk_gb": int}


class _TrainingOptionsParser(argparse.ArgumentParser):
    """``dylora train``'s flags; a mistake is a ConfigError (exit 2), not argparse's exit."""

    def error(self, message: str):
        raise ConfigError(f"training option error: {message} (training options are those of "
                          "`dylora train --help`, given after `--`).")


def _train_parser(prog: str) -> argparse.ArgumentParser:
    from ..train.config import add_train_arguments

    parser = _TrainingOptionsParser(prog=prog, add_help=False)
    add_train_arguments(parser)
    return parser


# ------------------------------------------------------------------ parser
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``dylora submit`` and its actions; the cloud clients load only when a job is sent."""
    epilog = EXIT_STATUS_HELP
    submit = subparsers.add_parser(
        "submit", help="run training as a Vertex AI job; follow or cancel it",
        description="Run `dylora train` as a Vertex AI CustomJob (spot capacity welcome: a preempted "
        "or restarted job continues from its own latest checkpoint). See docs/cloud.md.", epilog=epilog)
    submit.set_defaults(print_submit_help=submit.print_help)
    actions = submit.add_subparsers(dest="submit_action", metavar="ACTION")

    vertex = actions.add_parser(
        "vertex", help="submit a training job",
        usage="dylora submit vertex [OPTIONS] [-- TRAINING OPTIONS]",
        description="Submit a Vertex AI CustomJob that runs `dylora train --run_id JOB_ID --resume auto "
        "[--start_from REF] --checkpoint_store BASE_OUTPUT_DIR/JOB_ID/store TRAINING OPTIONS`. Options "
        "can also live in the --config YAML file: training options at its top level (as for `dylora "
        "train --config`), these options under a `vertex:` section; flags override the file. "
        "--resume REF (or --start_from REF) after `--` is where the job starts on its first start; a "
        "restarted job continues from its own newest checkpoint instead.", epilog=epilog)
    vertex.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file: training options, plus a `vertex:` section with these options")
    group = vertex.add_argument_group("job")
    for f in fields(VertexSettings):
        kind = _SETTING_TYPES.get(f.name, str)
        if f.name == "labels":
            group.add_argument("--labels", type=parse_labels, default=argparse.SUPPRESS, metavar="K=V,...",
                               help=f.metadata["help"])
        elif f.type in ("bool", "bool | None", bool):  # --flag, --flag true, --flag false
            shown = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(f"--{f.name}", nargs="?", const=True, type=parse_bool, default=argparse.SUPPRESS,
                               metavar="BOOL", help=f"{f.metadata['help']}{shown}")
        else:
            shown = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                               metavar="N" if kind is int else "VALUE", help=f.metadata["help"] + shown)
    secrets = vertex.add_argument_group("secrets (never put into the job as values)")
    secrets.add_argument("--secret", action="append", metavar="NAME=projects/P/secrets/S/versions/V",
                         help="set environment variable NAME in the job from a Secret Manager secret "
                         "version, read by the container at start (repeatable)")
    secrets.add_argument("--pass_env_secrets", action="store_true",
                         help=f"opt-in: copy {', '.join(SECRET_ENV_NAMES)} from this shell into the job's "
                         "environment (they are visible to anyone who can read the job; prefer --secret)")
    submission = vertex.add_argument_group("submission")
    submission.add_argument("--dry_run", "--dry-run", action="store_true",
                            help="print the CustomJob as JSON on stdout and send nothing")
    submission.add_argument("--wait", action="store_true",
                            help="follow the job until it ends; exit 0 only if it succeeded")
    submission.add_argument("--poll_interval", type=float, default=30.0, metavar="S",
                            help="seconds between state checks with --wait (default: 30)")
    vertex.add_argument("training", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    for action, help_text in (("status", "show a job's state"), ("cancel", "cancel a job")):
        p = actions.add_parser(action, help=help_text, description=f"{help_text.capitalize()}. JOB: "
                               "projects/P/locations/REGION/customJobs/ID, or the numeric ID with --project "
                               "and --region.", epilog=epilog)
        p.add_argument("job", help="job resource name or numeric id")
        p.add_argument("--project", help="project (when JOB is a bare id)")
        p.add_argument("--region", help="region (when JOB is a bare id)")
    return submit


def run(args: argparse.Namespace) -> int:
    action = {"vertex": run_vertex, "status": run_status, "cancel": run_cancel}.get(args.submit_action)
    if action is None:  # `dylora submit` alone
        args.print_submit_help()
        return EXIT_BAD_INPUT
    return action(args)


# ------------------------------------------------------------------ configuration
def _vertex_section(path: str | None) -> dict[str, Any]:
    """The config file's ``vertex:`` section ({} without one); its training options are ``dylora train``'s to read."""
    if not path or not Path(path).is_file():
        return {}  # config_from_args reports a missing file
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return {}  # ... and invalid YAML, in its own words
    if not isinstance(data, dict):
        return {}
    section = data.get("vertex") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path!r}: the `vertex:` section must be a mapping of option: value.")
    return section


def _settings(args: argparse.Namespace, section: dict[str, Any], path: str | None) -> VertexSettings:
    known = {f.name for f in fields(VertexSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"config file {path!r}: unknown `vertex:` option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}.")
    values = dict(section)
    if isinstance(values.get("labels"), str):
        values["labels"] = parse_labels(values["labels"])
    values.update({k: v for k, v in vars(args).items() if k in known})
    for name, kind in _SETTING_TYPES.items():
        if name in values and values[name] is not None:
            try:
                values[name] = kind(values[name])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{name}: {values[name]!r} is not an integer.") from e
    settings = VertexSettings(**values)
    settings.validate()
    _explain_restart_policy(settings)
    return settings


def _explain_restart_policy(settings: VertexSettings) -> None:
    """One line when a multi-node job's restart policy was chosen for the user, or kept off on request."""
    if settings.replica_count < 2:
        return
    if settings.restart_job_on_worker_restart is None:
        log.info("--replica_count %d: restart_job_on_worker_restart is on, so that a restarted replica restarts "
                 "the whole job (a worker restarted alone cannot rejoin the others); "
                 "--restart_job_on_worker_restart false turns it off", settings.replica_count)
    elif not settings.restart_job_on_worker_restart:
        log.warning("--replica_count %d with --restart_job_on_worker_restart false: a worker that Vertex restarts "
                    "alone cannot rejoin the others (they meet once, at the start), so the job stalls until a "
                    "timeout ends it (DYLORA_RENDEZVOUS_TIMEOUT_S for the rendezvous)", settings.replica_count)


def _train_config(args: argparse.Namespace, training: list[str]) -> tuple[Any, set[str], dict[str, Any]]:
    """(validated TrainConfig, the option names the user gave, the config file's `vertex:` section)."""
    from ..train.config import config_from_args, load_yaml

    if training[:1] == ["--"]:
        training = training[1:]
    ns = _train_parser("dylora submit vertex ... --").parse_args(training)
    if ns.__dict__.get("config") and args.config and ns.config != args.config:
        raise ConfigError("--config is given twice (before and after `--`): give one file.")
    path = args.config or ns.__dict__.get("config")
    section = _vertex_section(path)
    ns.config = path  # dylora train reads the same file and leaves its `vertex:` section to us
    cfg = config_from_args(ns)
    given = (set(vars(ns)) - {"config"}) | (set(load_yaml(path)) if path else set())
    return cfg, given, section


def _start_from(cfg: Any) -> str | None:
    """The reference a job's first start begins from (None: a fresh start), in a form the job can use.

    ``--resume REF`` and ``--start_from REF`` both mean it (TrainConfig refuses the two together).
    """
    from ..checkpoint.references import parse_reference

    reference, bare_is_wandb = cfg.resume_reference
    ref = cfg.start_from or (reference if reference != "auto" else None)
    flag = "--start_from" if cfg.start_from else "--resume"
    if not ref:
        return None
    parsed = parse_reference(ref, bare_is_wandb=bare_is_wandb)
    if parsed.kind == "latest":
        raise ConfigError("--resume latest names a local run directory, which a new cloud job does not have: "
                          "give the store reference (gs://BUCKET/PATH/store:latest) or wandb://E/P/NAME:ALIAS.")
    if parsed.is_local and not ref.startswith("/gcs/"):
        raise ConfigError(f"{flag} {ref!r} is a local path, which the job's container does not have: "
                          "give gs://BUCKET/PATH/store:ALIAS, wandb://ENTITY/PROJECT/NAME:ALIAS, or a "
                          "/gcs/BUCKET/... path (Cloud Storage mounted in the container).")
    return parsed.canonical if parsed.kind == "wandb" else ref


def job_train_args(cfg: Any, given: set[str], settings: VertexSettings) -> list[str]:
    """``dylora`` arguments of the job: ``train --run_id $(CLOUD_ML_JOB_ID) --resume auto ...``."""
    if "run_id" in given:
        raise ConfigError(f"--run_id {cfg.run_id!r} cannot be set for a cloud job: its run id is the Vertex job "
                          "id, so that a restarted job finds its own checkpoints.")
    args = ["train", "--run_id", JOB_ID, "--resume", "auto"]
    start = _start_from(cfg)
    if start:
        args += ["--start_from", start]
    if "checkpoint_store" not in given:
        args += ["--checkpoint_store", f"{settings.output_dir}/{JOB_ID}/store"]
    if "progress" not in given:
        args += ["--progress", "false"]  # a progress bar in job logs is one line per redraw
    return args + cfg.to_argv(given - set(_OWN_OPTIONS))  # what the user gave, as `dylora train` reads it


def _check_job_command(train_args: list[str]) -> None:
    """The command the job will run must pass `dylora train`'s own validation (with a sample id)."""
    from ..train.config import config_from_args

    example_args = [a.replace(JOB_ID, "1234567890") for a in train_args[1:]]
    config_from_args(_train_parser("dylora train").parse_args(example_args))


def build_job(args: argparse.Namespace) -> tuple[Any, VertexSettings, dict[str, str]]:
    """(CustomJob, settings, secret environment values) for ``dylora submit vertex`` arguments."""
    cfg, given, section = _train_config(args, list(args.training or []))
    settings = _settings(args, section, args.config)
    refs = parse_secret_refs(args.secret)
    env: dict[str, str] = {}
    if args.pass_env_secrets:
        env = {name: os.environ[name] for name in SECRET_ENV_NAMES
               if os.environ.get(name) and name not in {r.env for r in refs}}
        if not env:
            raise ConfigError(f"--pass_env_secrets: none of {', '.join(SECRET_ENV_NAMES)} is set in this shell "
                              "(or all are given with --secret).")
    train_args = job_train_args(cfg, given, settings)
    _check_job_command(train_args)
    container_args = [a for r in refs for a in ("--secret", str(r))] + ["--"] + train_args
    return build_custom_job(settings, container_args, env), settings, env


def _redacted(job: Any, env: dict[str, str]) -> Any:
    """A copy whose environment values from this shell read '<not printed>'."""
    if not env:
        return job
    shown = copy.deepcopy(job)
    for pool in shown.job_spec.worker_pool_specs:
        for var in pool.container_spec.env:
            if var.name in env:
                var.value = f"<not printed: {var.name} from the submitting shell>"
    return shown


def _scrub(err: DyLoRAError, env: dict[str, str]) -> DyLoRAError:
    text = str(err)
    for value in env.values():
        text = text.replace(value, "<secret>")
    return err if text == str(err) else type(err)(text)


# ------------------------------------------------------------------ actions
def _describe(job: Any) -> str:
    lines = [f"job: {job.name}", f"display name: {job.display_name}", f"state: {state_name(job)}"]
    for label, stamp in (("created", job.create_time), ("started", job.start_time), ("ended", job.end_time)):
        if stamp:
            lines.append(f"{label}: {stamp.isoformat()}")
    if job.error.message:
        lines.append(f"error: {job.error.message}")
    return "\n".join(lines)


def _follow(jobs: VertexJobs, name: str, poll_interval_s: float) -> int:
    try:
        job = jobs.wait(name, poll_interval_s, on_state=lambda j: print(f"{name}: {state_name(j)}", flush=True))
    except (KeyboardInterrupt, StartupInterrupted):  # Ctrl-C stops the watching, not the job
        raise VertexError(f"stopped following {name}; the job keeps running. Follow it with `dylora submit "
                          f"status {name}`, stop it with `dylora submit cancel {name}`.") from None
    state = state_name(job)
    if state != "JOB_STATE_SUCCEEDED":
        detail = f": {job.error.message}" if job.error.message else ""
        raise VertexError(f"job {name} ended in {state}{detail}. Logs: gcloud ai custom-jobs stream-logs {name}")
    return 0


def run_vertex(args: argparse.Namespace) -> int:
    env: dict[str, str] = {}
    try:
        job, settings, env = build_job(args)
        if args.dry_run:
            sys.stdout.write(job_to_json(_redacted(job, env)) + "\n")
            return 0
        if args.poll_interval <= 0:
            raise ConfigError(f"--poll_interval {args.poll_interval!r} is invalid: it must be > 0 seconds.")
        jobs = VertexJobs(settings.region)
        created = jobs.create(settings, job)
        job_id = created.name.rsplit("/", 1)[-1]
        print(f"submitted {created.name}\n"
              f"run id: {job_id}; checkpoints: {settings.output_dir}/{job_id}/store\n"
              f"console: https://console.cloud.google.com/vertex-ai/locations/{settings.region}/training/"
              f"{job_id}/cpu?project={settings.project}\n"
              f"follow: dylora submit status {created.name}", flush=True)
        return _follow(jobs, created.name, args.poll_interval) if args.wait else 0
    except DyLoRAError as err:
        raise _scrub(err, env) from None


def run_status(args: argparse.Namespace) -> int:
    name = job_name(args.job, args.project, args.region)
    print(_describe(VertexJobs(region_of(name)).get(name)))
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    name = job_name(args.job, args.project, args.region)
    jobs = VertexJobs(region_of(name))
    jobs.cancel(name)
    print(f"cancellation requested for {name}; state now: {state_name(jobs.get(name))}")
    return 0
