"""Subjects: pictures matched to their subject's clearest picture by likeness, and the factors a
subject keeps read from it, with the weight fitted on OOF."""
import numpy as np
import pytest

from conftest import tiny_config
from multitask.config import Config, ConfigError
from multitask.context import build_task
from multitask.decide import Decision, final_probs, fit_decision, honest_scores
from multitask.labels import Factor, Task
from multitask.metrics import macro_f1
from multitask.subjects import Pictures, likeness, nearest_anchor, read_subjects, subject_spec

# a covering (kind), and what a subject keeps: a trait and a binned number
TASK = Task("t", (Factor("kind", ("covered", "bare")), Factor("trait", ("x", "y")), Factor.binned("num", [10, 20])))
SPEC = (0, 1, [1, 2])  # anchor: kind=bare; kept: trait, num


def subject_pictures(n_subjects: int, per: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pictures, subject of each): a subject's pictures share the top half and the outer columns
    (its backdrop), and differ in the lower centre, where a covering would sit."""
    rng = np.random.default_rng(seed)
    pics, subject = [], []
    for s in range(n_subjects):
        backdrop = rng.integers(0, 256, (32, 32, 3))
        for _ in range(per):
            p = backdrop.copy()
            p[16:, 4:28] = rng.integers(0, 256, (16, 24, 3))  # the part a covering hides
            pics.append(np.clip(p + rng.integers(-20, 21), 0, 255))  # and the light of the shot
            subject.append(s)
    return np.asarray(pics, np.uint8), np.asarray(subject)


def test_likeness_finds_a_subjects_other_pictures_whatever_the_lower_centre_and_the_light():
    pics, subject = subject_pictures(20, 4)
    look = likeness(pics)
    assert look.shape[0] == 80 and look.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(look, axis=1), 1, rtol=1e-4)
    sim = look @ look.T
    np.fill_diagonal(sim, -np.inf)
    assert (subject[sim.argmax(1)] == subject).all()
    with pytest.raises(ValueError, match="smaller than the likeness grid"):
        likeness(np.zeros((2, 4, 4, 3), np.uint8))


def test_each_picture_goes_to_the_most_alike_anchor_of_its_own_gallery():
    look = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 2, 3]]  # rows alike in pairs
    is_anchor = np.array([True, False, False, True, False, False, False])
    galleries = np.array([0, 0, 0, 0, 1, 1, 1])
    anchor = nearest_anchor(look, is_anchor, galleries)
    assert anchor[0] == 0 and anchor[3] == 3  # an anchor is its own
    assert anchor[1] == 0 and anchor[2] == 3
    # gallery 1 has no anchor: its pictures keep their own, and never borrow gallery 0's
    assert anchor[4:].tolist() == [4, 5, 6]
    # without galleries everything is one set
    assert nearest_anchor(look[:4], is_anchor[:4]).tolist() == [0, 0, 3, 3]
    # a uniform picture (a likeness of zeros) is alike to no anchor: it keeps its own reading
    pics, _ = subject_pictures(3, 2)
    pics[1] = 128
    blank = likeness(pics)
    assert not blank[1].any()
    anchors = np.zeros(len(pics), bool)
    anchors[[0, 2, 4]] = True
    assert nearest_anchor(blank, anchors)[1] == 1


def soft(z):
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def subject_case(n_subjects=60, per=4, seed=0, anchors_right=True):
    """Every subject has one bare picture (the anchor) and covered ones. The bare picture's trait
    and num are confidently right (or confidently wrong), the covered pictures' are noisy."""
    pics, subject = subject_pictures(n_subjects, per, seed)
    rng = np.random.default_rng(seed)
    trait_s, num_s = rng.integers(0, 2, n_subjects), rng.integers(0, 3, n_subjects)
    kind = np.tile(np.r_[1, np.zeros(per - 1, int)], n_subjects)
    factors = np.stack([kind, trait_s[subject], num_s[subject]], 1)
    n = len(subject)
    bare = kind == 1
    truth_t = factors[:, 1] if anchors_right else 1 - factors[:, 1]
    truth_n = factors[:, 2] if anchors_right else (factors[:, 2] + 1) % 3
    noisy = lambda k, y, sharp: soft(rng.normal(0, 1, (n, k)) + sharp * np.eye(k)[y])  # noqa: E731
    probs = {"kind": soft(4 * np.eye(2)[kind]),
             "trait": np.where(bare[:, None], soft(5 * np.eye(2)[truth_t]), noisy(2, factors[:, 1], 0.6)),
             "num": np.where(bare[:, None], soft(5 * np.eye(3)[truth_n]), noisy(3, factors[:, 2], 0.6))}
    return probs, factors, likeness(pics), subject


