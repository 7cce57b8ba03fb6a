"""Cloud tests: the real Google client libraries against local fakes (see ``fakes.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("google.cloud.aiplatform_v1")

from tests.cloud.fakes import FakeGoogleAPIs  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402


@pytest.fixture
def google(tmp_path):
    """The fake Google APIs, and an environment under which our code reaches them (and only them)."""
    fake = FakeGoogleAPIs().start()
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "HF_TOKEN")}
    env.update({
        "GOOGLE_APPLICATION_CREDENTIALS": str(fake.credentials_file(tmp_path)),
        "DYLORA_VERTEX_ENDPOINT": fake.url,
        "DYLORA_SECRET_MANAGER_ENDPOINT": fake.url,
        "NO_PROXY": "127.0.0.1,localhost",
    })
    fake.env = env
    yield fake
    fake.stop()


def run_dylora(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """``dylora ARGS`` as a user runs it: a subprocess, from the repository root."""
    return subprocess.run([sys.executable, "-m", "dylora_moe.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


from tests.train.conftest import small_model_dir  # noqa: E402,F401  (a small random Llama, session-scoped)
