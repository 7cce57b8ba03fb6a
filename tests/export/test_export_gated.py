"""The mixture under a fixed per-layer gate is one ordinary LoRA: the exported PEFT adapter and the merged
model give the mixture's logits with that gate forced, to 1e-5, on Llama (Linear) and GPT-2 (Conv1D) bases."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dylora_moe.errors import ConfigError
from dylora_moe.model.export import GATES_NAME, check_mergeable, merge_adapter
from dylora_moe.model.gates import uniform_gates
from tests.export.conftest import BASES, mixture
from tests.model.helpers import assert_exported_experts_give_the_forced_logits


def random_gates(model, seed=0, unused=(1,)):
    """A different gate per layer, with the experts in ``unused`` at 0 everywhere (as top-k leaves them)."""
    g = torch.Generator().manual_seed(seed)
    gates = torch.softmax(torch.randn(len(model.adapted_names), model.num_experts, generator=g), -1)
    gates[:, list(unused)] = 0
    return gates / gates.sum(-1, keepdim=True)


def forced_logits(model, gates, input_ids):
    model.force_gates(gates)
    try:
        with torch.no_grad():
            return model(input_ids).logits
    finally:
        model.force_gates(None)


def peft_logits(base, directory, input_ids):
    with torch.no_grad():
        return PeftModel.from_pretrained(BASES[base](), str(directory)).eval()(input_ids=input_ids).logits


@pytest.mark.parametrize("base", ["llama", "gpt2"])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("mature", [False, True])
def test_gated_adapter_equals_the_mixture_with_the_gate_forced(base, shared, mature, input_ids, tmp_path):
    model = mixture(base, shared_experts=shared)
    if mature:  # top-1 routing: forced dense gates still use every expert, on one-token inputs too
        model.set_maturity()
    gates = random_gates(model)
    model.export_gated(gates, tmp_path / "a", description="test")
    for ids in (input_ids, input_ids[:, :1]):
        torch.testing.assert_close(peft_logits(base, tmp_path / "a", ids), forced_logits(model, gates, ids),
                                   atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == (shared + 2) * 2  # expert 1 (gate 0 in every layer) left out
    assert config["lora_alpha"] / config["r"] == model.config.alpha / model.config.r
    record = json.loads((tmp_path / "a" / GATES_NAME).read_text())
    assert record["experts_kept"] == [0, 2] and record["gate"] == "test"
    assert torch.tensor(list(record["gates"].values())).equal(gates)


def test_the_adapter_changes_with_the_gate_and_unused_experts_can_be_kept(input_ids, tmp_path):
    model = mixture("llama")
    gates = random_gates(model)
    model.export_gated(gates, tmp_path / "full", drop_unused=False)
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["r"] == 6
    torch.testing.assert_close(peft_logits("llama", tmp_path / "full", input_ids),
                               forced_logits(model, gates, input_ids), atol=1e-5, rtol=1e-5)
    model.export_gated(uniform_gates(model), tmp_path / "uniform")
    uniform = peft_logits("llama", tmp_path / "uniform", input_ids)
    torch.testing.assert_close(uniform, forced_logits(model, uniform_gates(model), input_ids), atol=1e-5, rtol=1e-5)
    assert (uniform - forced_logits(model, gates, input_ids)).abs().max() > 1e-3  # the gate matters


def test_export_expert_is_the_one_hot_gate_and_keeps_its_behaviour(input_ids, tmp_path):
    model = mixture("gpt2", shared_experts=1)
    assert_exported_experts_give_the_forced_logits(model, BASES["gpt2"], tmp_path, input_ids, experts=3)
    config = json.loads((tmp_path / "expert0" / "adapter_config.json").read_text())
    assert config["r"] == 2 * 2 and config["fan_in_fan_out"] is True
    # GPT-2's c_proj is in the attention too: the MLP's are named in full; Llama's leaf names suffice
    assert set(config["target_modules"]) == set(model.adapted_names)
    llama = mixture("llama")
    llama.export_expert(0, tmp_path / "llama")
    targets = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == ["down_proj", "gate_proj", "up_proj"]
    keys = set(load_file(str(tmp_path / "llama" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in keys


def test_wrong_gates_are_refused(tmp_path):
    model = mixture("llama")
    with pytest.raises(ConfigError, match=r"gates of shape \(6, 2\) do not fit this mixture: "
                                          r"it needs \(6 adapted layers, 3 experts\)"):
        model.export_gated(torch.ones(6, 2), tmp_path / "a")
    with pytest.raises(ConfigError, match="do not fit this mixture"):
        model.force_gates(torch.ones(2, 3))
    with pytest.raises(ConfigError, match="every expert's gate is 0"):
        model.export_gated(torch.zeros(6, 3), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


FRESH_PROCESS = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_dir, adapter_dir, ids_path, out_path = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_path)).logits, out_path)
"""


@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_a_fresh_process_with_stock_peft_gives_the_forced_logits(base, input_ids, tmp_path):
    """Nothing of dylora_moe is imported where the adapter is loaded: stock transformers + PEFT only."""
    model = mixture(base, shared_experts=1)
    gates = random_gates(model, seed=3, unused=())
    model.export_gated(gates, tmp_path / "adapter")
    BASES[base]().save_pretrained(tmp_path / "base")
    torch.save(input_ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "base"), str(tmp_path / "adapter"),
                           str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "dylora" not in proc.stderr
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), forced_logits(model, gates, input_ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_the_merged_model_gives_the_forced_logits(base, input_ids, tmp_path):
    model = mixture(base, shared_experts=1)
    gates = random_gates(model, seed=5)
    expected = forced_logits(model, gates, input_ids)
    model.export_gated(gates, tmp_path / "adapter")
    merge_adapter(model, tmp_path / "adapter").save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def prompt_gates(model, prompt_ids):
    """Each layer's gate for one prompt, as the mixture's own per-example routing computes it."""
    captured = []
    hooks = [layer.router.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()[0, 0]))
             for _, layer in model.adapted_layers()]
    with torch.no_grad():
        model(prompt_ids)
    for h in hooks:
        h.remove()
    return torch.stack(captured)


@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_a_prompt_routed_to_g_gets_the_same_greedy_completion_from_mixture_adapter_and_merged_model(base, tmp_path):
    """Per-example routing: for a prompt whose router gate is G, the adapter of G and the model merged with G
    ARE the mixture (its own routing, nothing forced), token for token."""
    model = mixture(base)
    torch.manual_seed(7)
    prompt = torch.randint(3, 128, (1, 10))
    gates = prompt_gates(model, prompt)
    assert (gates > 0.05).sum() > len(gates)  # a real mixture of experts in every layer, not one expert
    model.export_gated(gates, tmp_path / "adapter")
    greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        own = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **greedy)
        adapter = PeftModel.from_pretrained(BASES[base](), str(tmp_path / "adapter")).eval()
        from_adapter = adapter.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **greedy)
        merged = merge_adapter(model, tmp_path / "adapter")
        from_merged = merged.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **greedy)
    assert own.shape[1] == 22
    assert own.tolist() == from_adapter.tolist() == from_merged.tolist()


def test_merge_refuses_token_routing_and_a_quantized_base():
    with pytest.raises(ConfigError, match="cannot merge a mixture with token routing"):
        check_mergeable(mixture("llama", routing="token"))
    model = mixture("llama")
    model.base_model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ConfigError, match=r"cannot merge into a quantized base model \(bitsandbytes weights\)"):
        check_mergeable(model)
