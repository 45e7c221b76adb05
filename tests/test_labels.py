import numpy as np
import pytest

from multitask.labels import Factor, Task, bin_names, mask_task


def test_mask_task_class_is_mask6_gender3_age():
    task = mask_task()
    assert task.sizes == (3, 2, 3) and task.n_classes == 18
    for m in range(3):
        for g in range(2):
            for a in range(3):
                assert task.encode(np.array([[m, g, a]]))[0] == m * 6 + g * 3 + a


def test_encode_decode_round_trip():
    task = mask_task()
    classes = np.arange(18)
    assert (task.encode(task.decode(classes)) == classes).all()


@pytest.mark.parametrize("spec, sizes", [
    ("mask,gender,age", [3, 2, 3]),
    ("mask,gender_age", [3, 6]),
    ("age_gender,mask", [6, 3]),  # a join is named in any order; its classes follow the task order
    ("class", [18]),
])
def test_valid_head_specs(spec, sizes):
    assert [h.n for h in mask_task().heads(spec)] == sizes


@pytest.mark.parametrize("spec, message", [
    ("mask,gender", "missing ['age']"),
    ("mask,gender,age,gender_age", "covered twice"),
    ("class,mask", "covered twice"),
    ("mask,gender,hair", "unknown head 'hair'"),
    ("", "no heads"),
])
def test_invalid_head_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mask_task().heads(spec)


def test_head_targets_follow_factors():
    task = mask_task()
    values = task.decode(np.arange(18))
    gender_age = task.head("gender_age").targets(values)
    assert (gender_age == values[:, 1] * 3 + values[:, 2]).all()
    assert (task.head("class").targets(values) == np.arange(18)).all()


def test_combine_is_product_of_head_probabilities():
    task = mask_task()
    rng = np.random.default_rng(0)
    heads = task.heads("mask,gender_age")
    probs = {h.name: rng.dirichlet(np.ones(h.n), size=5) for h in heads}
    combined = task.combine(heads, probs)
    assert combined.shape == (5, 18)
    np.testing.assert_allclose(combined.sum(1), 1.0, rtol=1e-6)
    # class 13 = mask 2, gender 0, age 1 -> gender_age index 1
    np.testing.assert_allclose(combined[:, 13], probs["mask"][:, 2] * probs["gender_age"][:, 1])


def test_flat_head_combines_to_itself():
    task = mask_task()
    heads = task.heads("class")
    p = np.random.default_rng(1).dirichlet(np.ones(18), size=3)
    np.testing.assert_allclose(task.combine(heads, {"class": p}), p)


def test_binned_factor_bins_and_names():
    age = Factor.binned("age", [30, 60])
    # the edges do not say the values are whole: 59.9 falls in the middle bin, which must not read 30-59
    assert age.numeric and age.classes == ("<30", "[30,60)", ">=60")
    assert age.bin(np.array([18, 29, 30, 59, 59.9, 60, 90])).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert Factor.binned("age", [30, 60], integer=True).classes == ("<30", "30-59", ">=60")
    assert mask_task().factors[2].classes == ("<30", "30-59", ">=60")  # whole years only
    assert Factor.binned("age", [25, 70]).bin(np.array([24, 25, 70])).tolist() == [0, 1, 2]
    assert Factor.binned("age", [29.5, 59.5]).bin(np.array([29.4, 29.5])).tolist() == [0, 1]
    assert bin_names([2.5, 7.5]) == ("<2.5", "[2.5,7.5)", ">=7.5")
    assert bin_names([10]) == ("<10", ">=10")
    with pytest.raises(ValueError, match="whole-number edges"):
        bin_names([2.5, 7.5], integer=True)
    assert not Factor("gender", ("m", "f")).numeric


def test_a_task_of_any_shape_names_and_marginalises_its_classes():
    # 2 x 4, nothing named mask, gender or age
    task = Task("t", (Factor("shape", ("circle", "square")), Factor("colour", ("r", "g", "b", "y"))))
    assert task.n_classes == 8 and [h.n for h in task.heads("shape,colour")] == [2, 4]
    names = task.class_names(np.array([0, 5, 7]))
    assert names.tolist() == [["circle", "r"], ["square", "g"], ["square", "y"]]
    p = np.random.default_rng(0).dirichlet(np.ones(8), size=4)
    np.testing.assert_allclose(task.marginal(p, 0), p.reshape(4, 2, 4).sum(2))
    np.testing.assert_allclose(task.marginal(p, 1), p.reshape(4, 2, 4).sum(1))
