"""The container's secret resolution: the real Secret Manager client against the fake REST API."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dylora_moe.cloud.secrets import SecretError, parse_secret_refs, resolve_secrets
from dylora_moe.errors import ConfigError
from dylora_moe.job.entrypoint import expand_variables
from tests.conftest import REPO_ROOT

WANDB = "projects/proj/secrets/wandb/versions/latest"
HF = "projects/proj/secrets/hf-token/versions/2"


@pytest.fixture
def secret_manager(google, monkeypatch):
    google.secrets = {WANDB: "wandb-key-value-42", HF: "hf_token_value_43"}
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "DYLORA_SECRET_MANAGER_ENDPOINT"):
        monkeypatch.setenv(name, google.env[name])
    return google


def test_references_resolve_into_the_environment(secret_manager):
    environ: dict[str, str] = {}
    names = resolve_secrets(parse_secret_refs([f"WANDB_API_KEY={WANDB}", f"HF_TOKEN={HF}"]), environ=environ)
    assert names == ["WANDB_API_KEY", "HF_TOKEN"]
    assert environ == {"WANDB_API_KEY": "wandb-key-value-42", "HF_TOKEN": "hf_token_value_43"}
    calls = [r.path.split("?")[0] for r in secret_manager.requests if r.path.startswith("/v1/")]
    assert calls == [f"/v1/{WANDB}:access", f"/v1/{HF}:access"]


def test_a_missing_secret_is_an_error_naming_it_not_a_value(secret_manager):
    environ: dict[str, str] = {}
    missing = "projects/proj/secrets/wandb-typo/versions/latest"
    with pytest.raises(SecretError) as err:
        resolve_secrets(parse_secret_refs([f"HF_TOKEN={HF}", f"WANDB_API_KEY={missing}"]), environ=environ)
    message = str(err.value)
    assert message.startswith(f"secret {missing} (for WANDB_API_KEY) does not exist or has no such version")
    assert "hf_token_value_43" not in message and "wandb-key-value-42" not in message


def test_no_permission_names_the_role_to_grant(secret_manager):
    secret_manager.secrets["projects/proj/secrets/locked/versions/1"] = None
    with pytest.raises(SecretError, match=r"^no permission to read secret projects/proj/secrets/locked/versions/1 "
                                          r"\(for HF_TOKEN\): grant the job's service account "
                                          r"roles/secretmanager.secretAccessor on it.$"):
        resolve_secrets(parse_secret_refs(["HF_TOKEN=projects/proj/secrets/locked/versions/1"]), environ={})


def test_entrypoint_with_a_missing_secret_stops_before_training(secret_manager, tmp_path):
    """The container's command as Vertex runs it: exit 1, one line naming the secret, no value, no trace."""
    missing = "projects/proj/secrets/nope/versions/latest"
    env = {**secret_manager.env, "CLOUD_ML_JOB_ID": "4242"}
    result = subprocess.run(
        [sys.executable, "-m", "dylora_moe.job.entrypoint", "--secret", f"HF_TOKEN={HF}",
         "--secret", f"WANDB_API_KEY={missing}", "--", "train", "--run_id", "$(CLOUD_ML_JOB_ID)",
         "--output_dir", str(tmp_path / "runs")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"dylora job: error: secret {missing} (for WANDB_API_KEY) does not exist or has no such version: create "
        "it with `gcloud secrets create` / `gcloud secrets versions add`, or fix the --secret reference.")
    assert "Traceback" not in result.stderr and "hf_token_value_43" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_secret_reference_syntax():
    with pytest.raises(ConfigError, match=r"--secret WANDB_API_KEY=\.\.\. is not a Secret Manager reference") as err:
        parse_secret_refs(["WANDB_API_KEY=0123456789abcdef"])
    assert "0123456789abcdef" not in str(err.value)
    with pytest.raises(ConfigError, match="expected NAME=projects/PROJECT/secrets/SECRET/versions/VERSION"):
        parse_secret_refs(["not a name=projects/p/secrets/s/versions/1"])
    with pytest.raises(ConfigError, match="--secret HF_TOKEN is given twice"):
        parse_secret_refs([f"HF_TOKEN={HF}", f"HF_TOKEN={WANDB}"])
    assert [str(r) for r in parse_secret_refs([f"X={HF}", "Y=projects/p/locations/eu/secrets/s/versions/3"])] == [
        f"X={HF}", "Y=projects/p/locations/eu/secrets/s/versions/3"]


def test_job_variables_expand_from_the_environment():
    env = {"CLOUD_ML_JOB_ID": "8812"}
    assert expand_variables(["--run_id", "$(CLOUD_ML_JOB_ID)", "gs://b/x/$(CLOUD_ML_JOB_ID)/store", "$HOME"], env) == [
        "--run_id", "8812", "gs://b/x/8812/store", "$HOME"]
    with pytest.raises(ConfigError,
                       match=r"uses \$\(CLOUD_ML_JOB_ID\) but CLOUD_ML_JOB_ID is not set in the container"):
        expand_variables(["$(CLOUD_ML_JOB_ID)"], {})
