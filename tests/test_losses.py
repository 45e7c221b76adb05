"""Each loss against a value computed by hand from its formula."""
import math

import pytest
import torch

from multitask.config import LossCfg
from multitask.losses import MultiHeadLoss, cross_entropy, focal, make_loss, soft_f1

LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
TARGET = torch.tensor([0, 2])


def softmax_row(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


P = [softmax_row(r) for r in LOGITS.tolist()]  # p[0] = (e²/(e²+2), ...), p[1] = (1/(e+2), e/(e+2), 1/(e+2))


def test_cross_entropy():
    expected = -(math.log(P[0][0]) + math.log(P[1][2])) / 2
    got = make_loss(LossCfg(name="ce"))(LOGITS, torch.nn.functional.one_hot(TARGET, 3).float())
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing():
    eps = 0.1
    on, off = 1 - eps + eps / 3, eps / 3
    expected = -sum(on * math.log(P[i][t]) + sum(off * math.log(P[i][c]) for c in range(3) if c != t)
                    for i, t in enumerate([0, 2])) / 2
    got = make_loss(LossCfg(name="label_smoothing", smoothing=eps))(LOGITS, torch.nn.functional.one_hot(TARGET, 3).float())
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_focal():
    g = 2.0
    expected = -((1 - P[0][0]) ** g * math.log(P[0][0]) + (1 - P[1][2]) ** g * math.log(P[1][2])) / 2
    got = make_loss(LossCfg(name="focal", gamma=g))(LOGITS, torch.nn.functional.one_hot(TARGET, 3).float())
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # gamma 0 is plain cross-entropy
    t = torch.nn.functional.one_hot(TARGET, 3).float()
    assert focal(LOGITS, t, 0.0).item() == pytest.approx(cross_entropy(LOGITS, t).item(), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_gradients_stay_finite_on_a_row_the_model_is_sure_of(gamma):
    """A float32 softmax reaches p = 1 on a confident row, where (1 - p)^gamma with gamma < 1 has an
    infinite slope: its 0 * inf was a NaN gradient that reached every weight."""
    x = torch.tensor([[30.0, 0.0], [0.0, 0.0]], requires_grad=True)
    focal(x, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), gamma).backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[1, 0] < 0  # the unsure row still learns towards its class


def test_soft_f1():
    # class 0: tp = p00, fp = p10, fn = 1 - p00; class 1: tp 0, fp = p01 + p11, fn 0; class 2: tp = p12, fp = p02, fn = 1 - p12
    tp = [P[0][0], 0.0, P[1][2]]
    fp = [P[1][0], P[0][1] + P[1][1], P[0][2]]
    fn = [1 - P[0][0], 0.0, 1 - P[1][2]]
    f1 = [2 * a / (2 * a + b + c) for a, b, c in zip(tp, fp, fn)]
    expected = 1 - sum(f1) / 3
    got = soft_f1(LOGITS, torch.nn.functional.one_hot(TARGET, 3).float())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_weighted_sum_over_heads_and_hard_targets():
    crit = MultiHeadLoss({"a": LossCfg(name="ce", weight=2.0), "b": LossCfg(name="focal", weight=0.5)})
    outputs = {"a": LOGITS, "b": LOGITS}
    total, parts = crit(outputs, {"a": TARGET, "b": TARGET})
    ce = -(math.log(P[0][0]) + math.log(P[1][2])) / 2
    assert parts["a"].item() == pytest.approx(ce, rel=1e-6)
    assert total.item() == pytest.approx(2.0 * parts["a"].item() + 0.5 * parts["b"].item(), rel=1e-6)


def test_losses_accept_soft_targets_for_mixing():
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = -(0.5 * math.log(P[0][0]) + 0.5 * math.log(P[0][1]) + math.log(P[1][2])) / 2
    crit = MultiHeadLoss({"a": LossCfg(name="ce")})
    total, _ = crit({"a": LOGITS}, {"a": soft})
    assert total.item() == pytest.approx(expected, rel=1e-6)
