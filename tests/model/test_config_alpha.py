"""LoRA alpha: unset (or 0) means 32 x num_experts x r; a saved mixture keeps the number it saved."""

import json

import pytest

from dylora_moe.errors import ConfigError
from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from dylora_moe.model.io import CONFIG_NAME
from tests.model.helpers import tiny_llama


@pytest.mark.parametrize(("num_experts", "r", "alpha"), [(4, 16, 2048.0), (3, 8, 768.0), (1, 4, 128.0), (8, 2, 512.0)])
def test_alpha_is_derived_from_experts_and_rank(num_experts, r, alpha):
    assert DyLoRAConfig(num_experts=num_experts, r=r).alpha == alpha
    assert DyLoRAConfig(num_experts=num_experts, r=r, alpha=0).alpha == alpha  # 0 means "derive" too
    assert DyLoRAConfig(num_experts=num_experts, r=r, alpha=20).alpha == 20  # a given alpha is kept


def test_a_negative_alpha_is_refused():
    with pytest.raises(ConfigError, match="lora_alpha=-1 is invalid"):
        DyLoRAConfig(alpha=-1)


def test_the_derived_alpha_scales_each_layer_like_a_lora_of_alpha_32_times_its_rank():
    model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=2, r=4))
    assert {layer.scaling for _, layer in model.adapted_layers()} == {32 * 2 * 4 / 4}


def test_saved_mixtures_keep_their_alpha_number(tmp_path):
    derived = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=2, r=4))
    derived.save_pretrained(tmp_path / "derived")
    assert json.loads((tmp_path / "derived" / CONFIG_NAME).read_text())["alpha"] == 256.0  # a number, not null

    # a mixture saved with another alpha (e.g. 32, the default before it was derived) loads with it
    DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=2, r=4, alpha=32)).save_pretrained(tmp_path / "old")
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "old", base_model=tiny_llama())
    assert loaded.config.alpha == 32.0
    assert {layer.scaling for _, layer in loaded.adapted_layers()} == {8.0}
