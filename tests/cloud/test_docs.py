"""Every ``dylora submit`` example of docs/cloud.md and README.md, as written, against the fake Vertex API."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from google.cloud import aiplatform_v1

from dylora_moe import cli
from tests.conftest import REPO_ROOT

DOC = (REPO_ROOT / "docs" / "cloud.md").read_text()


def commands(prefix: str, text: str = DOC) -> list[list[str]]:
    """The shell lines of the doc's code blocks that start with ``prefix`` (continuations joined)."""
    found, inside = [], False
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside and line.startswith(prefix):
            found.append(shlex.split(line, comments=True))
    return found


def test_every_submit_example_runs(google, monkeypatch, tmp_path, capsys):
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "DYLORA_VERTEX_ENDPOINT"):
        monkeypatch.setenv(name, google.env[name])
    monkeypatch.setattr("dylora_moe.cloud.vertex.time.sleep", lambda s: None)  # --wait polls at once
    (tmp_path / "job.yaml").write_text(re.search(r"```yaml\n# job.yaml\n(.*?)```", DOC, re.S).group(1))
    monkeypatch.chdir(tmp_path)
    google.jobs_by_id("projects/my-project/locations/us-central1/customJobs/1234567890")
    examples = commands("dylora submit")
    assert len(examples) >= 7
    for argv in examples:
        status = cli.main(argv[1:])
        out, err = capsys.readouterr()
        assert status == 0, f"{shlex.join(argv)}: {err}"
        if "--dry-run" in argv:
            aiplatform_v1.CustomJob.from_json(out)
    sent = google.sent_jobs()
    assert len(sent) == 4  # the first example, --wait, and the two "start from" examples
    first = list(sent[0].job_spec.worker_pool_specs[0].container_spec.args)
    assert first[:3] == ["--secret", "WANDB_API_KEY=projects/my-project/secrets/wandb-api-key/versions/latest", "--"]
    starts = [a[a.index("--start_from") + 1] for a in (list(j.job_spec.worker_pool_specs[0].container_spec.args)
                                                         for j in sent[2:])]
    assert starts == ["gs://my-bucket/experiments/e1/1234567890/store:latest",
                      "wandb://my-team/dylora-moe/1234567890-checkpoint:v12"]


def test_readme_submit_example_runs(google, capsys):
    [argv] = commands("dylora submit", (REPO_ROOT / "README.md").read_text())
    assert "--dry-run" in argv
    assert cli.main(argv[1:]) == 0
    job = aiplatform_v1.CustomJob.from_json(capsys.readouterr().out)
    assert job.job_spec.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT and google.requests == []


def test_build_script_dry_run_example_runs():
    [argv] = [c for c in commands("scripts/build_and_push.sh") if "--dry-run" in c]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.match(r"docker build --file \S+/docker/Dockerfile --tag us-central1-docker.pkg.dev/my-project/dylora/"
                    r"dylora-moe:[0-9a-f]{7,}(-dirty)? "
                    r"--tag us-central1-docker.pkg.dev/my-project/dylora/dylora-moe:latest ",
                    result.stdout)


@pytest.mark.parametrize("flag", ["--project", "--region", "--image", "--staging_bucket", "--base_output_dir",
                                  "--display_name", "--machine_type", "--accelerator_type", "--accelerator_count",
                                  "--replica_count", "--boot_disk_gb", "--spot", "--restart_job_on_worker_restart",
                                  "--timeout", "--service_account", "--labels", "--dry_run", "--wait",
                                  "--poll_interval", "--secret", "--pass_env_secrets"])
def test_every_flag_is_documented_and_exists(flag, capsys):
    assert re.search(rf"{flag}(?![a-z_])", DOC)
    with pytest.raises(SystemExit):
        cli.main(["submit", "vertex", "--help"])
    assert flag in capsys.readouterr().out


def quoted_messages(text: str) -> list[str]:
    """The messages a troubleshooting page quotes: code spans of its ### headings and bullet starts."""
    spans = []
    for line in text.splitlines():
        if line.startswith("### ") or line.startswith("- `"):
            spans += re.findall(r"`([^`]+)`", line if line.startswith("### ") else line.split(":", 1)[0] + ":")
    return spans


def test_the_resumption_guide_quotes_messages_the_code_prints():
    """Every message docs/checkpoint-resumption.md explains exists, word for word, in the package."""
    guide = (REPO_ROOT / "docs" / "checkpoint-resumption.md").read_text()
    source = "\n".join(p.read_text() for p in (REPO_ROOT / "dylora_moe").rglob("*.py"))
    source = re.sub(r'"\s*\n\s*[rf]*"', "", source)  # join implicitly concatenated string literals
    messages = quoted_messages(guide)
    assert len(messages) >= 30
    missing = []
    for message in messages:
        for piece in re.split(r"…|\(…\)|\[…\]", message):
            piece = piece.strip(" '.:;,()[]")
            if len(piece) >= 6 and piece not in source:
                missing.append(piece)
    assert missing == []
