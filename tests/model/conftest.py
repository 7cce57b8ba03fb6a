import pytest
import torch

from tests.model.helpers import tiny_gpt2, tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def input_ids():
    torch.manual_seed(123)
    return torch.randint(3, 128, (2, 12))
