"""The container's entrypoint in a cloud job: ``python -m dylora_moe.job.entrypoint [--secret ...] -- ARGS``.

1. Resolves every ``--secret NAME=projects/P/secrets/S/versions/V`` through Secret Manager into
   this process's environment (names are logged, values never).
2. Replaces ``$(VAR)`` in ARGS with the environment variable VAR, e.g. ``$(CLOUD_ML_JOB_ID)``, the
   job id that Vertex sets and that ``dylora submit vertex`` cannot know when it builds the job.
3. Runs ``dylora ARGS`` in this process (so SIGTERM reaches the trainer, which checkpoints and
   exits 75), and returns its exit status. A ``train`` of a job with several replicas (Vertex's
   ``CLUSTER_SPEC``) or several GPUs per replica runs instead as this machine's ranks of one
   torch.distributed training, started by torch's launcher (``rendezvous.py``, ``launch.py``);
   the exit status is then that of the ranks (75 when every stopped rank was preempted after
   checkpointing).
4. After a successful ``train`` on the chief replica, copies the trained mixture (``RUN_DIR/final``)
   to ``AIP_MODEL_DIR`` when Vertex set it (the job's BASE_OUTPUT_DIR/model/).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from ..cloud.secrets import parse_secret_refs, resolve_secrets
from ..errors import ConfigError, DyLoRAError
from ..runtime.signals import SignalWatch, StartupInterrupted
from .launch import run_ranks
from .rendezvous import Rendezvous, is_chief, is_launched_rank
from .rendezvous import from_environment as rendezvous_from_environment

log = logging.getLogger("dylora_moe.job.entrypoint")
_VAR_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_variables(args: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """``$(VAR)`` -> the value of VAR; an unset VAR is an error naming it."""
    environ = os.environ if environ is None else environ

    def value(match: re.Match) -> str:
        name = match.group(1)
        if not environ.get(name):
            raise ConfigError(f"the job's command uses $({name}) but {name} is not set in the container; "
                              "Vertex AI sets CLOUD_ML_JOB_ID for every CustomJob (running elsewhere, set it "
                              "to a stable id yourself).")
        return environ[name]

    return [_VAR_RE.sub(value, arg) for arg in args]


def upload_model(dylora_args: list[str], destination: str) -> str:
    """Copy RUN_DIR/final of the ``train`` command ``dylora_args`` to ``destination`` (an fsspec URL)."""
    import fsspec

    from ..cli import build_parser
    from ..train.config import config_from_args

    cfg = config_from_args(build_parser().parse_args(dylora_args))
    final = Path(cfg.output_dir) / cfg.resolved_run_id() / "final"
    if not final.is_dir():
        raise DyLoRAError(f"training finished but {final} does not exist; nothing was copied to {destination}.")
    try:
        fs, root = fsspec.core.url_to_fs(destination.rstrip("/"))
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        for path in sorted(p for p in final.rglob("*") if p.is_file()):
            target = f"{root}/{path.relative_to(final).as_posix()}"
            if "file" in protocols:  # a directory (a /gcs/ mount): folders exist before files; object stores have none
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            fs.put_file(str(path), target)
    except Exception as e:
        raise DyLoRAError(f"training finished but copying {final} to {destination} failed ({type(e).__name__}: "
                          f"{e}); the checkpoints are in the run's store.") from e
    return destination


def machine_rendezvous(dylora_args: list[str]) -> Rendezvous | None:
    """This machine's ranks when ``dylora_args`` is a ``train`` to run as several (None: in this process)."""
    if dylora_args[:1] != ["train"] or is_launched_rank():
        return None  # under torchrun already, or not training: nothing to launch
    rendezvous = rendezvous_from_environment()
    return rendezvous if rendezvous.distributed else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dylora_moe.job.entrypoint",
        description="Start a cloud job: resolve secrets, then run `dylora ARGS`. A `train` of a job with several "
        "replicas (Vertex's CLUSTER_SPEC) or GPUs runs as this machine's ranks of one distributed training.",
        epilog="environment: CLUSTER_SPEC (set by Vertex: the replicas and which one this is), DYLORA_NPROC_PER_NODE "
        "(training processes on this machine; default one per GPU), DYLORA_RENDEZVOUS_TIMEOUT_S (how long to wait "
        "for the other replicas; default 900), AIP_MODEL_DIR (where the chief copies the trained mixture). "
        "See docs/cloud.md, Multi-node.")
    parser.add_argument("--secret", action="append", metavar="NAME=projects/P/secrets/S/versions/V",
                        help="fill environment variable NAME from a Secret Manager secret version")
    parser.add_argument("dylora_args", nargs=argparse.REMAINDER, help="-- then the dylora command line")
    args = parser.parse_args(argv)
    dylora_args = args.dylora_args[1:] if args.dylora_args[:1] == ["--"] else args.dylora_args
    if not dylora_args:
        parser.error("no dylora command given after --")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signals = SignalWatch().install()  # a spot VM may be reclaimed while secrets are being read
    try:
        names = resolve_secrets(parse_secret_refs(args.secret))
        if names:
            log.info("secrets resolved from Secret Manager into %s", ", ".join(names))
        dylora_args = expand_variables(dylora_args)
        rendezvous = machine_rendezvous(dylora_args)
    except StartupInterrupted as stop:
        err = stop.as_preempted("before training started; nothing was saved. The same command starts the job.")
        print(f"dylora job: stopped: {err}", file=sys.stderr)
        return err.exit_code
    except DyLoRAError as err:
        print(f"dylora job: error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    finally:
        signals.restore()  # `dylora` installs its own watch from its first moment, the launcher its own
    log.info("running: dylora %s", " ".join(dylora_args))

    from ..cli import main as dylora_main

    try:
        status = dylora_main(dylora_args) if rendezvous is None else run_ranks(
            rendezvous, dylora_args, run_id=os.environ.get("CLOUD_ML_JOB_ID") or "dylora-train")
        model_dir = os.environ.get("AIP_MODEL_DIR")
        if status == 0 and dylora_args[0] == "train" and model_dir and is_chief():
            log.info("trained mixture copied to %s", upload_model(dylora_args, model_dir))
    except DyLoRAError as err:
        print(f"dylora job: error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    return status


if __name__ == "__main__":
    sys.exit(main())
