"""The router's information terms inside the model: what reaches the loss, and what training them does."""

import pytest
import torch

from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from tests.model.helpers import randomize_experts, tiny_llama


def two_kinds_of_prompts(n: int, seed: int):
    """n examples of dataset 0 (prompt tokens 3-63) and n of dataset 1 (tokens 64-127), with labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 64, (n, 10), generator=g), torch.randint(64, 128, (n, 10), generator=g)])
    labels = ids.clone()
    labels[:, :6] = -100  # the first 6 tokens are the prompt
    return ids, labels, torch.tensor([0] * n + [1] * n)


@pytest.mark.parametrize("routing", ["example", "token"])
def test_dataset_term_reaches_the_loss_only_with_dataset_ids(routing):
    model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=3, r=4, dropout=0.0, routing=routing,
                                                 dataset_mi_coefficient=0.5)).eval()
    randomize_experts(model)
    ids, labels, datasets = two_kinds_of_prompts(3, seed=0)
    mask = torch.ones_like(ids)
    with_ids = model(ids, attention_mask=mask, labels=labels, dataset_ids=datasets)
    assert with_ids.dataset_mi_loss < 0
    torch.testing.assert_close(with_ids.loss, with_ids.lm_loss + 0.01 * with_ids.balance_loss
                               + 0.5 * with_ids.dataset_mi_loss)
    without = model(ids, attention_mask=mask, labels=labels)
    assert without.dataset_mi_loss == 0
    torch.testing.assert_close(without.loss, with_ids.loss - 0.5 * with_ids.dataset_mi_loss)
    assert model.routing.context.dataset_ids is None  # nothing left behind for the next pass


def test_training_the_dataset_term_routes_unseen_prompts_of_each_dataset_to_an_expert_of_its_own():
    torch.manual_seed(0)
    model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=2, r=2, dropout=0.0, routing="example",
                                                 balance_coefficient=0.0, dataset_mi_coefficient=1.0))
    routers = [layer.router.weight for _, layer in model.adapted_layers()]
    optimizer = torch.optim.Adam(routers, lr=1e-3)
    for step in range(40):
        ids, labels, datasets = two_kinds_of_prompts(4, seed=step)
        out = model(ids, attention_mask=torch.ones_like(ids), labels=labels, dataset_ids=datasets)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    ids, labels, datasets = two_kinds_of_prompts(8, seed=1000)  # held out, and no ids given
    captured = []
    hooks = [layer.router.register_forward_hook(lambda _m, _i, gate: captured.append(gate[:, 0]))
             for _, layer in model.adapted_layers()]
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids), labels=labels)
    for h in hooks:
        h.remove()
    for gate in captured:  # every layer: dataset 0 mostly on one expert, dataset 1 on the other
        top1 = gate.argmax(-1)
        first, second = top1[:8].mode().values, top1[8:].mode().values
        assert first != second
        assert (top1[:8] == first).sum() + (top1[8:] == second).sum() >= 14  # of 16 unseen examples


def gates_of(model, ids, labels):
    captured = []
    hooks = [layer.router.register_forward_hook(lambda _m, _i, gate: captured.append(gate))
             for _, layer in model.adapted_layers()]
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids), labels=labels)
    for h in hooks:
        h.remove()
    return captured, out


def test_gate_floor_gives_every_expert_a_share_and_keeps_the_routers_choice():
    ids, labels, datasets = two_kinds_of_prompts(3, seed=0)
    one_layer = dict(num_experts=4, r=2, dropout=0.0, target_modules="layers.0.self_attn.q_proj")  # same input
    plain = DyLoRAMoE(tiny_llama(), DyLoRAConfig(**one_layer))
    randomize_experts(plain)
    floored = DyLoRAMoE(tiny_llama(), DyLoRAConfig(**one_layer, gate_floor=0.4))
    floored.load_trainable_state_dict(plain.trainable_state_dict())
    (without, out_plain), (with_floor, out_floored) = gates_of(plain, ids, labels), gates_of(floored, ids, labels)
    assert len(without) == len(with_floor) == 1
    for g, f in zip(without, with_floor):
        torch.testing.assert_close(f, 0.4 * 0.25 + 0.6 * g)
        assert torch.equal(f.argmax(-1), g.argmax(-1)) and bool((f >= 0.1 - 1e-6).all())
    # the auxiliary losses read the router's own gate, not the floored one
    torch.testing.assert_close(out_floored.balance_loss, out_plain.balance_loss)


def test_gate_floor_outside_zero_to_one_is_refused():
    from dylora_moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"gate_floor=1.0 is invalid: give a share in \[0, 1\)"):
        DyLoRAConfig(gate_floor=1.0)
