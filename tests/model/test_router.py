import torch

from dylora_moe.model.router import balance_loss, top_k_mask


def test_balance_loss_is_one_for_uniform_routing():
    probs = torch.full((64, 4), 0.25)
    for k in (1, 2):
        assert balance_loss(probs, top_k_mask(probs, k)).item() == 1.0


def test_balance_loss_grows_as_routing_collapses():
    values = []
    for sharpness in (0.0, 1.0, 3.0, 10.0):
        logits = torch.zeros(64, 4)
        logits[:, 0] = sharpness
        probs = torch.softmax(logits, -1)
        values.append(balance_loss(probs, top_k_mask(probs, 1)).item())
    assert values[0] == 1.0
    assert values == sorted(values) and values[-1] > 3.9  # collapse onto one expert approaches E=4


def test_balanced_but_confident_routing_scores_one():
    probs = torch.eye(4).repeat(16, 1)  # each token sure, experts used equally
    assert abs(balance_loss(probs, top_k_mask(probs, 1)).item() - 1.0) < 1e-6
