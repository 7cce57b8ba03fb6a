import math

import torch

from dylora_moe.model.router import balance_loss, dataset_mutual_information_loss, mutual_information_loss, top_k_mask


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


def test_mutual_information_loss_spans_zero_to_minus_log_e():
    same = torch.softmax(torch.randn(1, 4), -1).repeat(32, 1)  # every unit routed alike: no information
    assert abs(mutual_information_loss(same).item()) < 1e-6
    sure_and_spread = torch.eye(4).repeat(8, 1)  # each unit sure of one expert, experts used equally
    assert abs(mutual_information_loss(sure_and_spread).item() + math.log(4)) < 1e-5
    collapsed = torch.zeros(32, 4)
    collapsed[:, 2] = 1.0  # sure, but all on one expert: again no information
    assert abs(mutual_information_loss(collapsed).item()) < 1e-6


def test_minimising_mutual_information_loss_sharpens_gates_and_keeps_experts_used():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    weight = (torch.randn(4, 16) * 0.01).requires_grad_()
    optimizer = torch.optim.SGD([weight], lr=1.0)
    for _ in range(200):
        loss = mutual_information_loss(torch.softmax(x @ weight.t(), -1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probs = torch.softmax(x @ weight.t(), -1).detach()
    assert loss.item() < -0.8 * math.log(4)  # close to the -log 4 optimum, from about 0
    assert probs.max(-1).values.mean() > 0.8  # gates confident...
    assert probs.argmax(-1).bincount(minlength=4).min() >= 4  # ...and every expert still chosen


def test_dataset_mutual_information_loss_rewards_one_expert_per_dataset():
    datasets = torch.arange(4).repeat(3)
    one_each = torch.eye(4)[datasets]  # dataset d always routed to expert d
    assert abs(dataset_mutual_information_loss(one_each, datasets).item() + math.log(4)) < 1e-5
    # the same confident gates, but unrelated to the dataset: no information about it
    shuffled = torch.eye(4)[torch.arange(12) % 3]
    assert dataset_mutual_information_loss(shuffled, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])) > -1e-6
    # one dataset in the batch: nothing to tell apart, whatever the gates
    assert abs(dataset_mutual_information_loss(one_each, torch.zeros(12, dtype=torch.long)).item()) < 1e-6
    # dataset ids need not be contiguous
    torch.testing.assert_close(dataset_mutual_information_loss(one_each, datasets * 10 + 5),
                               dataset_mutual_information_loss(one_each, datasets))
