"""Vertex AI CustomJobs: the job a ``dylora submit vertex`` builds, and the calls that manage it.

``VertexSettings`` holds the infrastructure options (one place validates them);
``build_custom_job`` turns them and the container's command into an
``aiplatform_v1.types.CustomJob``; ``VertexJobs`` creates, reads, waits for and cancels jobs with
the real ``JobServiceClient`` over REST. ``DYLORA_VERTEX_ENDPOINT`` replaces the regional endpoint
(``REGION-aiplatform.googleapis.com``), e.g. for a private endpoint or a test server.

One replica is one worker pool; more than one is a chief pool (1 replica) plus a worker pool
(the rest) with the same machine and container, which is how Vertex runs multi-node jobs.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigError, DyLoRAError
from .api_errors import server_message

ENDPOINT_ENV = "DYLORA_VERTEX_ENDPOINT"
# How the container is started: the job side's entrypoint (dylora_moe/job/, in an image built from this
# version: scripts/build_and_push.sh), which resolves secrets then runs `dylora ARGS`.
ENTRYPOINT_COMMAND = ["python", "-m", "dylora_moe.job.entrypoint"]
ENDED_STATES = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")

_LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
# Compute Engine machine types Vertex AI trains on (cloud.google.com/vertex-ai/docs/training/configure-compute):
# FAMILY-KIND[-SIZE], e.g. n1-standard-8, a2-highgpu-1g. Families not listed here are checked for form only.
_MACHINE_RE = re.compile(r"^(?P<family>[a-z][a-z0-9]*)-(?P<kind>[a-z]+)(?:-(?P<size>[0-9]+[a-z]?))?(?:-[a-z0-9]+)?$")
_MACHINE_KINDS = {"n1": ("standard", "highmem", "highcpu"), "n2": ("standard", "highmem", "highcpu"),
                  "e2": ("standard", "highmem", "highcpu"), "c2": ("standard",), "m1": ("ultramem", "megamem"),
                  "g2": ("standard",), "a2": ("highgpu", "megagpu", "ultragpu"),
                  "a3": ("highgpu", "megagpu", "ultragpu", "edgegpu")}
_N1_SIZES = ("1", "2", "4", "8", "16", "32", "64", "96")
# the machine family each GPU is attached to, and an example machine of it
_ACCELERATOR_FAMILY = {
    **{gpu: ("n1", "n1-standard-8") for gpu in ("NVIDIA_TESLA_K80", "NVIDIA_TESLA_P100", "NVIDIA_TESLA_V100",
                                                "NVIDIA_TESLA_P4", "NVIDIA_TESLA_T4")},
    "NVIDIA_TESLA_A100": ("a2", "a2-highgpu-1g"), "NVIDIA_A100_80GB": ("a2", "a2-ultragpu-1g"),
    "NVIDIA_L4": ("g2", "g2-standard-8"), "NVIDIA_H100_80GB": ("a3", "a3-highgpu-8g"),
    "NVIDIA_H100_MEGA_80GB": ("a3", "a3-megagpu-8g"), "NVIDIA_H200_141GB": ("a3", "a3-ultragpu-8g"),
}
_DURATION_RE = re.compile(r"^(\d+)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_JOB_NAME_RE = re.compile(r"^projects/[^/]+/locations/[^/]+/customJobs/[^/]+$")


class VertexError(DyLoRAError):
    """Vertex AI refused or failed a request (the job, or the API call, not the user's input)."""


def _aiplatform_v1():
    try:
        from google.cloud import aiplatform_v1
    except ImportError as e:
        raise ConfigError("dylora submit needs google-cloud-aiplatform (pip install google-cloud-aiplatform "
                          "google-cloud-secret-manager gcsfs: the cloud extra), "
                          "which is not installed.") from e
    return aiplatform_v1


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class VertexSettings:
    """Where and on what a job runs. Flag names are the field names (``--machine_type``...)."""

    project: str | None = _opt(None, "Google Cloud project id")
    region: str | None = _opt(None, "Vertex AI region, e.g. us-central1")
    image: str | None = _opt(None, "container image URI (built from docker/Dockerfile)")
    staging_bucket: str | None = _opt(
        None, "gs://BUCKET[/PATH]: the base output directory defaults to STAGING_BUCKET/dylora/DISPLAY_NAME")
    base_output_dir: str | None = _opt(
        None, "gs:// directory for the job's outputs; the checkpoint store is BASE/JOB_ID/store")
    display_name: str | None = _opt(None, "job name in the console (default: dylora-TIMESTAMP)")
    machine_type: str = _opt("n1-standard-8", "Compute Engine machine type")
    accelerator_type: str | None = _opt(
        None, "e.g. NVIDIA_TESLA_T4, NVIDIA_L4, NVIDIA_H100_80GB (needs --accelerator_count)")
    accelerator_count: int = _opt(0, "accelerators per replica; training runs one process per accelerator")
    replica_count: int = _opt(1, "machines; more than 1 trains on all of them at once (a chief plus workers)")
    boot_disk_gb: int = _opt(100, "boot disk size per replica in GB (pd-ssd)")
    spot: bool = _opt(False, "run on Spot VMs (cheaper, preemptible: the job continues from its latest checkpoint)")
    restart_job_on_worker_restart: bool | None = _opt(
        None, "restart every replica when one worker restarts (default: on when --replica_count > 1, else off)")
    timeout: str | None = _opt(None, "longest run time: seconds, or with a unit: 90m, 24h, 7d")
    service_account: str | None = _opt(None, "service account the job runs as (needs Secret Manager and GCS access)")
    labels: dict[str, str] = _opt(None, "KEY=VALUE[,KEY=VALUE...] labels on the job")

    def __post_init__(self) -> None:
        self.labels = dict(self.labels or {})
        if not self.display_name:
            self.display_name = time.strftime("dylora-%Y%m%d-%H%M%S")

    def validate(self) -> None:
        missing = [f"--{name}" for name in ("project", "region", "image") if not getattr(self, name)]
        if not (self.base_output_dir or self.staging_bucket):
            missing.append("--staging_bucket (or --base_output_dir)")
        if missing:
            raise ConfigError(f"dylora submit vertex needs {', '.join(missing)}: give them as flags or in "
                              "the `vertex:` section of the --config file.")
        for name in ("staging_bucket", "base_output_dir"):
            value = getattr(self, name)
            if value is not None and not re.match(r"^gs://[^/\s]+", value):
                raise ConfigError(f"--{name} {value!r} is invalid: give a Cloud Storage URL gs://BUCKET[/PATH].")
        if self.replica_count < 1:
            raise ConfigError(f"--replica_count {self.replica_count!r} is invalid: it must be an integer >= 1.")
        if self.boot_disk_gb < 10:
            raise ConfigError(f"--boot_disk_gb {self.boot_disk_gb!r} is invalid: Vertex needs at least 10 GB.")
        if self.accelerator_type and self.accelerator_count < 1:
            raise ConfigError(f"--accelerator_type {self.accelerator_type} needs --accelerator_count N "
                              "(accelerators per replica, e.g. 1).")
        if self.accelerator_count and not self.accelerator_type:
            raise ConfigError(f"--accelerator_count {self.accelerator_count} needs --accelerator_type "
                              "(e.g. NVIDIA_TESLA_T4, NVIDIA_L4).")
        if self.accelerator_count < 0:
            raise ConfigError(f"--accelerator_count {self.accelerator_count!r} is invalid: it must be >= 0.")
        if self.accelerator_type:
            known = [n for n in _aiplatform_v1().AcceleratorType.__members__ if n != "ACCELERATOR_TYPE_UNSPECIFIED"]
            if self.accelerator_type not in known:
                raise ConfigError(f"--accelerator_type {self.accelerator_type!r} is unknown; accepted: "
                                  f"{', '.join(known)}.")
        self._check_region()
        self._check_machine_type()
        self.timeout_seconds()
        for key, value in self.labels.items():
            if not _LABEL_KEY_RE.match(key) or not _LABEL_VALUE_RE.match(value):
                raise ConfigError(f"--labels {key}={value} is invalid: keys start with a lowercase letter; "
                                  "keys and values use lowercase letters, digits, '_' and '-' (at most 63).")

    def _check_region(self) -> None:
        from google.cloud.aiplatform.constants.base import SUPPORTED_REGIONS  # the client's own list

        if self.region not in SUPPORTED_REGIONS or self.region == "global":
            close = sorted(r for r in SUPPORTED_REGIONS if r.split("-")[0] == str(self.region).split("-")[0])
            raise ConfigError(f"--region {self.region!r} is not a Vertex AI region; "
                              f"{'close: ' + ', '.join(close) if close else 'e.g. us-central1, europe-west4'} "
                              f"(all: {', '.join(sorted(r for r in SUPPORTED_REGIONS if r != 'global'))}).")

    def _check_machine_type(self) -> None:
        """The machine type's form (FAMILY-KIND[-SIZE]), the kinds and sizes of the families Vertex
        trains on, and that the accelerator fits the family (an L4 needs g2, an A100 a2, an H100 a3...)."""
        match = _MACHINE_RE.match(self.machine_type or "")
        if not match:
            raise ConfigError(f"--machine_type {self.machine_type!r} is not a Compute Engine machine type: give "
                              "FAMILY-KIND-SIZE, e.g. n1-standard-8, g2-standard-12, a2-highgpu-1g, a3-highgpu-8g.")
        family, kind, size = match.group("family"), match.group("kind"), match.group("size")
        kinds = _MACHINE_KINDS.get(family)
        if kinds is not None and kind not in kinds:
            raise ConfigError(f"--machine_type {self.machine_type!r}: {family} machines come as "
                              f"{', '.join(f'{family}-{k}-N' for k in kinds)}, not {kind!r}.")
        if family == "n1" and size not in _N1_SIZES:
            raise ConfigError(f"--machine_type {self.machine_type!r}: n1 machines have "
                              f"{', '.join(_N1_SIZES)} vCPUs (e.g. n1-standard-8).")
        needs = _ACCELERATOR_FAMILY.get(self.accelerator_type or "")
        if needs and family != needs[0]:
            raise ConfigError(f"--accelerator_type {self.accelerator_type} runs on {needs[0]} machines "
                              f"(e.g. --machine_type {needs[1]}), not on --machine_type {self.machine_type}.")

    def timeout_seconds(self) -> int | None:
        if self.timeout in (None, ""):
            return None
        match = _DURATION_RE.match(str(self.timeout).strip())
        if not match or int(match.group(1)) < 1:
            raise ConfigError(f"--timeout {self.timeout!r} is invalid: give seconds (3600) or a number with "
                              "a unit s, m, h or d (90m, 24h, 7d).")
        return int(match.group(1)) * _UNIT_S[match.group(2)]

    @property
    def restarts_job_on_worker_restart(self) -> bool:
        """``restart_job_on_worker_restart`` as sent: as given, else on for a multi-node job.

        The replicas of a multi-node job meet once, in a static rendezvous at the chief: a worker
        that Vertex restarts on its own cannot rejoin the others, so the whole job restarts and
        every replica resumes from the newest checkpoint together.
        """
        if self.restart_job_on_worker_restart is None:
            return self.replica_count > 1
        return self.restart_job_on_worker_restart

    @property
    def output_dir(self) -> str:
        """The job's base output directory (validated: a gs:// URL)."""
        if self.base_output_dir:
            return self.base_output_dir.rstrip("/")
        folder = re.sub(r"[^A-Za-z0-9._-]+", "-", self.display_name).strip("-.") or "job"
        return f"{self.staging_bucket.rstrip('/')}/dylora/{folder}"

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"


def parse_labels(text: str) -> dict[str, str]:
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--labels item {item!r} is invalid: write KEY=VALUE[,KEY=VALUE...].")
        labels[key] = value
    return labels


def build_custom_job(settings: VertexSettings, container_args: list[str],
                     env: dict[str, str] | None = None) -> Any:
    """The CustomJob for ``settings``: every replica runs the entrypoint with ``container_args``."""
    v1 = _aiplatform_v1()
    settings.validate()
    machine = v1.MachineSpec(machine_type=settings.machine_type)
    if settings.accelerator_type:
        machine.accelerator_type = v1.AcceleratorType[settings.accelerator_type]
        machine.accelerator_count = settings.accelerator_count
    container = v1.ContainerSpec(
        image_uri=settings.image, command=list(ENTRYPOINT_COMMAND), args=list(container_args),
        env=[v1.EnvVar(name=k, value=v) for k, v in (env or {}).items()])

    def pool(replicas: int) -> Any:
        disk = v1.DiskSpec(boot_disk_type="pd-ssd", boot_disk_size_gb=settings.boot_disk_gb)
        return v1.WorkerPoolSpec(machine_spec=machine, replica_count=replicas, container_spec=container,
                                 disk_spec=disk)

    pools = [pool(1)] + ([pool(settings.replica_count - 1)] if settings.replica_count > 1 else [])
    scheduling = v1.Scheduling(restart_job_on_worker_restart=settings.restarts_job_on_worker_restart)
    if settings.spot:
        scheduling.strategy = v1.Scheduling.Strategy.SPOT
    timeout = settings.timeout_seconds()
    if timeout:
        scheduling.timeout = {"seconds": timeout}
    spec = v1.CustomJobSpec(
        worker_pool_specs=pools, scheduling=scheduling,
        base_output_directory=v1.GcsDestination(output_uri_prefix=settings.output_dir))
    if settings.service_account:
        spec.service_account = settings.service_account
    return v1.CustomJob(display_name=settings.display_name, job_spec=spec, labels=settings.labels)


def job_to_json(job: Any) -> str:
    return _aiplatform_v1().CustomJob.to_json(job, use_integers_for_enums=False, indent=2)


def state_name(job: Any) -> str:
    return _aiplatform_v1().JobState(job.state).name


class VertexJobs:
    """Create, read, wait for and cancel CustomJobs in one region (the real client, REST)."""

    def __init__(self, region: str, client: Any = None):
        v1 = _aiplatform_v1()
        self.region = region
        if client is None:
            from google.api_core.client_options import ClientOptions

            endpoint = os.environ.get(ENDPOINT_ENV) or f"{region}-aiplatform.googleapis.com"
            try:
                client = v1.JobServiceClient(transport="rest", client_options=ClientOptions(api_endpoint=endpoint))
            except Exception as e:  # google.auth.exceptions.DefaultCredentialsError and friends
                raise VertexError(f"cannot create a Vertex AI client: {e} (run `gcloud auth application-default "
                                  "login`, or set GOOGLE_APPLICATION_CREDENTIALS).") from e
        self.client = client

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        from google.api_core import exceptions as gexc

        try:
            return fn()
        except gexc.NotFound as e:
            raise VertexError(f"{what}: not found ({server_message(e)}).") from e
        except gexc.GoogleAPIError as e:
            raise VertexError(f"{what} failed: {type(e).__name__}: {server_message(e)}") from e
        except Exception as e:  # transport and credential errors
            raise VertexError(f"{what} failed: {type(e).__name__}: {e}") from e

    def create(self, settings: VertexSettings, job: Any) -> Any:
        return self._call(f"creating the job in {settings.parent}",
                          lambda: self.client.create_custom_job(parent=settings.parent, custom_job=job, timeout=60))

    def get(self, name: str) -> Any:
        return self._call(f"job {name}", lambda: self.client.get_custom_job(name=name, timeout=60))

    def cancel(self, name: str) -> None:
        self._call(f"cancelling job {name}", lambda: self.client.cancel_custom_job(name=name, timeout=60))

    def wait(self, name: str, poll_interval_s: float = 30.0,
             on_state: Callable[[Any], None] | None = None) -> Any:
        """Poll until the job ends; ``on_state`` sees the job each time its state changes."""
        last = None
        while True:
            job = self.get(name)
            state = state_name(job)
            if state != last and on_state is not None:
                on_state(job)
            last = state
            if state in ENDED_STATES:
                return job
            time.sleep(poll_interval_s)


def job_name(job: str, project: str | None, region: str | None) -> str:
    """A full job resource name from a name or a bare numeric id plus --project and --region."""
    if _JOB_NAME_RE.match(job):
        return job
    if re.match(r"^\d+$", job):
        if not (project and region):
            raise ConfigError(f"job {job!r} is a bare id: give --project and --region too, or the full name "
                              "projects/P/locations/REGION/customJobs/ID.")
        return f"projects/{project}/locations/{region}/customJobs/{job}"
    raise ConfigError(f"job {job!r} is invalid: give projects/P/locations/REGION/customJobs/ID or a numeric job id.")


def region_of(name: str) -> str:
    return name.split("/")[3]
