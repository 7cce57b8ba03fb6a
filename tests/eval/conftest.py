import pytest

from dylora_moe.eval.sandbox import Sandbox, SandboxLimits

# Small limits keep the attack tests quick and bounded on a shared machine.
ATTACK_LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=256, max_processes=16)


@pytest.fixture(scope="module")
def bwrap_sandbox():
    """The full sandbox (CI installs bubblewrap in .ci/run); one worker, so each program runs after
    the previous one in the same warm worker."""
    with Sandbox(ATTACK_LIMITS, workers=1, isolation="bwrap") as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def pool():
    with Sandbox(workers=2, isolation="bwrap") as sandbox:
        yield sandbox


@pytest.fixture(scope="session")
def mixture_dir(tmp_path_factory):
    """A saved mixture on the shipped base (a run's final/ in miniature): experts with non-zero B
    so that its completions differ from the base model's."""
    import torch

    from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
    from dylora_moe.model.base import load_tokenizer

    torch.manual_seed(0)
    model = DyLoRAMoE("tiny-python-lm", DyLoRAConfig(num_experts=2, r=4))
    with torch.no_grad():
        for _, layer in model.adapted_layers():
            layer.lora_B.normal_(std=0.05)
    path = tmp_path_factory.mktemp("run") / "final"
    model.save_pretrained(path)
    load_tokenizer("tiny-python-lm").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny():
    import torch

    from dylora_moe.model.base import load_base_model, load_tokenizer

    torch.set_num_threads(1)  # a 4M-parameter model generates fastest on one thread of a busy machine
    return load_base_model("tiny-python-lm").eval(), load_tokenizer("tiny-python-lm")
