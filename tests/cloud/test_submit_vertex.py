"""``dylora submit vertex | status | cancel``: the real aiplatform client against the fake JobService."""

from __future__ import annotations

import json

import pytest
from google.cloud import aiplatform_v1

from dylora_moe import cli
from tests.cloud.conftest import run_dylora

WANDB_KEY = "wandb-secret-value-0123456789abcdef"
HF_TOKEN = "hf_secret_value_ABCDEFGHIJKLMNOP"
BASE = ["vertex", "--project", "proj", "--region", "us-central1", "--image",
        "us-docker.pkg.dev/proj/dylora/dylora:abc1234", "--staging_bucket", "gs://bkt"]


@pytest.fixture
def dylora(google, monkeypatch, capsys):
    """``dylora ARGS`` in this process (the same ``main`` as the command, without the start-up cost)."""
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "DYLORA_VERTEX_ENDPOINT", "DYLORA_SECRET_MANAGER_ENDPOINT"):
        monkeypatch.setenv(name, google.env[name])
    for name in ("WANDB_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        status = cli.main(list(args))
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def args_of(job) -> list[str]:
    return list(job.job_spec.worker_pool_specs[0].container_spec.args)


def train_args(job) -> list[str]:
    args = args_of(job)
    return args[args.index("--") + 1:]


def test_submit_sends_the_job_and_never_a_secret(google):
    env = {**google.env, "WANDB_API_KEY": WANDB_KEY, "HF_TOKEN": HF_TOKEN}
    result = run_dylora(["submit", *BASE, "--spot", "--restart_job_on_worker_restart",
                         "--machine_type", "a2-highgpu-1g", "--accelerator_type", "NVIDIA_TESLA_A100",
                         "--accelerator_count", "1", "--replica_count", "3", "--timeout", "24h",
                         "--service_account", "trainer@proj.iam.gserviceaccount.com", "--labels", "team=ml,exp=a1",
                         "--base_output_dir", "gs://bkt/exp1", "--display_name", "exp1",
                         "--secret", "WANDB_API_KEY=projects/proj/secrets/wandb/versions/latest",
                         "--secret", "HF_TOKEN=projects/proj/secrets/hf/versions/3",
                         "--", "--num_experts", "2", "--max_steps", "500",
                         "--resume", "gs://bkt/exp0/999/store:latest"], env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    [job] = google.sent_jobs()
    assert "submitted projects/proj/locations/us-central1/customJobs/1000" in result.stdout
    spec = job.job_spec
    assert job.display_name == "exp1" and dict(job.labels) == {"team": "ml", "exp": "a1"}
    assert spec.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT
    assert spec.scheduling.restart_job_on_worker_restart is True
    assert spec.scheduling.timeout.total_seconds() == 24 * 3600
    assert spec.service_account == "trainer@proj.iam.gserviceaccount.com"
    assert spec.base_output_directory.output_uri_prefix == "gs://bkt/exp1"
    # Three replicas: a chief pool of one and a worker pool of two, identical otherwise.
    assert [p.replica_count for p in spec.worker_pool_specs] == [1, 2]
    for pool in spec.worker_pool_specs:
        assert pool.machine_spec.machine_type == "a2-highgpu-1g"
        assert pool.machine_spec.accelerator_type == aiplatform_v1.AcceleratorType.NVIDIA_TESLA_A100
        assert pool.machine_spec.accelerator_count == 1
        assert pool.container_spec.image_uri == "us-docker.pkg.dev/proj/dylora/dylora:abc1234"
        assert list(pool.container_spec.command) == ["python", "-m", "dylora_moe.job.entrypoint"]
        assert list(pool.container_spec.env) == []
    assert args_of(job)[:5] == ["--secret", "WANDB_API_KEY=projects/proj/secrets/wandb/versions/latest",
                                "--secret", "HF_TOKEN=projects/proj/secrets/hf/versions/3", "--"]
    assert train_args(job) == [
        "train", "--run_id", "$(CLOUD_ML_JOB_ID)", "--resume", "auto",
        "--start_from", "gs://bkt/exp0/999/store:latest",
        "--checkpoint_store", "gs://bkt/exp1/$(CLOUD_ML_JOB_ID)/store", "--progress", "false",
        "--num_experts", "2", "--max_steps", "500"]
    # Secret values: nowhere in what was sent (bodies and headers) or printed.
    for request in google.requests:
        wire = request.body.decode() + json.dumps(request.headers)
        assert WANDB_KEY not in wire and HF_TOKEN not in wire
    assert WANDB_KEY not in result.stdout + result.stderr and HF_TOKEN not in result.stdout + result.stderr
    assert "customJobs/1000" in result.stdout and "gs://bkt/exp1/1000/store" in result.stdout


def test_dry_run_prints_only_json_that_round_trips_and_sends_nothing(google):
    result = run_dylora(["submit", *BASE, "--dry-run", "--", "--wandb_checkpoint_artifact", "ent/proj/dylora:v7",
                         "--lora_r", "8", "--bf16"], env=google.env)
    assert result.returncode == 0, result.stderr
    job = aiplatform_v1.CustomJob.from_json(result.stdout)  # stdout is the JSON and nothing else
    assert aiplatform_v1.CustomJob.to_json(job, use_integers_for_enums=False, indent=2) + "\n" == result.stdout
    assert json.loads(result.stdout)["jobSpec"]["scheduling"].get("strategy", "STRATEGY_UNSPECIFIED") != "SPOT"
    # The seed's bare artifact form becomes an explicit W&B reference in the job.
    assert train_args(job)[5:7] == ["--start_from", "wandb://ent/proj/dylora:v7"]
    assert train_args(job)[-4:] == ["--lora_r", "8", "--bf16", "true"]
    assert job.job_spec.base_output_directory.output_uri_prefix == f"gs://bkt/dylora/{job.display_name}"
    assert google.requests == []


def test_dry_run_underscore_spelling(google, dylora):
    status, out, _ = dylora("submit", *BASE, "--dry_run", "--display_name", "x")
    assert status == 0 and json.loads(out)["displayName"] == "x" and google.requests == []


def test_pass_env_secrets_is_opt_in_and_never_printed(google, dylora, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    status, out, err = dylora("submit", *BASE, "--pass_env_secrets", "--dry-run")
    assert status == 0, err
    assert WANDB_KEY not in out + err
    shown = aiplatform_v1.CustomJob.from_json(out).job_spec.worker_pool_specs[0].container_spec.env
    assert [(v.name, v.value) for v in shown] == [
        ("WANDB_API_KEY", "<not printed: WANDB_API_KEY from the submitting shell>")]
    status, out, err = dylora("submit", *BASE, "--pass_env_secrets")
    assert status == 0, err
    assert WANDB_KEY not in out + err
    [job] = google.sent_jobs()
    env = job.job_spec.worker_pool_specs[0].container_spec.env
    assert [(v.name, v.value) for v in env] == [("WANDB_API_KEY", WANDB_KEY)]
    # Without the opt-in, the shell's secrets stay in the shell.
    assert dylora("submit", *BASE)[0] == 0
    assert list(google.sent_jobs()[1].job_spec.worker_pool_specs[0].container_spec.env) == []


NAME = "projects/proj/locations/us-central1/customJobs/1000"
STATES = ["JOB_STATE_PENDING", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_RUNNING"]


def followed_states(stdout: str) -> list[str]:
    return [line.split(": ")[-1] for line in stdout.splitlines() if line.startswith(f"{NAME}: ")]


def test_wait_follows_the_job_until_it_succeeds(google, dylora):
    google.states = STATES + ["JOB_STATE_SUCCEEDED"]
    status, out, err = dylora("submit", *BASE, "--wait", "--poll_interval", "0.01")
    assert status == 0, err
    assert followed_states(out) == ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]


def test_ctrl_c_stops_following_not_the_job(google, dylora, monkeypatch):
    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("dylora_moe.cloud.vertex.time.sleep", interrupted)
    status, out, err = dylora("submit", *BASE, "--wait")
    assert status == 1 and followed_states(out) == ["JOB_STATE_RUNNING"]
    assert err == (f"dylora submit: error: stopped following {NAME}; the job keeps running. Follow it with "
                   f"`dylora submit status {NAME}`, stop it with `dylora submit cancel {NAME}`.\n")
    assert not any(r.path.endswith(":cancel") for r in google.requests)


def test_wait_on_a_failing_job_exits_1_with_its_error(google):
    google.states = STATES + ["JOB_STATE_FAILED"]
    result = run_dylora(["submit", *BASE, "--wait", "--poll_interval", "0.01"], env=google.env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert followed_states(result.stdout) == ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_FAILED"]
    assert result.stderr.startswith(f"dylora submit: error: job {NAME} ended in JOB_STATE_FAILED: The replica "
                                    "workerpool0-0 exited with a non-zero status of 1.")


def test_status_and_cancel(google, dylora):
    assert dylora("submit", *BASE, "--display_name", "to-cancel")[0] == 0
    status, out, err = dylora("submit", "status", NAME)
    assert status == 0, err
    assert f"job: {NAME}\ndisplay name: to-cancel\nstate: JOB_STATE_RUNNING" in out
    status, out, err = dylora("submit", "cancel", "1000", "--project", "proj", "--region", "us-central1")
    assert status == 0, err
    assert out.strip() == f"cancellation requested for {NAME}; state now: JOB_STATE_CANCELLED"
    assert google.requests[-2].path.startswith(f"/v1/{NAME}:cancel")
    status, out, err = dylora("submit", "status", "projects/proj/locations/us-central1/customJobs/77")
    assert status == 1
    assert err == ("dylora submit: error: job projects/proj/locations/us-central1/customJobs/77: not found "
                   "(CustomJob projects/proj/locations/us-central1/customJobs/77 not found.).\n")
    assert dylora("submit", "cancel", "1000")[0] == 2  # a bare id needs --project and --region
    assert "give --project and --region too" in dylora("submit", "status", "1000")[2]


def test_yaml_vertex_section_and_flags_override_it(google, dylora, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("num_experts: 3\nlearning_rate: 2e-4\ndatasets: [code_alpaca, mbpp]\n"
                      "vertex:\n  project: proj\n  region: europe-west4\n  image: img:1\n"
                      "  base_output_dir: gs://bkt/yaml\n  spot: true\n  machine_type: g2-standard-24\n"
                      "  accelerator_type: NVIDIA_L4\n"
                      "  accelerator_count: 2\n  labels: {team: ml}\n")
    status, out, err = dylora("submit", "vertex", "--config", str(config), "--region", "us-east1", "--dry-run",
                              "--", "--num_experts", "4")
    assert status == 0, err
    job = aiplatform_v1.CustomJob.from_json(out)
    assert job.job_spec.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT
    assert job.job_spec.worker_pool_specs[0].machine_spec.accelerator_count == 2 and dict(job.labels) == {"team": "ml"}
    args = train_args(job)
    assert args[args.index("--num_experts") + 1] == "4"  # the flag wins over the file
    assert args[args.index("--learning_rate") + 1] == "0.0002"
    assert args[args.index("--datasets") + 1] == "code_alpaca,mbpp"
    assert args[args.index("--checkpoint_store") + 1] == "gs://bkt/yaml/$(CLOUD_ML_JOB_ID)/store"
    # The region given as a flag is the one the job is created in.
    assert dylora("submit", "vertex", "--config", str(config), "--region", "us-east1")[0] == 0
    assert google.requests[-1].path.startswith("/v1/projects/proj/locations/us-east1/customJobs")
    # A mistake in the file names the user's file.
    config.write_text("num_experts: many\nvertex: {project: p}\n")
    status, _, err = dylora("submit", "vertex", "--config", str(config), "--dry-run")
    assert status == 2 and f"config file {str(config)!r}: num_experts: 'many' is not a valid int" in err


RESTART_POLICY = [  # (options, restart_job_on_worker_restart sent, the one line logged or None)
    (["--replica_count", "2"], True, "--replica_count 2: restart_job_on_worker_restart is on, so that a restarted "
                                     "replica restarts the whole job"),
    (["--replica_count", "3", "--restart_job_on_worker_restart", "false"], False,
     "--replica_count 3 with --restart_job_on_worker_restart false: a worker that Vertex restarts alone cannot "
     "rejoin the others"),
    (["--replica_count", "2", "--restart_job_on_worker_restart"], True, None),
    (["--replica_count", "2", "--restart_job_on_worker_restart", "true"], True, None),
    ([], False, None),
    (["--restart_job_on_worker_restart"], True, None),
    (["--restart_job_on_worker_restart", "false"], False, None),
]


@pytest.mark.parametrize("extra, restarts, line", RESTART_POLICY,
                         ids=[" ".join(o) or "one replica" for o, _, _ in RESTART_POLICY])
def test_multinode_jobs_restart_together_unless_told_not_to(google, dylora, caplog, extra, restarts, line):
    caplog.set_level("INFO", logger="dylora_moe.cloud.command")
    status, out, err = dylora("submit", *BASE, *extra, "--dry-run")
    assert status == 0, err
    assert aiplatform_v1.CustomJob.from_json(out).job_spec.scheduling.restart_job_on_worker_restart is restarts
    logged = [r for r in caplog.records if r.name == "dylora_moe.cloud.command"]
    assert [line in r.getMessage() for r in logged] == ([True] if line else [])
    if line:
        assert logged[0].levelname == ("INFO" if restarts else "WARNING")


def test_restart_policy_from_the_yaml_section_and_as_a_user_sees_it(google, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("vertex:\n  replica_count: 2\n  restart_job_on_worker_restart: false\n")
    result = run_dylora(["submit", *BASE, "--config", str(config), "--dry-run"], env=google.env)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert not aiplatform_v1.CustomJob.from_json(result.stdout).job_spec.scheduling.restart_job_on_worker_restart
    assert result.stderr.startswith("WARNING dylora_moe.cloud.command: --replica_count 2 with "
                                    "--restart_job_on_worker_restart false")
    # The flag overrides the file.
    result = run_dylora(["submit", *BASE, "--config", str(config), "--restart_job_on_worker_restart", "--dry-run"],
                        env=google.env)
    assert aiplatform_v1.CustomJob.from_json(result.stdout).job_spec.scheduling.restart_job_on_worker_restart
    assert "restart_job_on_worker_restart" not in result.stderr
    # The default for several replicas is on, said in one line.
    result = run_dylora(["submit", *BASE, "--replica_count", "4", "--dry-run"], env=google.env)
    assert aiplatform_v1.CustomJob.from_json(result.stdout).job_spec.scheduling.restart_job_on_worker_restart
    assert result.stderr.count("restart_job_on_worker_restart is on") == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert google.requests == []


BAD_INPUT = [
    (["--region", "r", "--image", "i", "--staging_bucket", "gs://b"], "needs --project: give them as flags"),
    (["--project", "p", "--image", "i", "--staging_bucket", "gs://b"], "needs --region"),
    (["--project", "p", "--region", "r", "--staging_bucket", "gs://b"], "needs --image"),
    (["--project", "p", "--region", "r", "--image", "i"], "needs --staging_bucket (or --base_output_dir)"),
    (["--accelerator_type", "NVIDIA_L4"], "--accelerator_type NVIDIA_L4 needs --accelerator_count N"),
    (["--accelerator_type", "NVIDIA_GTX_1080", "--accelerator_count", "1"],
     "--accelerator_type 'NVIDIA_GTX_1080' is unknown; accepted: "),
    (["--replica_count", "0"], "--replica_count 0 is invalid: it must be an integer >= 1."),
    (["--region", "mars-north9"], "--region 'mars-north9' is not a Vertex AI region; e.g. us-central1"),
    (["--region", "us-centrall1"], "--region 'us-centrall1' is not a Vertex AI region; close: us-central1, us-east1"),
    (["--machine_type", "n1-bogus-999"], "--machine_type 'n1-bogus-999': n1 machines come as n1-standard-N"),
    (["--machine_type", "n1-standard-7"], "--machine_type 'n1-standard-7': n1 machines have 1, 2, 4, 8"),
    (["--machine_type", "big machine"], "--machine_type 'big machine' is not a Compute Engine machine type"),
    (["--accelerator_type", "NVIDIA_L4", "--accelerator_count", "1"],
     "--accelerator_type NVIDIA_L4 runs on g2 machines (e.g. --machine_type g2-standard-8), "
     "not on --machine_type n1-standard-8"),
    (["--base_output_dir", "/local/out"], "--base_output_dir '/local/out' is invalid: give a Cloud Storage URL"),
    (["--staging_bucket", "s3://b"], "--staging_bucket 's3://b' is invalid"),
    (["--timeout", "soon"], "--timeout 'soon' is invalid"),
    (["--labels", "Team=ML"], "--labels Team=ML is invalid"),
    (["--", "--num_experts", "0"], "--num_experts 0 is invalid: it must be an integer >= 1."),
    (["--", "--no_such_option", "1"], "training option error: unrecognized arguments: --no_such_option 1"),
    (["--", "--run_id", "mine"], "--run_id 'mine' cannot be set for a cloud job"),
    (["--", "--resume", "latest"], "--resume latest names a local run directory"),
    (["--", "--resume", "./runs/x"], "--resume './runs/x' is a local path"),
    (["--", "--start_from", "/home/me/ckpt"], "--start_from '/home/me/ckpt' is a local path"),
    (["--", "--resume", "gs://b/x/store:latest", "--start_from", "gs://b/y/store:v1"],
     "--start_from 'gs://b/y/store:v1' and the resume reference 'gs://b/x/store:latest' were both given"),
    (["--secret", "WANDB_API_KEY=hunter2-the-value"], "--secret WANDB_API_KEY=... is not a Secret Manager reference"),
    (["--pass_env_secrets"], "--pass_env_secrets: none of WANDB_API_KEY, HF_TOKEN is set"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUT, ids=[m[:40] for _, m in BAD_INPUT])
def test_bad_input_is_exit_2_before_anything_is_sent(google, dylora, extra, message):
    required_given = message.startswith("needs --")  # the cases about a missing one
    status, out, err = dylora("submit", *(["vertex"] if required_given else BASE), *extra)
    assert status == 2
    assert message in err and err.startswith("dylora submit: error: ")
    assert "hunter2" not in err + out
    assert google.requests == []


def test_bad_input_as_a_user_meets_it(google):
    result = run_dylora(["submit", *BASE, "--accelerator_count", "2", "--", "--lora_r", "0"], env=google.env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "dylora submit: error: --lora_r 0 is invalid: it must be an integer >= 1."
    result = run_dylora(["submit", *BASE, "--accelerator_count", "2"], env=google.env)
    assert result.returncode == 2
    assert "--accelerator_count 2 needs --accelerator_type" in result.stderr
    assert google.requests == []


def test_unreachable_endpoint_and_missing_credentials_are_one_line_errors(google, dylora, monkeypatch, tmp_path):
    monkeypatch.setenv("DYLORA_VERTEX_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    status, _, err = dylora("submit", *BASE)
    assert status == 1 and err.startswith("dylora submit: error: creating the job in "
                                          "projects/proj/locations/us-central1 failed: ConnectionError")
    assert "Connection refused" in err and len(err.strip().splitlines()) == 1
    # No Application Default Credentials at all (no file, no gcloud login, not on Google Cloud).
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    status, _, err = dylora("submit", "status", NAME)
    assert status == 1 and err.startswith("dylora submit: error: cannot create a Vertex AI client: ")
    assert err.strip().endswith("(run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS).")


def test_a_secret_given_by_reference_never_travels_from_the_shell_too(google, dylora, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", "hf-token-from-the-shell")
    reference = "WANDB_API_KEY=projects/proj/secrets/wandb/versions/3"
    status, out, err = dylora("submit", *BASE, "--secret", reference, "--pass_env_secrets")
    assert status == 0, err
    [job] = google.sent_jobs()
    container = job.job_spec.worker_pool_specs[0].container_spec
    # the referenced secret is resolved in the job from Secret Manager; only the other one comes from the shell
    assert [(v.name, v.value) for v in container.env] == [("HF_TOKEN", "hf-token-from-the-shell")]
    assert WANDB_KEY not in str(job) + out + err
    assert list(container.args[:2]) == ["--secret", reference]
