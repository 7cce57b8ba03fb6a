"""Small random models and helpers shared by the model tests."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, loss_type="ForCausalLM")
    return GPT2LMHeadModel(config).eval()



def randomize_experts(model, seed: int = 1, scale: float = 0.1):
    """Give every expert a non-zero B (a fresh mixture is exactly the base) and a random router."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapted_layers():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
            # logits = router_scale * W x: divided by the scale, the logits are the same for any scale
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) / model.config.router_scale)


def assert_exported_experts_give_the_forced_logits(model, make_base, directory, input_ids, experts: int):
    """Export every expert as a PEFT adapter; each, loaded on a fresh base, gives the logits of the mixture
    with every token forced to that expert. Returns the loaded PEFT models."""
    from peft import PeftModel

    loaded = []
    for expert in range(experts):
        model.export_expert(expert, directory / f"expert{expert}")
        peft_model = PeftModel.from_pretrained(make_base(), str(directory / f"expert{expert}")).eval()
        model.force_expert(expert)
        expected = model(input_ids).logits
        torch.testing.assert_close(peft_model(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        loaded.append(peft_model)
    model.force_expert(None)
    return loaded
