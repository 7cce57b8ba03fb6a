"""Per-example routing: one gate per example, read from its prompt, kept during generation."""

import pytest
import torch

from dylora_moe.checkpoint.fingerprint import ArchitectureFingerprint
from dylora_moe.errors import ConfigError
from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from tests.model.helpers import randomize_experts, tiny_llama

PROMPT = 6


def example_mixture(**overrides) -> DyLoRAMoE:
    config = dict(num_experts=3, r=4, alpha=8, dropout=0.0, routing="example", top_k=1)
    config.update(overrides)
    model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(**config)).eval()
    randomize_experts(model, scale=0.3)
    return model


def batch():
    torch.manual_seed(7)
    ids = torch.randint(3, 128, (3, 12))
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids, labels


def gates(model, *args, **kwargs):
    captured = []
    hooks = [layer.router.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for _, layer in model.adapted_layers()]
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return captured


def test_one_gate_per_example_that_depends_only_on_the_prompt():
    model = example_mixture()
    ids, labels = batch()
    before = gates(model, ids, labels=labels)
    assert all(g.shape == (3, 1, 3) for g in before)
    changed = ids.clone()
    changed[:, PROMPT + 2:] = 5  # other response tokens: same prompt, same gates
    after = gates(model, changed, labels=labels)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    other_prompt = ids.clone()
    other_prompt[:, 1] = 9
    assert any(not torch.equal(a, b) for a, b in zip(before, gates(model, other_prompt, labels=labels)))


def test_a_response_token_never_sees_later_response_tokens():
    model = example_mixture()
    ids, labels = batch()
    logits = model(ids, labels=labels).logits
    changed = ids.clone()
    changed[:, -1] = 5
    torch.testing.assert_close(model(changed, labels=labels).logits[:, :-1], logits[:, :-1], rtol=0, atol=0)


