import pytest
import torch

from tests.model.helpers import randomize_experts, tiny_gpt2, tiny_llama
from tests.train.conftest import small_model_dir  # noqa: F401 - the small Llama with the shipped tokenizer

BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture
def input_ids():
    torch.manual_seed(123)
    return torch.randint(3, 128, (2, 12))


def mixture(base: str, **config):
    """A random mixture (non-zero B, random routers) on a tiny ``base`` ("llama" or "gpt2")."""
    from dylora_moe.model import DyLoRAConfig, DyLoRAMoE

    settings = dict(num_experts=3, r=2, dropout=0.0, routing="example")
    settings.update(config)
    model = DyLoRAMoE(BASES[base](), DyLoRAConfig(**settings)).eval()
    randomize_experts(model)
    return model
