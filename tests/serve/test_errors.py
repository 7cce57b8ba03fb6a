"""Bad requests get OpenAI-style errors with the right status; a full queue is refused; a client that
disconnects frees its slot. The real openai client where it can send the request, httpx where it cannot."""

import time

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, PROMPTS, serving


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("name, value", [
    ("temperature", 2.5), ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 17),
    ("max_tokens", 0), ("max_tokens", 1.5), ("stop", ["a", "b", "c", "d", "e"]), ("seed", "seven"),
    ("stream", "yes"), ("logprobs", 3), ("echo", True), ("best_of", 2),
])
def test_an_invalid_parameter_is_a_400_naming_it(client, name, value):
    err = error_of(lambda: client.completions.create(model="mixture", prompt="x", max_tokens=2,
                                                     extra_body={name: value}))
    assert err.status_code == 400
    assert err.param == name, err.body
    assert err.type == "invalid_request_error"
    assert name in err.message


@pytest.mark.parametrize("body, param", [
    ({"model": "mixture"}, "prompt"), ({"model": "mixture", "prompt": 5}, "prompt"),
    ({"model": "mixture", "prompt": [[]]}, "prompt"), ({"model": "mixture", "prompt": [99999]}, "prompt"),
    ({"prompt": "x"}, "model"),
])
def test_a_malformed_prompt_or_missing_model(server, body, param):
    reply = httpx.post(server[0] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


def test_invalid_json_and_unknown_paths(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    reply = httpx.post(server[0] + "/v1/completions", content=b"{not json", headers=headers)
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    reply = httpx.get(server[0] + "/v1/nothing-here", headers=headers)
    assert reply.status_code == 404 and "error" in reply.json()


def test_an_unknown_model_is_a_404(client):
    err = error_of(lambda: client.completions.create(model="gpt-4", prompt="x", max_tokens=2))
    assert err.status_code == 404 and err.code == "model_not_found" and "mixture" in err.message


def test_a_wrong_or_missing_key_is_a_401(server):
    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="not-the-key", max_retries=0)
    err = error_of(lambda: wrong.completions.create(model="mixture", prompt="x", max_tokens=2))
    assert err.status_code == 401 and err.code == "invalid_api_key"
    assert httpx.get(server[0] + "/v1/models").status_code == 401


def test_a_prompt_longer_than_the_context_is_a_400(client, loaded):
    tokenizer = loaded[1]
    long_prompt = "x = 1\n" * 1000
    assert len(tokenizer(long_prompt).input_ids) > 1024
    err = error_of(lambda: client.completions.create(model="mixture", prompt=long_prompt, max_tokens=2))
    assert err.status_code == 400 and err.code == "context_length_exceeded" and err.param == "prompt"
    assert "1024" in err.message
    err = error_of(lambda: client.completions.create(model="mixture", prompt="x", max_tokens=1024))
    assert err.status_code == 400 and err.code == "context_length_exceeded" and err.param == "max_tokens"
    err = error_of(lambda: client.chat.completions.create(
        model="mixture", messages=[{"role": "user", "content": long_prompt}]))
    assert err.status_code == 400 and err.code == "context_length_exceeded" and err.param == "messages"


def test_bad_chat_messages(client):
    for messages in ([], [{"content": "no role"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        err = error_of(lambda: client.chat.completions.create(model="mixture", messages=messages, max_tokens=2))
        assert err.status_code == 400 and err.param.startswith("messages")


@pytest.fixture(scope="module")
def small_server():
    """The base model itself (no chat template, no experts), one sequence at a time, no queue."""
    import torch

    from dylora_moe.serve.command import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model("tiny-python-lm")
    with serving(model, tokenizer, name="tiny-python-lm", max_batch_size=1, max_queue=0) as (url, engine):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60), engine


def test_chat_without_a_chat_template_is_a_clear_400(small_server):
    client, _ = small_server
    err = error_of(lambda: client.chat.completions.create(model="tiny-python-lm",
                                                          messages=[{"role": "user", "content": "hi"}]))
    assert err.status_code == 400 and err.code == "chat_template_missing"
    assert "/v1/completions" in err.message
    reply = client.completions.create(model="tiny-python-lm", prompt="def f():", max_tokens=3)
    assert reply.model_extra["dylora"] is None  # a base model has no gate
    assert reply.usage.completion_tokens <= 3


def wait_until(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_full_queue_is_a_503_and_a_disconnect_frees_the_slot(small_server):
    client, engine = small_server
    stream = client.completions.create(model="tiny-python-lm", prompt=PROMPTS[0], max_tokens=900, temperature=0,
                                       stream=True)
    next(iter(stream))  # it runs: the one slot is taken
    wait_until(lambda: engine.load()["running"] == 1)
    err = error_of(lambda: client.completions.create(model="tiny-python-lm", prompt="x", max_tokens=2))
    assert err.status_code == 503 and err.code == "queue_full"
    assert err.response.headers["retry-after"] == "1"
    steps = engine.steps
    stream.close()  # the client goes away mid-generation
    wait_until(lambda: engine.load()["running"] == 0)
    assert engine.steps - steps < 800  # it stopped long before its 900 tokens
    reply = client.completions.create(model="tiny-python-lm", prompt="x", max_tokens=2)  # the slot is free again
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_a_non_streaming_client_that_disconnects_frees_its_slot(small_server):
    client, engine = small_server
    impatient = client.with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="tiny-python-lm", prompt=PROMPTS[1], max_tokens=900, temperature=0)
    wait_until(lambda: engine.load()["running"] == 0)
    assert client.completions.create(model="tiny-python-lm", prompt="x", max_tokens=2).choices
