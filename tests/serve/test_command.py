"""``dylora serve`` as a user runs it: a subprocess on a loopback port. SIGTERM drains (in-flight requests
finish, new ones are refused, exit 0 within the bound); a bad --model is one paragraph and exit 2."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.slow


def dylora(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "dylora_moe", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_healthy(url: str, process, seconds=120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("dylora serve did not become healthy")


def wait_running(url: str, seconds=60.0) -> None:
    deadline = time.monotonic() + seconds
    while httpx.get(url + "/health", timeout=5).json()["running"] < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(mixture_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = dylora("serve", "--model", str(mixture_dir), "--port", str(port), "--drain_timeout", "60",
                     "--served_model_name", "m")
    try:
        wait_healthy(url, process)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        result = {}

        def long_request():  # well under way when SIGTERM comes, and it must still come back whole
            chunks = list(client.completions.create(model="m", prompt="def main():", max_tokens=300, temperature=0,
                                                    stream=True))
            result["text"] = "".join(c.choices[0].text for c in chunks)
            result["reason"] = chunks[-1].choices[0].finish_reason

        thread = threading.Thread(target=long_request)
        thread.start()
        wait_running(url)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises((openai.APIConnectionError, openai.APIStatusError)) as refused:
            client.completions.create(model="m", prompt="x", max_tokens=2)
        if isinstance(refused.value, openai.APIStatusError):
            assert refused.value.status_code == 503
        thread.join(120)
        assert result.get("reason") == "length", result  # all its 300 tokens (or it ended early with EOS)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    out, err = process.communicate()
    assert "Traceback" not in err


def test_sigterm_bounds_the_drain(mixture_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = dylora("serve", "--model", str(mixture_dir), "--port", str(port), "--drain_timeout", "1")
    try:
        wait_healthy(url, process)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        thread = threading.Thread(target=lambda: pytest.raises(Exception, client.completions.create,
                                                               model=str(mixture_dir), prompt="def f():",
                                                               max_tokens=1000, temperature=0))
        thread.start()
        wait_running(url)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert time.monotonic() - stopped < 15  # the bound (1 s) plus shutting down, not the 1000 tokens
        thread.join(30)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_bad_model_is_one_paragraph_and_exit_2(tmp_path):
    process = dylora("serve", "--model", str(tmp_path / "missing" / "final"))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("dylora serve: error:")]
    assert len(lines) == 1 and "no such directory" in lines[0] and "runs/RUN_ID/final" in lines[0]


def test_a_port_in_use_is_one_paragraph_and_exit_2():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = dylora("serve", "--model", "tiny-python-lm", "--port", str(taken.getsockname()[1]))
        out, err = process.communicate(timeout=300)
    assert process.returncode == 2 and "Traceback" not in err
    assert "dylora serve: error: could not listen on 127.0.0.1:" in err
