import numpy as np
import pytest

from multitask.labels import age_group, mask_task


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


def test_age_groups_from_config_bins():
    assert age_group(np.array([18, 29, 30, 59, 60, 90]), [30, 60]).tolist() == [0, 0, 1, 1, 2, 2]
    assert age_group(np.array([24, 25, 70]), [25, 70]).tolist() == [0, 1, 2]
