"""Shared experts: always used with a fixed gate, beside the routed experts, in the same two GEMMs."""

import pytest
import torch

from dylora_moe.errors import ConfigError
from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from tests.model.helpers import assert_exported_experts_give_the_forced_logits, randomize_experts, tiny_gpt2, tiny_llama


def shared_mixture(base=None, **config):
    # alpha 2 x (3 + 1) x 4: randomised experts at the default scale would swamp the tiny base's logits
    config = {"num_experts": 3, "shared_experts": 1, "r": 4, "alpha": 32.0, "dropout": 0.0,
              "target_modules": "q_proj,v_proj", **config}
    model = DyLoRAMoE(base if base is not None else tiny_llama(), DyLoRAConfig(**config)).eval()
    randomize_experts(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in model.adapted_layers():
            layer.shared_B.copy_(torch.randn(layer.shared_B.shape, generator=g) * 0.1)
    return model


def manual_update(layer, x):
    """The layer's LoRA update computed expert by expert, as the docstring of MoELoRALinear defines it."""
    gate = layer.router(x)
    N = layer.num_experts + layer.shared_experts
    update = torch.zeros(*x.shape[:-1], layer.out_features)
    for s in range(layer.shared_experts):
        rows = slice(s * layer.r, (s + 1) * layer.r)
        update += (1 / N) * (x @ layer.shared_A[rows].t()) @ layer.shared_B[:, rows].t()
    for e in range(layer.num_experts):
        A, B = layer.expert_weights(e)
        update += (layer.num_experts / N) * gate[..., e : e + 1] * ((x @ A.t()) @ B.t())
    return layer.scaling * update


def test_the_fused_layer_equals_the_sum_over_shared_and_routed_experts():
    model = shared_mixture(num_experts=3, shared_experts=2, routing="token")
    layer = dict(model.adapted_layers())["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        expected = layer.base_layer(x) + manual_update(layer, x)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.shared_scales() == pytest.approx((1 / 5, 3 / 5))


def test_derived_alpha_counts_the_shared_experts_and_a_fresh_mixture_is_the_base(input_ids):
    assert DyLoRAConfig(num_experts=3, shared_experts=1, r=16).alpha == 2048.0  # 32 x (3 + 1) x 16
    base = tiny_llama()
    expected = base(input_ids).logits
    model = DyLoRAMoE(base, DyLoRAConfig(num_experts=3, shared_experts=1, r=4)).eval()
    torch.testing.assert_close(model(input_ids).logits, expected)  # shared B starts at zero too


def test_shared_experts_are_trainable_state_and_round_trip(tmp_path, input_ids):
    model = shared_mixture()
    state = model.trainable_state_dict()
    name = "model.layers.0.self_attn.q_proj"
    assert state[f"{name}.shared_A"].shape == (4, 64) and state[f"{name}.shared_B"].shape == (64, 4)
    assert state[f"{name}.lora_A"].shape == (12, 64)  # the routed experts' tensors keep their shapes
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert f"base_model.{name}.shared_A" in trainable
    model.save_pretrained(tmp_path / "saved")
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "saved", base_model=tiny_llama()).eval()
    assert loaded.config.shared_experts == 1
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)
    plain = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=3, r=4))
    with pytest.raises(ConfigError, match="unexpected"):
        plain.load_trainable_state_dict(state)


@pytest.mark.parametrize("make_base", [tiny_llama, tiny_gpt2])
def test_exported_expert_carries_the_shared_experts_and_gives_the_forced_logits(tmp_path, input_ids, make_base):
    targets = "c_attn" if make_base is tiny_gpt2 else "q_proj,v_proj"
    model = shared_mixture(base=make_base(), target_modules=targets)
    loaded = assert_exported_experts_give_the_forced_logits(model, make_base, tmp_path, input_ids, experts=3)
    assert [m.peft_config["default"].r for m in loaded] == [8] * 3  # one shared + one routed expert of rank 4


def test_growing_keeps_the_outputs_until_the_new_expert_is_admitted(input_ids):
    model = shared_mixture()
    model.set_maturity(0)
    before = model(input_ids).logits
    model.add_expert()
    torch.testing.assert_close(model(input_ids).logits, before, atol=1e-6, rtol=0)
    model.admit_expert(3, 1.0)
    layer = next(layer for _, layer in model.adapted_layers())
    assert layer.shared_scales() == pytest.approx((1 / 5, 4 / 5))
    assert not torch.allclose(model(input_ids).logits, before, atol=1e-4)


def test_a_negative_number_of_shared_experts_is_refused():
    with pytest.raises(ConfigError, match=r"shared_experts=-1 is invalid: give an integer >= 0"):
        DyLoRAConfig(shared_experts=-1)
