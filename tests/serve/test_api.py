"""dylora serve through the real openai client: completions, chat, streaming, n > 1, stop sequences, the gate."""

import pytest

from tests.serve.conftest import PROMPTS

MAX_TOKENS = 12


def test_completion_is_the_one_at_a_time_greedy_completion(client, loaded, alone):
    tokenizer = loaded[1]
    reply = client.completions.create(model="mixture", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    ids = tokenizer(PROMPTS[0]).input_ids
    choice = reply.choices[0]
    assert choice.text == alone(ids, MAX_TOKENS)
    assert choice.finish_reason == "length"
    assert reply.object == "text_completion" and reply.model == "mixture"
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == MAX_TOKENS
    assert reply.usage.total_tokens == len(ids) + MAX_TOKENS


def test_the_gate_field_is_the_prompts_own_gate(client, loaded, mixture_dir):
    """The reply's gate is the one each router computes from this prompt alone (forward hooks on a fresh copy)."""
    import torch

    from dylora_moe.serve.command import load_model

    model, tokenizer = load_model(str(mixture_dir))
    gates = {}

    def record(name):
        def hook(module, args, output):
            gates[name] = output[0, 0].tolist()
        return hook

    hooks = [layer.router.register_forward_hook(record(name)) for name, layer in model.adapted_layers()]
    with torch.no_grad():
        model(**tokenizer(PROMPTS[3], return_tensors="pt"))
    for hook in hooks:
        hook.remove()
    reply = client.completions.create(model="mixture", prompt=PROMPTS[3], max_tokens=2, temperature=0)
    for block in (reply.model_extra["dylora"], reply.choices[0].model_extra["dylora"]):
        assert block["routing"] == "example"
        assert set(block["layers"]) == set(gates)
        for name, weights in gates.items():
            assert block["layers"][name] == pytest.approx(weights, abs=1e-5)
        mean = torch.tensor(list(gates.values())).mean(0)
        assert block["gate"] == pytest.approx(mean.tolist(), abs=1e-5)
        assert block["experts"][0] == int(mean.argmax())


def test_prompts_are_routed_differently(client):
    """The fixture's routers separate prompts: a served row can not pass with another row's gate unnoticed."""
    gates = [client.completions.create(model="mixture", prompt=p, max_tokens=1).model_extra["dylora"]["gate"]
             for p in PROMPTS[:4]]
    assert max(abs(a - b) for g in gates[1:] for a, b in zip(g, gates[0])) > 0.05


def test_chat_uses_the_chat_template(client, loaded, alone):
    tokenizer = loaded[1]
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    reply = client.chat.completions.create(model="mixture", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### assistant:\n")
    expected = alone(tokenizer(prompt, add_special_tokens=False).input_ids, MAX_TOKENS)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion"
    assert reply.model_extra["dylora"]["routing"] == "example"


def test_streaming_gives_the_same_text_as_one_reply(client, loaded, alone):
    tokenizer = loaded[1]
    chunks = list(client.completions.create(model="mixture", prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == alone(tokenizer(PROMPTS[1]).input_ids, MAX_TOKENS)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # delivered piece by piece
    assert chunks[0].choices[0].model_extra["dylora"]["routing"] == "example"  # the gate comes first
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_chat_streaming(client):
    messages = [{"role": "user", "content": "Write a loop."}]
    whole = client.chat.completions.create(model="mixture", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(model="mixture", messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequences_cut_the_text(client, loaded, alone):
    tokenizer = loaded[1]
    full = alone(tokenizer(PROMPTS[0]).input_ids, MAX_TOKENS)
    # a piece of the greedy completion from its middle on, with some visible character in it
    stop = next(full[i:i + 3] for i in range(len(full) // 2, len(full) - 2) if full[i:i + 3].strip())
    expected = full[:full.find(stop)]
    for stops in (stop, ["never-appears", stop]):
        reply = client.completions.create(model="mixture", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                          stop=stops)
        assert reply.choices[0].text == expected
        assert reply.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="mixture", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                              temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected  # nothing of the stop string leaks out
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_n_choices_with_a_seed_are_reproducible(client):
    kwargs = dict(model="mixture", prompt=PROMPTS[4], max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95, n=3, seed=7)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in second.choices]  # same seed: same samples
    assert len(set(texts)) > 1  # each choice draws from its own stream
    other = client.completions.create(**{**kwargs, "seed": 8})
    assert [c.text for c in other.choices] != texts
    first_gate = first.choices[0].model_extra["dylora"]["gate"]
    assert {c.model_extra["dylora"]["gate"] == first_gate for c in first.choices} == {True}


def test_greedy_n_gives_n_equal_choices(client):
    reply = client.completions.create(model="mixture", prompt=PROMPTS[5], max_tokens=6, temperature=0, n=2)
    assert len(reply.choices) == 2 and reply.choices[0].text == reply.choices[1].text


def test_a_list_of_prompts(client, loaded, alone):
    tokenizer = loaded[1]
    reply = client.completions.create(model="mixture", prompt=PROMPTS[6:8], max_tokens=6, temperature=0)
    assert [c.text for c in reply.choices] == [alone(tokenizer(p).input_ids, 6) for p in PROMPTS[6:8]]
    assert reply.choices[0].model_extra["dylora"] != reply.choices[1].model_extra["dylora"]
    tokens = client.completions.create(model="mixture", prompt=tokenizer(PROMPTS[6]).input_ids, max_tokens=6,
                                       temperature=0)
    assert tokens.choices[0].text == reply.choices[0].text


def test_models_and_health(client, server):
    import httpx

    models = client.models.list()
    assert [m.id for m in models.data] == ["mixture"]
    info = models.data[0].model_extra["dylora"]
    assert info["num_experts"] == 3 and info["routing"] == "example" and info["base_model"] == "tiny-python-lm"
    health = httpx.get(server[0] + "/health")  # no key needed: a load balancer probes it
    assert health.status_code == 200 and health.json()["status"] == "ok"
