"""A small mixture with distinct per-prompt gates, served in-process by uvicorn on a free loopback port,
and the real ``openai`` client pointed at it."""

import threading
import time
from contextlib import contextmanager

import pytest

from tests.conftest import free_port

API_KEY = "test-key"
# A chat template for the fixture's tokenizer (the shipped model has none): the chat endpoint builds its
# prompt with it, and the tests build the same prompt for one-at-a-time generation.
CHAT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                 "{% if add_generation_prompt %}### assistant:\n{% endif %}")
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n    def", "# sort a list\ndef sort_list(xs):", "x = 1",
           "for i in range(10):", "def fib(n):\n    if", "with open(path) as f:", "return", "try:\n    import",
           "def main():\n    args =", "@property\ndef", "while True:", "print(", "lambda x:", "if __name__ =="]


@pytest.fixture(scope="session")
def mixture_dir(tmp_path_factory):
    """A saved mixture on the shipped base (a run's final/ in miniature): experts with non-zero B, and routers
    strong enough that different prompts get clearly different gates (a row served with another row's gate
    would show)."""
    import torch

    from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
    from dylora_moe.model.base import load_tokenizer

    torch.manual_seed(0)
    model = DyLoRAMoE("tiny-python-lm", DyLoRAConfig(num_experts=3, r=4))
    with torch.no_grad():
        for _, layer in model.adapted_layers():
            layer.lora_B.normal_(std=0.05)
            layer.router.weight.normal_(std=1.0 / model.config.router_scale)
    path = tmp_path_factory.mktemp("run") / "final"
    model.save_pretrained(path)
    tokenizer = load_tokenizer("tiny-python-lm")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def loaded(mixture_dir):
    import torch

    from dylora_moe.serve.command import load_model

    torch.set_num_threads(1)  # a 4M-parameter model generates fastest on one thread of a busy machine
    return load_model(str(mixture_dir))


@contextmanager
def serving(model, tokenizer, name="mixture", **options):
    """(base URL, engine) of the app served by uvicorn in a thread; stopped on exit."""
    import uvicorn

    from dylora_moe.serve.command import build

    engine, app = build(model, tokenizer, name, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop(timeout=10)


@pytest.fixture(scope="session")
def server(loaded):
    model, tokenizer = loaded
    with serving(model, tokenizer, api_key=API_KEY, max_batch_size=16, max_queue=64) as (url, engine):
        yield url, engine


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def alone(mixture_dir):
    """One-at-a-time greedy generation with the model's own generate: the reference completions (a copy of
    the model of its own, so that it never shares one with a server's worker thread)."""
    import torch

    from dylora_moe.serve.command import load_model

    model, tokenizer = load_model(str(mixture_dir))
    cache = {}

    def generate(prompt_ids: list[int], max_new_tokens: int) -> str:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in cache:
            ids = torch.tensor([prompt_ids])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
            cache[key] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return cache[key]

    return generate