def test_reading_subjects_moves_only_the_kept_factors_to_the_anchors():
    probs, factors, look, subject = subject_case()
    heads = TASK.heads("kind,trait,num")
    combined = TASK.combine(heads, probs)
    read = read_subjects(TASK, combined, SPEC, 1.0, Pictures(look))
    np.testing.assert_allclose(read.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(TASK.marginal(read, 0), probs["kind"], rtol=1e-6)  # the anchor factor is the picture's own
    anchor_row = {s: np.flatnonzero((subject == s) & (factors[:, 0] == 1))[0] for s in np.unique(subject)}
    rows = np.array([anchor_row[s] for s in subject])
    for i, name in ((1, "trait"), (2, "num")):
        np.testing.assert_allclose(TASK.marginal(read, i), probs[name][rows], rtol=1e-5)
    half = read_subjects(TASK, combined, SPEC, 0.5, Pictures(look))
    np.testing.assert_allclose(TASK.marginal(half, 1), 0.5 * probs["trait"] + 0.5 * probs["trait"][rows], rtol=1e-5)
    assert (final_probs(TASK, heads, probs, {}, Decision(subjects=0.0), SPEC, Pictures(look)) == combined).all()


def test_a_joined_head_keeps_the_final_class_a_distribution_with_every_kept_marginal_on_target():
    # one head over trait and num correlates them: rescaling one factor moves the other's marginal,
    # so a single pass of per-factor rescales would leave rows that do not sum to one
    probs, factors, look, subject = subject_case(seed=2)
    rng = np.random.default_rng(2)
    joint = soft(rng.normal(0, 2, (len(subject), 6)))  # (trait, num) in mixed radix
    heads = TASK.heads("kind,trait_num")
    combined = TASK.combine(heads, {"kind": probs["kind"], "trait_num": joint})
    anchor_row = {s: np.flatnonzero((subject == s) & (factors[:, 0] == 1))[0] for s in np.unique(subject)}
    rows = np.array([anchor_row[s] for s in subject])
    read = read_subjects(TASK, combined, SPEC, 0.5, Pictures(look))
    np.testing.assert_allclose(read.sum(1), 1, atol=1e-5)
    for i in (1, 2):
        own = TASK.marginal(combined, i)
        np.testing.assert_allclose(TASK.marginal(read, i), 0.5 * own + 0.5 * own[rows], atol=1e-5)
    np.testing.assert_allclose(TASK.marginal(read, 0), probs["kind"], atol=1e-6)  # a head of its own


def test_the_weight_is_fitted_for_helpful_anchors_and_refused_for_misleading_ones():
    heads = TASK.heads("kind,trait,num")
    cfg = tiny_config(None, "numeric={}", "decide.subjects.anchor=kind=bare", "decide.subjects.factors=[trait,num]")
    assert subject_spec(TASK, cfg) == SPEC
    probs, factors, look, _ = subject_case(seed=1)
    y = TASK.encode(factors)
    d = fit_decision(TASK, heads, probs, factors, {}, cfg, Pictures(look))
    assert d.subjects > 0
    before = macro_f1(y, TASK.combine(heads, probs).argmax(1), TASK.n_classes)
    after = macro_f1(y, final_probs(TASK, heads, probs, {}, d, SPEC, Pictures(look)).argmax(1), TASK.n_classes)
    assert after > before + 0.1
    # fold-honest: each fold's pictures match within that fold, the weight fitted on the others
    folds = np.repeat(np.arange(3), len(y) // 3)
    honest = honest_scores(TASK, heads, probs, factors, {}, folds, cfg, Pictures(look, folds))
    assert honest["f1"] > before + 0.1
    wrong, factors_w, look_w, _ = subject_case(seed=2, anchors_right=False)
    assert fit_decision(TASK, heads, wrong, factors_w, {}, cfg, Pictures(look_w)).subjects == 0
    # without the pictures' likeness there is nothing to read
    assert fit_decision(TASK, heads, probs, factors, {}, cfg).subjects == 0


def test_a_rounds_decision_matches_each_oof_picture_within_its_own_fold(tmp_path):
    """Each OOF picture was predicted by its fold's model, as the test pictures by the vote: they are
    matched within their fold. Here every bare picture sits in fold 1 and the covered ones in fold 0:
    matched across folds they would find their anchors and gain; within their fold they find none."""
    from multitask.decide import decide_round, load_decision, predict_classes
    from multitask.metrics import score_classes

    heads = TASK.heads("kind,trait,num")
    cfg = tiny_config(None, "numeric={}", "decide.subjects.anchor=kind=bare", "decide.subjects.factors=[trait,num]")
    probs, factors, look, _ = subject_case(seed=1)
    folds = (factors[:, 0] == 1).astype(int)
    report = decide_round(tmp_path, TASK, heads, probs, factors, {}, folds, cfg, look)
    d = load_decision(tmp_path)
    within = score_classes(TASK, predict_classes(TASK, heads, probs, cfg, d, Pictures(look, folds))[1], factors)
    assert report["in_sample"] == pytest.approx(within)
    across = fit_decision(TASK, heads, probs, factors, {}, cfg, Pictures(look))
    crossed = score_classes(TASK, predict_classes(TASK, heads, probs, cfg, across, Pictures(look))[1], factors)
    assert crossed["f1"] > report["in_sample"]["f1"] + 0.05  # the case tells the two apart


def test_the_competition_reads_subjects_by_default_and_a_table_task_does_not():
    assert Config().decide.subjects.anchor == "mask=not_worn"
    assert Config(decide={"subjects": None}).decide.subjects is None
    table = Config(task={"table": "t.csv", "factors": [{"name": "a", "classes": ["x", "y"]}]})
    assert table.decide.subjects is None
    task, _ = build_task(Config())
    assert subject_spec(task, Config()) == (0, 2, [1, 2])


@pytest.mark.parametrize("subjects, message", [
    ({"anchor": "hat=off", "factors": ["age"]}, "no factor 'hat'"),
    ({"anchor": "mask=off", "factors": ["age"]}, "mask has no class 'off'"),
    ({"anchor": "mask=not_worn", "factors": ["mask", "age"]}, "other than the anchor's"),
    ({"anchor": "mask=not_worn", "factors": ["height"]}, "other than the anchor's"),
])
def test_subjects_that_name_no_factor_or_class_of_the_task_are_refused_before_training(subjects, message):
    with pytest.raises(ConfigError, match=message):
        build_task(Config(decide={"subjects": subjects}))


def test_an_anchor_that_does_not_read_factor_equals_class_is_refused():
    with pytest.raises(ValueError, match="factor=class"):
        Config(decide={"subjects": {"anchor": "not_worn", "factors": ["age"]}})
