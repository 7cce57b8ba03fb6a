import pytest
import torch

from dylora_moe.errors import ConfigError
from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from tests.model.helpers import assert_exported_experts_give_the_forced_logits, randomize_experts, tiny_gpt2, tiny_llama


def trained_mixture(base=None, **config):
    # alpha 2 x 3 x 4: randomised experts at the default scale (32 x ...) would swamp the tiny base's logits
    config = {"num_experts": 3, "r": 4, "alpha": 24.0, "dropout": 0.0, "target_modules": "q_proj,v_proj", **config}
    model = DyLoRAMoE(base if base is not None else tiny_llama(), DyLoRAConfig(**config)).eval()
    randomize_experts(model)
    return model


def test_forward_returns_loss_and_its_parts(input_ids):
    model = trained_mixture(balance_coefficient=0.5, z_loss_coefficient=0.1, router_mi_coefficient=0.3)
    out = model(input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
    expected = out.lm_loss + 0.5 * out.balance_loss + 0.1 * out.z_loss + 0.3 * out.mi_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.balance_loss >= 1.0 - 1e-6 and out.z_loss > 0
    assert -torch.log(torch.tensor(3.0)) - 1e-6 <= out.mi_loss < 0  # minus an information, at most log E
    stats = out.router_stats
    torch.testing.assert_close(stats.expert_usage.sum(), torch.tensor(1.0))
    assert 0 < stats.entropy <= torch.log(torch.tensor(3.0)) + 1e-6
    assert 1 / 3 - 1e-6 <= stats.max_prob <= 1


def test_padding_does_not_count_in_router_statistics(input_ids):
    model = trained_mixture()
    mask = torch.ones_like(input_ids)
    mask[:, 6:] = 0
    padded = model(input_ids, attention_mask=mask, labels=input_ids).router_stats
    garbage = input_ids.clone()
    garbage[:, 6:] = 7  # what sits under the mask must not change the statistics
    other = model(garbage, attention_mask=mask, labels=input_ids).router_stats
    torch.testing.assert_close(padded.balance_loss, other.balance_loss)
    torch.testing.assert_close(padded.expert_usage, other.expert_usage)


@pytest.mark.parametrize("gate_floor", [0.0, 0.5])
def test_add_expert_leaves_outputs_and_existing_experts_unchanged(input_ids, gate_floor):
    model = trained_mixture(gate_floor=gate_floor)  # the floor is shared by the admitted experts only
    model.set_maturity(0)
    before_logits = model(input_ids).logits
    before_state = model.trainable_state_dict()
    index = model.add_expert()
    assert index == 3 and model.num_experts == 4 and model.config.num_experts == 4
    assert model.routing.mature.tolist() == [True, False, False, False]
    torch.testing.assert_close(model(input_ids).logits, before_logits, atol=1e-6, rtol=0)
    model.admit_expert(3, 1.0)  # phased in: the router now shares probability with it
    assert not torch.allclose(model(input_ids).logits, before_logits, atol=1e-4)
    after = model.trainable_state_dict()
    for name, layer in model.adapted_layers():
        assert torch.equal(after[f"{name}.lora_A"][: 3 * 4], before_state[f"{name}.lora_A"])
        assert torch.equal(after[f"{name}.lora_B"][:, : 3 * 4], before_state[f"{name}.lora_B"])
        assert torch.equal(after[f"{name}.lora_B"][:, 3 * 4 :], torch.zeros(64 if "q_proj" in name else 32, 4))


def test_trainable_state_holds_no_base_parameter_and_round_trips(input_ids):
    model = trained_mixture()
    model.set_maturity(1)
    state = model.trainable_state_dict()
    base_tensors = {p.data_ptr() for p in model.base_model.parameters() if not p.requires_grad}
    assert all(t.data_ptr() not in base_tensors for t in state.values())
    assert set(state) == ({f"{n}.{k}" for n, _ in model.adapted_layers() for k in ("lora_A", "lora_B", "router.weight")}
                          | {"routing.mature", "routing.admission"})
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    assert sum(t.numel() for k, t in state.items() if not k.startswith("routing.")) == n_trainable

    fresh = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=3, r=4, alpha=24.0, dropout=0.0,
                                                 target_modules="q_proj,v_proj")).eval()
    fresh.load_trainable_state_dict(state)
    assert fresh.routing.mature.tolist() == [False, True, False]
    assert all(torch.equal(a, b) for a, b in zip(fresh.trainable_state_dict().values(), state.values()))
    assert torch.equal(fresh(input_ids).logits, model(input_ids).logits)


def test_only_experts_and_routers_require_grad():
    model = trained_mixture()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in names)


def test_tied_embeddings_stay_tied_and_uncopied():
    base = tiny_llama(tie_word_embeddings=True)
    model = DyLoRAMoE(base, DyLoRAConfig(num_experts=2, r=4))
    assert model.base_model.lm_head.weight is model.base_model.model.embed_tokens.weight
    assert not model.base_model.lm_head.weight.requires_grad


def test_save_pretrained_round_trip(tmp_path, input_ids):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = trained_mixture(base=base, top_k=2)
    model.set_maturity()
    model.save_pretrained(tmp_path / "mix")
    assert sorted(p.name for p in (tmp_path / "mix").iterdir()) == ["dylora_config.json", "dylora_model.safetensors"]
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "mix")
    loaded = DyLoRAMoE.from_pretrained(tmp_path / "mix").eval()
    assert loaded.config.top_k == 2 and loaded.routing.mature.all()
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


