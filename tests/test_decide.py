"""Decision tuning for macro F1: offsets, the auxiliary blend, and the fold-honest estimate."""
import numpy as np

import multitask.decide as decide_mod
from conftest import tiny_config
from multitask.decide import (Decision, decide_classes, final_probs, fit_decision, fit_offsets, honest_scores,
                              offset_design, take)
from multitask.labels import Factor, Task
from multitask.metrics import macro_f1

TASK = Task("t", (Factor("kind", ("a", "b")), Factor.binned("num", [10, 20])))  # 6 classes


def biased_case(n=600, seed=0):
    """The rare class 2 of factor num is always under-predicted: the true class gets a bonus, but
    class 2 starts far behind, so argmax almost never says 2."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    num = rng.choice(3, n, p=[0.5, 0.4, 0.1])
    factors = np.stack([kind, num], 1)
    logits_kind = rng.normal(0, 1, (n, 2)) + 3 * np.eye(2)[kind]
    logits_num = rng.normal(0, 1, (n, 3)) + 1.5 * np.eye(3)[num] + np.array([0.0, 0.0, -2.5])
    soft = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    return {"kind": soft(logits_kind), "num": soft(logits_num)}, factors


def test_offsets_raise_oof_macro_f1_on_an_under_predicted_class():
    probs, factors = biased_case()
    heads = TASK.heads("kind,num")
    combined = TASK.combine(heads, probs)
    y = TASK.encode(factors)
    before = macro_f1(y, combined.argmax(1), 6)
    for mode in ("factor", "class"):
        offsets = fit_offsets(TASK, combined, y, mode)
        after = macro_f1(y, decide_classes(combined, offsets), 6)
        assert after > before + 0.05, (mode, before, after)
    # the factor design adds each factor class's offset to exactly the final classes that have it
    design = offset_design(TASK, "factor")
    assert design.shape == (5, 6) and (design.sum(0) == 2).all()


def test_no_offsets_is_argmax():
    probs, _ = biased_case(50)
    combined = TASK.combine(TASK.heads("kind,num"), probs)
    assert (decide_classes(combined, None) == combined.argmax(1)).all()
    assert (decide_classes(combined, np.zeros(6)) == combined.argmax(1)).all()


def test_the_honest_estimate_fits_on_other_folds_only(monkeypatch):
    probs, factors = biased_case(300)
    probs["row"] = np.arange(300)[:, None].astype(float)  # rides along every slice, to see which rows were fitted
    folds = np.arange(300) % 3
    fitted_on = []
    real_fit = decide_mod.fit_decision

    def spy(task, heads, p, f, v, cfg, pictures=None):
        fitted_on.append(set(p["row"][:, 0].astype(int)))
        return real_fit(task, heads, p, f, v, cfg, pictures)

    monkeypatch.setattr(decide_mod, "fit_decision", spy)
    cfg = tiny_config(None, "decide.offsets=factor", "numeric={}")  # no auxiliary head to blend
    honest = honest_scores(TASK, TASK.heads("kind,num"), probs, factors, {}, folds, cfg)
    assert len(fitted_on) == 3
    for k, rows in enumerate(fitted_on):
        assert rows == set(np.flatnonzero(folds != k))
    # and each fold is classed by the decision fitted without it, and by no other
    heads = TASK.heads("kind,num")
    classes = np.zeros(300, np.int64)
    for k in range(3):
        fit, held = folds != k, folds == k
        d = real_fit(TASK, heads, take(probs, fit), factors[fit], {}, cfg)
        classes[held] = decide_classes(TASK.combine(heads, take(probs, held)), d.offsets)
    assert honest["f1"] == macro_f1(TASK.encode(factors), classes, 6)
    # probabilities that depend on the held-out fold (an ensemble's weights refitted without it)
    # are used for that fold, both to fit and to score
    fitted_on.clear()

    def shifted(k):  # fold 1's probabilities made without it read every kind the other way round
        return {**probs, "row": probs["row"] + 1000 * (k + 1), "kind": probs["kind"][:, ::-1] if k == 1 else probs["kind"]}

    moved = honest_scores(TASK, heads, probs, factors, {}, folds, cfg, probs_without=shifted)
    assert [min(rows) // 1000 for rows in fitted_on] == [1, 2, 3]
    for k in range(3):
        fit, held = folds != k, folds == k
        d = real_fit(TASK, heads, take(shifted(k), fit), factors[fit], {}, cfg)
        classes[held] = decide_classes(TASK.combine(heads, take(shifted(k), held)), d.offsets)
    assert moved["f1"] == macro_f1(TASK.encode(factors), classes, 6) < honest["f1"]


def test_oof_of_one_fold_has_no_fold_honest_figure(tmp_path):
    # refitted without its only fold, the decision would be fitted on no row and score the plain
    # argmax under the name of a decision that submit never applies
    from multitask.decide import decide_round, honest_f1

    probs, factors = biased_case(120)
    cfg = tiny_config(None, "decide.offsets=factor", "numeric={}")
    heads = TASK.heads("kind,num")
    assert honest_scores(TASK, heads, probs, factors, {}, np.zeros(120, np.int64), cfg) is None
    report = decide_round(tmp_path, TASK, heads, probs, factors, {}, np.zeros(120, np.int64), cfg)
    assert report["honest"] is None and report["in_sample"]["f1"] > report["argmax"]["f1"]
    assert honest_f1({"decision": report}) is None


def exceedance(num: np.ndarray) -> np.ndarray:
    """Ordinal outputs P(num >= 10), P(num >= 20) that say bin `num` with confidence."""
    return np.stack([(num >= 1), (num >= 2)], 1).astype(float) * 0.9 + 0.05


def test_blending_an_auxiliary_output_keeps_a_distribution_and_touches_only_its_factor():
    probs, factors = biased_case(400, seed=1)
    heads = TASK.heads("kind,num")
    p = probs | {"aux_num": exceedance(factors[:, 1])}
    blended = final_probs(TASK, heads, p, {"num": "ordinal"}, Decision({"num": 0.5}))
    np.testing.assert_allclose(blended.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(TASK.marginal(blended, 0), probs["kind"], rtol=1e-6)
    q = TASK.marginal(blended, 1)
    np.testing.assert_allclose(q, 0.5 * probs["num"] + 0.5 * TASK.marginal(
        final_probs(TASK, heads, p, {"num": "ordinal"}, Decision({"num": 1.0})), 1), rtol=1e-6)
    assert (final_probs(TASK, heads, p, {"num": "ordinal"}, Decision({"num": 0.0})) == TASK.combine(heads, probs)).all()


def test_a_class_a_head_rules_out_can_still_be_raised_by_the_reading():
    """A head sure beyond 1e-12 that num is not bin 0 left the rescale nothing to scale: the blend's
    share of bin 0 was lost (rows summing to 0.64) and the regression's reading could not pick it. The
    ruled-out class takes its share at the other factors' odds, in numpy as in the exported graph."""
    import torch

    from multitask.export import factor_marginal, with_marginal

    heads = TASK.heads("kind,num")
    combined = TASK.combine(heads, {"kind": np.array([[0.8, 0.2], [0.5, 0.5]]),
                                    "num": np.array([[1e-13, 0.3, 0.7], [0.2, 0.3, 0.5]])})
    q = np.array([[0.4, 0.25, 0.35], [0.1, 0.1, 0.8]])
    moved = TASK.with_marginal(combined, 1, q)
    np.testing.assert_allclose(moved.sum(1), 1, rtol=1e-9)
    np.testing.assert_allclose(TASK.marginal(moved, 1), q, rtol=1e-9)
    np.testing.assert_allclose(TASK.marginal(moved, 0), [[0.8, 0.2], [0.5, 0.5]], rtol=1e-9)  # the kind's odds kept
    assert TASK.marginal(moved, 1)[0].argmax() == 0
    assert TASK.with_marginal(np.zeros((0, 6)), 1, np.zeros((0, 3))).shape == (0, 6)  # a fold with no rows
    codes = torch.as_tensor(TASK.decode(np.arange(TASK.n_classes))[:, 1])
    t = torch.as_tensor(combined, dtype=torch.float32)
    got = with_marginal(t, TASK.sizes, 1, factor_marginal(t, TASK.sizes, 1), torch.as_tensor(q, dtype=torch.float32), codes)
    np.testing.assert_allclose(got.numpy(), moved, atol=1e-6)


def test_fit_decision_weighs_an_informative_auxiliary_output_and_not_a_misleading_one(monkeypatch):
    probs, factors = biased_case(400, seed=2)
    heads = TASK.heads("kind,num")
    monkeypatch.setattr(decide_mod, "aux_kinds", lambda task, cfg: {"num": "ordinal"})
    cfg = tiny_config(None, "decide.offsets=none")
    y = TASK.encode(factors)
    informative = probs | {"aux_num": exceedance(factors[:, 1])}
    d = fit_decision(TASK, heads, informative, factors, {}, cfg)
    assert d.blend["num"] > 0 and d.offsets is None
    assert macro_f1(y, final_probs(TASK, heads, informative, {"num": "ordinal"}, d).argmax(1), 6) > \
        macro_f1(y, TASK.combine(heads, probs).argmax(1), 6) + 0.05
    misleading = probs | {"aux_num": exceedance((factors[:, 1] + 1) % 3)}
    assert fit_decision(TASK, heads, misleading, factors, {}, cfg).blend["num"] == 0
