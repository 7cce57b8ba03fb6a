"""The batching engine without HTTP, on other kinds of mixture: sequences that join a running batch and
leave it at different steps get their one-at-a-time greedy completions (sparse top-1 per-example routing,
per-token routing, shared experts)."""

import threading
import time

import pytest

from tests.serve.conftest import PROMPTS


def build_mixture(**options):
    import torch

    from dylora_moe.model import DyLoRAConfig, DyLoRAMoE

    torch.manual_seed(1)
    model = DyLoRAMoE("tiny-python-lm", DyLoRAConfig(num_experts=3, r=4, **options)).eval()
    with torch.no_grad():
        for _, layer in model.adapted_layers():
            layer.lora_B.normal_(std=0.05)
            layer.router.weight.normal_(std=1.0 / model.config.router_scale)
            if layer.shared_experts:
                layer.shared_B.normal_(std=0.05)
    return model


@pytest.mark.parametrize("kind", ["sparse top-1 per example", "per token", "shared experts"])
def test_joining_and_leaving_sequences_get_their_alone_completions(kind):
    import torch

    from dylora_moe.model.base import load_tokenizer
    from dylora_moe.serve.engine import Engine, Finished, Request, Sampling, Started, Text

    torch.set_num_threads(1)
    model = build_mixture(**{"sparse top-1 per example": {}, "per token": {"routing": "token"},
                             "shared experts": {"shared_experts": 1}}[kind])
    if kind == "sparse top-1 per example":
        model.set_maturity()  # all mature: top-1 routing, the layer computes only the chosen expert
    tokenizer = load_tokenizer("tiny-python-lm")
    prompts, lengths = PROMPTS[:6], [5, 12, 8, 3, 10, 7]
    expected = []
    for prompt, length in zip(prompts, lengths):  # before the engine starts: the model has one user at a time
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=length, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))

    engine = Engine(model, tokenizer, max_batch_size=4, max_queue=8).start()  # fewer slots than prompts: some wait
    texts, gates, done = [""] * 6, [None] * 6, threading.Semaphore(0)

    def emit_for(i):
        def emit(event):
            if isinstance(event, Text):
                texts[i] += event.text
            elif isinstance(event, Started):
                gates[i] = event.gate
            elif isinstance(event, Finished):
                done.release()
        return emit

    try:
        for i, (prompt, length) in enumerate(zip(prompts, lengths)):
            engine.submit(Request(tokenizer(prompt).input_ids, Sampling(max_tokens=length, temperature=0), emit_for(i)))
            time.sleep(0.01 * i)  # some join a batch that is already decoding
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        engine.stop(timeout=10)
    assert texts == expected
    assert engine.max_rows_seen > 1
    assert {g.routing for g in gates} == {model.config.routing}
    if kind == "sparse top-1 per example":  # one expert per layer carries the whole gate
        assert all(sorted(w)[-1] == pytest.approx(1.0) for g in gates for w in g.layers.values())