@pytest.mark.parametrize("make_base", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_exported_expert_is_a_peft_adapter_with_the_same_logits(tmp_path, input_ids, make_base):
    targets = "c_attn" if make_base is tiny_gpt2 else "q_proj,v_proj"
    model = trained_mixture(base=make_base(), target_modules=targets)
    assert_exported_experts_give_the_forced_logits(model, make_base, tmp_path, input_ids, experts=3)
    assert (tmp_path / "expert0" / "adapter_config.json").is_file()


@pytest.mark.parametrize("mature", [False, True])
def test_greedy_generation_with_cache_equals_without(mature):
    """Twelve new tokens whatever the model predicts (EOS suppressed), and with the KV cache they
    are the tokens a full forward pass over the whole sequence picks at every position."""
    model = trained_mixture(top_k=2)
    if mature:
        model.set_maturity()
    prompt = torch.tensor([[1, 17, 42, 99, 5]])
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=2)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (1, 17)
    assert torch.equal(with_cache, without)
    reference = prompt
    with torch.no_grad():
        for _ in range(12):
            prompt_mask = (torch.arange(reference.shape[1]) < prompt.shape[1]).expand_as(reference)
            logits = model(reference, prompt_mask=prompt_mask).logits[:, -1]  # per-example routing: the prompt
            logits[:, 2] = float("-inf")  # what min_new_tokens does to EOS
            reference = torch.cat([reference, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(with_cache, reference)
    assert len(set(with_cache[0, 5:].tolist())) > 1  # a real continuation, not one repeated token


def test_loads_the_shipped_base_by_name_as_the_readme_shows():
    """README: ``DyLoRAMoE("tiny-python-lm", DyLoRAConfig(...))``; a fresh mixture is the base."""
    from transformers import AutoModelForCausalLM

    from dylora_moe.model.base import resolve_model_path

    model = DyLoRAMoE("tiny-python-lm", DyLoRAConfig(num_experts=4, r=16, target_modules="mlp")).eval()
    assert model.config.base_model_name_or_path == "tiny-python-lm"
    assert model.num_experts == 4 and len(model.adapted_names) == 12  # 4 layers x gate/up/down_proj
    assert all(name.endswith(("gate_proj", "up_proj", "down_proj")) for name in model.adapted_names)
    input_ids = torch.tensor([[1, 200, 300, 400, 500]])
    out = model(input_ids, labels=input_ids)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-python-lm")).eval()
    with torch.no_grad():
        torch.testing.assert_close(out.logits, base(input_ids).logits)
    assert out.loss.item() > 0 and out.router_stats is not None


def test_a_base_that_already_carries_experts_is_refused():
    base = tiny_llama()
    DyLoRAMoE(base, DyLoRAConfig(num_experts=2, r=4))
    with pytest.raises(ConfigError, match="this base model already carries DyLoRA-MoE experts; load a fresh copy"):
        DyLoRAMoE(base, DyLoRAConfig(num_experts=2, r=4))


@pytest.mark.parametrize("where", ["hub", "directory"])
def test_a_base_that_cannot_be_loaded_is_named(tmp_path, where):
    """A hub id that is neither reachable (tests run offline) nor cached, or a directory without a model."""
    if where == "hub":
        name = "nobody-dylora-test/no-such-model"
    else:
        (tmp_path / "empty-model").mkdir()
        name = str(tmp_path / "empty-model")
    with pytest.raises(ConfigError) as error:
        DyLoRAMoE(name, DyLoRAConfig())
    message = str(error.value)
    assert f"cannot load base model {name!r}" in message and "'tiny-python-lm' for the shipped model" in message


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(num_experts=0), "num_experts=0 is invalid"),
        (dict(r=0), "lora_r=0 is invalid"),
        (dict(num_experts=2, top_k=3), "top_k=3 is invalid with num_experts=2: choose an integer from 1 to 2"),
        (dict(router_temperature=0.0), "router_temperature=0.0"),
        (dict(dropout=1.0), "lora_dropout=1.0"),
    ],
)
def test_bad_configuration_is_a_clear_error(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        DyLoRAConfig(**config)


def test_unknown_target_module_lists_known_names():
    with pytest.raises(ConfigError) as err:
        DyLoRAMoE(tiny_llama(), DyLoRAConfig(target_modules="q_proj,qkv"))
    assert "'qkv' not found" in str(err.value) and "v_proj" in str(err.value) and "all-linear" in str(err.value)


def test_all_linear_adapts_every_linear_but_the_output_layer():
    model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=2, r=2, target_modules="all-linear"))
    leaves = {n.rsplit(".", 1)[-1] for n in model.adapted_names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(model.adapted_names) == 14


def test_export_rejects_out_of_range_expert(tmp_path):
    with pytest.raises(ConfigError, match="expert index 5 is out of range: the mixture has 3 experts"):
        trained_mixture().export_expert(5, tmp_path)


def test_mlp_adapts_the_feed_forward_projections_of_llama_and_gpt2():
    llama = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=2, r=2, target_modules="mlp"))
    assert llama.adapted_names == [f"model.layers.{i}.mlp.{p}" for i in range(2)
                                   for p in ("gate_proj", "up_proj", "down_proj")]
    gpt2 = DyLoRAMoE(tiny_gpt2(), DyLoRAConfig(num_experts=2, r=2, target_modules="mlp"))
    assert gpt2.adapted_names == [f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")]
    assert DyLoRAConfig(target_modules="mlp").to_dict()["target_modules"] == "mlp"


def test_mlp_on_a_model_without_feed_forward_modules_is_a_clear_error():
    import torch.nn as nn

    class NoMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_llama().config
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match=r"target_modules 'mlp' found no linear layer inside a module named mlp"):
        DyLoRAMoE(NoMLP(), DyLoRAConfig(num_experts=2, r=2, target_modules="mlp"))