def test_prompt_mask_and_labels_route_alike_and_padding_is_not_prompt():
    model = example_mixture()
    ids, labels = batch()
    prompt_mask = labels == -100
    torch.testing.assert_close(model(ids, prompt_mask=prompt_mask).logits, model(ids, labels=labels).logits)
    padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    attention = torch.cat([torch.ones_like(ids), torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded_labels = torch.cat([labels, torch.full((3, 4), -100)], dim=1)
    for kwargs in (dict(labels=padded_labels), dict(prompt_mask=padded_labels == -100)):
        logits = model(padded, attention_mask=attention, **kwargs).logits[:, :12]
        torch.testing.assert_close(logits, model(ids, labels=labels).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mature", [False, True])
def test_generation_keeps_the_prompt_gate_with_and_without_cache(mature):
    model = example_mixture()
    if mature:
        model.set_maturity()
    model.base_model.generation_config.eos_token_id = None  # always 8 new tokens, no padding
    prompt = torch.tensor([[1, 17, 42, 99, 5, 33], [1, 8, 64, 12, 70, 3]])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape[1] == 14 and torch.equal(with_cache, without)
    # teacher forcing the generated text with the prompt marked gives the same greedy tokens
    labels = with_cache.clone()
    labels[:, : prompt.shape[1]] = -100
    logits = model(with_cache, labels=labels).logits
    assert torch.equal(logits[:, prompt.shape[1] - 1 : -1].argmax(-1), with_cache[:, prompt.shape[1]:])
    assert not model.routing.context.generating and model.routing.context.prompt_mask is None


def test_balance_loss_counts_examples_and_gradients_reach_routers():
    model = example_mixture().train()
    ids, labels = batch()
    out = model(ids, labels=labels)
    assert out.router_stats.expert_usage.sum().item() == pytest.approx(1.0)
    out.loss.backward()
    for _, layer in model.adapted_layers():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_save_and_load_keep_per_example_routing(tmp_path):
    model = example_mixture()
    ids, labels = batch()
    model.save_pretrained(tmp_path)
    loaded = DyLoRAMoE.from_pretrained(tmp_path, base_model=tiny_llama()).eval()
    assert loaded.config.routing == "example"
    assert torch.equal(loaded(ids, labels=labels).logits, model(ids, labels=labels).logits)


def test_routing_granularity_is_part_of_the_fingerprint():
    token = ArchitectureFingerprint.of(example_mixture(routing="token"))
    example = ArchitectureFingerprint.of(example_mixture())
    assert ("routing", "token", "example") in token.differences(example)
    old = token.to_dict()
    del old["routing"]  # a checkpoint written before the field existed routed per token
    assert ArchitectureFingerprint.from_dict(old).routing == "token"


def test_unknown_routing_is_a_clear_error():
    with pytest.raises(ConfigError, match="routing='sentence' is invalid: choose 'token'"):
        DyLoRAConfig(routing="sentence")


def test_router_scale_gives_the_same_gates_for_correspondingly_smaller_weights():
    plain = example_mixture(router_scale=1.0)
    scaled = example_mixture(router_scale=30.0)
    scaled.load_trainable_state_dict(plain.trainable_state_dict())
    with torch.no_grad():
        for _, layer in scaled.adapted_layers():
            layer.router.weight.div_(30.0)
    ids, labels = batch()
    torch.testing.assert_close(scaled(ids, labels=labels).logits, plain(ids, labels=labels).logits)
    fresh = DyLoRAMoE(tiny_llama(), DyLoRAConfig(router_scale=30.0))
    weight_std = torch.cat([layer.router.weight.flatten() for _, layer in fresh.adapted_layers()]).std()
    assert weight_std.item() == pytest.approx(0.02 / 30, rel=0.1)  # initial logits as small as without the scale
    differences = ArchitectureFingerprint.of(scaled).differences(ArchitectureFingerprint.of(plain))
    assert ("router_scale", 30.0, 1.0) in differences


@pytest.mark.parametrize("grad", [False, True])
def test_layers_sharing_an_input_pool_it_once_and_every_router_reads_its_own_input(grad):
    """gate_proj and up_proj read the same tensor: one pooled prompt for both; every other router
    pools its own input (no stale pool across layers, with or without autograd)."""
    model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=3, r=4, dropout=0.0, target_modules="mlp")).eval()
    randomize_experts(model)
    seen, pool_calls = [], []
    for _, layer in model.adapted_layers():
        router = layer.router
        router.register_forward_hook(lambda m, inputs, out: seen.append((m, inputs[0], out)))
        original = router._pool
        router._pool = lambda x, original=original: pool_calls.append(1) or original(x)
    ids = torch.randint(3, 128, (2, 9))
    with torch.set_grad_enabled(grad):
        model(ids, attention_mask=torch.ones_like(ids))
    assert len(seen) == 6 and len(pool_calls) == 4  # 2 layers x (gate/up shared, down)
    model.routing.context.prompt_mask = torch.ones_like(ids, dtype=torch.bool)
    for router, x, gate in seen:
        logits = torch.nn.functional.linear(router._pool(x), router.weight) * model.routing.settings.scale
        expected = torch.softmax(logits / model.routing.settings.temperature, dim=-1)
        torch.testing.assert_close(gate, expected)


def test_auxiliary_losses_without_weight_are_reported_but_build_no_graph():
    ids = torch.randint(3, 128, (2, 9))
    model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=3, r=4, z_loss_coefficient=0.0,
                                                  router_mi_coefficient=0.1))
    out = model(ids, labels=ids)
    assert out.z_loss > 0 and out.z_loss.grad_fn is None  # monitored only
    assert out.mi_loss.grad_fn is not None and out.balance_loss.grad_fn is not None
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.balance_loss + 0.1 * out.mi_loss)


def test_a_one_token_prompt_keeps_its_gate_for_every_new_token():
    model = example_mixture()
    model.base_model.generation_config.eos_token_id = None
    prompt = torch.tensor([[17], [42]])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    routed = model.generate(prompt, **kwargs)
    # the same generation with each example's gate fixed to the one its prompt gets
    forced = []
    for row in prompt:
        layer_gates = torch.stack([g[0, 0] for g in gates(model, row[None], prompt_mask=torch.ones(1, 1))])
        model.force_gates(layer_gates)
        forced.append(model.generate(row[None], max_new_tokens=8, do_sample=False, pad_token_id=0,
                                     attention_mask=torch.ones(1, 1, dtype=torch.long)))
        model.force_gates(None)
    assert torch.equal(routed, torch.cat(forced))
