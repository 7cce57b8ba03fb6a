import collections

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from dylora_moe.model.moe_lora import MoELoRALinear
from tests.model.helpers import randomize_experts, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("make_base", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_fresh_mixture_reproduces_base_exactly(make_base, input_ids):
    base = make_base()
    expected = base(input_ids).logits
    targets = "c_attn" if "GPT2" in type(base).__name__ else "q_proj,v_proj"
    model = DyLoRAMoE(base, DyLoRAConfig(num_experts=4, r=8, target_modules=targets)).eval()
    assert torch.equal(model(input_ids).logits, expected)


def test_single_expert_equals_peft_lora(input_ids):
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    ).eval()
    torch.manual_seed(5)
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
    ours = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=1, r=4, alpha=8, dropout=0.0,
                                                target_modules="q_proj,v_proj")).eval()
    with torch.no_grad():
        for name, layer in ours.adapted_layers():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
    expected = peft_model(input_ids=input_ids).logits
    assert not torch.allclose(expected, tiny_llama()(input_ids).logits, atol=1e-3)  # the update matters
    torch.testing.assert_close(ours(input_ids).logits, expected, atol=1e-5, rtol=0)


def _grad_norms(model):
    experts, routers = [], []
    for _, layer in model.adapted_layers():
        a = layer.lora_A.grad.unflatten(0, (layer.num_experts, layer.r)).flatten(1).norm(dim=1)
        b = layer.lora_B.grad.unflatten(1, (layer.num_experts, layer.r)).transpose(0, 1).flatten(1).norm(dim=1)
        experts.append(a + b)
        routers.append(layer.router.weight.grad.norm())
    return torch.stack(experts), torch.stack(routers)


def test_dense_mode_gradients_reach_every_expert_and_router(llama, input_ids):
    # a moderate scale: no saturated softmax
    model = DyLoRAMoE(llama, DyLoRAConfig(num_experts=4, r=4, alpha=32.0, dropout=0.0))
    randomize_experts(model)
    assert model.routing.dense
    model(input_ids, labels=input_ids).loss.backward()
    experts, routers = _grad_norms(model)
    assert (experts > 0).all(), experts
    assert (routers > 0).all(), routers
    assert all(p.grad is None for p in llama.parameters() if not p.requires_grad)


def test_topk_mode_gradients_reach_routers(llama, input_ids):
    model = DyLoRAMoE(llama, DyLoRAConfig(num_experts=4, r=4, alpha=32.0, top_k=2, dropout=0.0))
    randomize_experts(model)
    model.set_maturity()
    assert not model.routing.dense
    model(input_ids, labels=input_ids).loss.backward()
    _, routers = _grad_norms(model)
    assert (routers > 0).all(), routers


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_routes_each_token_to_exactly_k_experts(llama, k):
    model = DyLoRAMoE(llama, DyLoRAConfig(num_experts=4, r=4, top_k=k, routing="token", target_modules="q_proj,v_proj"))
    randomize_experts(model)
    model.set_maturity()
    layer = dict(model.adapted_layers())["model.layers.0.self_attn.q_proj"]
    gate = layer.router(torch.randn(3, 7, 64))
    assert gate.shape == (3, 7, 4)
    assert ((gate > 0).sum(-1) == k).all()
    torch.testing.assert_close(gate.sum(-1), torch.ones(3, 7))


def test_dense_gate_is_tempered_softmax(llama):
    model = DyLoRAMoE(llama, DyLoRAConfig(num_experts=3, r=4, router_temperature=2.0, routing="token",
                                          router_scale=1.0))
    randomize_experts(model)
    layer = next(iter(dict(model.adapted_layers()).values()))
    x = torch.randn(5, 64)
    expected = torch.softmax(x @ layer.router.weight.t() / 2.0, dim=-1)
    torch.testing.assert_close(layer.router(x), expected)


def test_layer_update_equals_the_per_expert_sum(llama):
    """The update equals the explicit per-expert sum (the equation), computed fused."""
    model = DyLoRAMoE(llama, DyLoRAConfig(num_experts=3, r=4, dropout=0.0))
    randomize_experts(model)
    layer = next(iter(dict(model.adapted_layers()).values()))
    x = torch.randn(2, 5, 64)
    gate = layer.router(x)
    expected = layer.base_layer(x)
    for e in range(3):
        A, B = layer.expert_weights(e)
        expected = expected + gate[..., e : e + 1] * (x @ A.t() @ B.t()) * layer.scaling
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation a forward pass runs (a Python loop over experts multiplies them)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(module, *inputs) -> collections.Counter:
    with torch.no_grad(), OpCounter() as counter:
        module(*inputs)
    return counter.ops


MATMULS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear")


@pytest.mark.parametrize("mature", [False, True], ids=["dense", "top-k"])
def test_layer_has_no_python_loop_over_experts_in_compute(mature):
    """The same operations, as many of each, for 3 and for 6 experts: two GEMMs for all experts
    together (top-k per example: batched over the examples' chosen experts), besides the frozen
    linear and the router."""
    x = torch.randn(2, 5, 64)
    counts = {}
    for experts in (3, 6):
        model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=experts, r=4, dropout=0.0, top_k=2))
        if mature:
            model.set_maturity()
        layer = next(iter(dict(model.adapted_layers()).values()))
        counts[experts] = count_ops(layer, x)
    assert counts[3] == counts[6]
    assert sum(counts[3][name] for name in MATMULS) == 4  # frozen W x, router, A x, B h


def test_one_base_pass_per_forward(input_ids):
    """The mixture runs the base's matmuls once, plus three per adapted layer (router, A, B)."""
    base_ops = count_ops(tiny_llama(), input_ids)
    model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=4, r=4, dropout=0.0, target_modules="q_proj,v_proj"))
    mixture_ops = count_ops(model, input_ids)
    adapted = len(model.adapted_names)
    assert adapted == 4  # q_proj and v_proj of two layers
    assert sum(mixture_ops[n] for n in MATMULS) == sum(base_ops[n] for n in MATMULS) + 3 * adapted


@pytest.mark.parametrize("shared_experts", [0, 1])
@pytest.mark.parametrize("top_k", [1, 2])
def test_per_example_top_k_computes_only_the_chosen_experts_and_equals_the_fused_layer(monkeypatch, top_k,
                                                                                         shared_experts):
    """Sparse per-example routing gathers each example's chosen experts: the same outputs and gradients
    as computing every expert with the others gated to 0."""
    def run(chosen_only: bool):
        torch.manual_seed(0)
        model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=4, r=4, dropout=0.0, top_k=top_k,
                                                      shared_experts=shared_experts))
        randomize_experts(model)
        model.set_maturity()
        calls = []
        original = MoELoRALinear._chosen_only
        monkeypatch.setattr(MoELoRALinear, "_chosen_only",
                            lambda self, gate: (calls.append(original(self, gate))
                                                or (chosen_only and original(self, gate))))
        ids = torch.randint(3, 128, (3, 9))
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return out.logits, grads, calls

    gathered, gathered_grads, calls = run(True)
    assert calls and all(calls)  # every adapted layer took the chosen-experts path
    fused, fused_grads, _ = run(False)
    torch.testing.assert_close(gathered, fused, atol=1e-5, rtol=1e-5)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(gathered_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
