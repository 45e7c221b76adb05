"""A binned numeric factor: boundary-aware targets, the auxiliary output, its reading as bins, and
training rows near an edge left out (training only)."""
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import tiny_config
from multitask.config import ConfigError
from multitask.context import build_task
from multitask.data.synthetic import make_table_dataset
from multitask.decide import load_decision
from multitask.kfold import train_run
from multitask.labels import Factor, Task
from multitask.numeric import Targets, aux_bins, edge_distribution, near_edge, numerics, training_rows
from multitask.predict import predict_images
from multitask.run import RunDir, load_npz, read_json
from multitask.submit import make_submission

AGE = Factor.binned("age", [30, 60])
TASK = Task("t", (Factor("g", ("m", "f")), AGE))


def cfg_with(*overrides):
    return tiny_config(None, *overrides)


def batch(g, age_class, age_value):
    return torch.tensor(np.stack([g, age_class, age_value], 1), dtype=torch.float32)


def test_edge_distribution_is_one_hot_far_from_edges_and_split_at_them():
    v = torch.tensor([10.0, 45.0, 80.0, 60.0, 59.0, 62.0, float("nan")])
    cls = torch.tensor([0, 1, 2, 2, 1, 2, 1])
    d = edge_distribution(v, cls, np.array([30.0, 60.0]), 3, soft=4.0)
    torch.testing.assert_close(d.sum(1), torch.ones(7))
    assert d[0].tolist() == [1, 0, 0] and d[1].tolist() == [0, 1, 0] and d[2].tolist() == [0, 0, 1]
    torch.testing.assert_close(d[3], torch.tensor([0.0, 0.5, 0.5]))           # on the edge: half each
    torch.testing.assert_close(d[4], torch.tensor([0.0, 1 - 0.375, 0.375]))   # 1 below: 0.5·(1 − 1/4)
    torch.testing.assert_close(d[5], torch.tensor([0.0, 0.25, 0.75]))         # 2 above: 0.5·(1 − 2/4)
    assert d[6].tolist() == [0, 1, 0]                                         # unknown number: its class
    # other training edges: 58 counts as the top bin when learned from [30, 58]
    d = edge_distribution(torch.tensor([58.0, 57.0]), torch.tensor([1, 1]), np.array([30.0, 58.0]), 3, soft=0)
    assert d.argmax(1).tolist() == [2, 1]


def test_targets_of_joined_heads_are_outer_products_of_the_factor_targets():
    y = batch([0, 1, 1], [2, 1, 2], [70.0, 59.0, 61.0])
    plain = Targets(TASK, TASK.heads("g_age"), cfg_with())(y)["g_age"]
    assert plain.tolist() == [2, 4, 5]  # hard labels when nothing reshapes them
    soft = Targets(TASK, TASK.heads("g_age"), cfg_with("numeric.age.soft_edge=4"))(y)["g_age"]
    torch.testing.assert_close(soft.sum(1), torch.ones(3))
    assert soft[0].tolist() == [0, 0, 1, 0, 0, 0]
    torch.testing.assert_close(soft[1], torch.tensor([0, 0, 0, 0, 0.625, 0.375]))
    separate = Targets(TASK, TASK.heads("g,age"), cfg_with("numeric.age.soft_edge=4"))(y)
    torch.testing.assert_close(soft[1].view(2, 3).sum(0), separate["age"][1])


def test_auxiliary_targets_from_the_number_or_the_class():
    y = batch([0, 1], [1, 2], [45.0, float("nan")])
    reg = Targets(TASK, TASK.heads("g,age"), cfg_with("numeric.age.aux=regression"))(y)["aux_age"]
    assert reg.shape == (2, 1) and reg[0, 0].item() == pytest.approx(0.0) and torch.isnan(reg[1, 0])
    ordinal = Targets(TASK, TASK.heads("g,age"), cfg_with("numeric.age.aux=ordinal"))(y)["aux_age"]
    assert ordinal.tolist() == [[1, 0], [1, 1]]


def test_auxiliary_outputs_read_as_valid_bin_probabilities():
    rng = np.random.default_rng(0)
    raw = rng.random((50, 2))  # not monotone on purpose
    p = aux_bins(AGE, "ordinal", raw)
    assert (p >= 0).all() and np.allclose(p.sum(1), 1)
    assert aux_bins(AGE, "ordinal", np.array([[0.99, 0.98]])).argmax() == 2
    # regression: the standardised number (centre 45, span 30); 20 years old is bin 0, 70 is bin 2
    z = (np.array([[20.0], [45.0], [70.0]]) - 45) / 30
    p = aux_bins(AGE, "regression", z, sigma=5.0)
    assert p.argmax(1).tolist() == [0, 1, 2] and np.allclose(p.sum(1), 1)
    assert aux_bins(AGE, "regression", z, sigma=50.0).max() < p.max()  # a wider spread is less sure


def test_rows_near_an_edge_are_left_out_of_training_only():
    values = np.array([[10.0], [29.0], [31.5], [45.0], [58.0], [62.5], [90.0]])
    assert near_edge(values[:, 0], [30, 60], 2).tolist() == [False, True, True, False, False, False, False]
    cfg = cfg_with("numeric.age.drop_near_edge=3")
    assert training_rows(TASK, cfg, values).tolist() == [True, False, False, True, False, False, True]
    assert training_rows(TASK, cfg_with(), values).all()


@pytest.mark.parametrize("override, message", [
    ("numeric.gender.aux=regression", "not binned numeric factors"),
    ("numeric.age.train_bins=[30]", "as many edges"),
])
def test_numeric_settings_are_checked_against_the_task(demo_root, override, message):
    with pytest.raises(ConfigError, match=message):
        numerics(build_task(tiny_config(demo_root, override))[0], tiny_config(demo_root, override))


@pytest.fixture(scope="module")
def aux_run(tmp_path_factory):
    """A table task with a numeric factor, its auxiliary head, soft edges, rows near edges left out,
    and offsets: trained, decided, submitted and predicted."""
    root = tmp_path_factory.mktemp("numeric")
    make_table_dataset(root, n_train_groups=12, n_test_groups=3, per_group=3, image_size=(32, 32))
    task = {"table": str(root / "train.csv"), "group_col": "group", "test": "test.csv",
            "factors": [{"name": "size", "bins": [20, 30]}, {"name": "colour", "classes": ["red", "green", "blue", "yellow"]}]}
    cfg = tiny_config(None, f"task={yaml.safe_dump(task, default_flow_style=True)}", "train.epochs=2",
                      "numeric.size.aux=regression", "numeric.size.soft_edge=2", "numeric.size.drop_near_edge=1",
                      "decide.offsets=factor")
    out = root / "run"
    return root, out, train_run(cfg, out)


def test_the_auxiliary_head_is_trained_decided_and_applied(aux_run):
    root, out, summary = aux_run
    run = RunDir(out)
    oof = load_npz(run.round_dir(0) / "oof.npz")
    assert sorted(oof["rows"].tolist()) == list(range(36))  # OOF keeps the rows training left out
    assert oof["p_aux_size"].shape == (36, 1)
    decision = load_decision(run.round_dir(0))
    assert "size" in decision.blend and decision.sigma["size"] > 0 and len(decision.offsets) == 12
    report = read_json(run.round_dir(0) / "decision.json")["oof"]
    assert set(report) == {"argmax", "in_sample", "honest"} and "f1" in report["honest"]
    assert summary["decision"]["honest"] == report["honest"]
    sub = pd.read_csv(make_submission(out))
    preds = out / "preds.csv"
    predict_images(out, root / "test.csv", preds)
    assert pd.read_csv(preds)["class"].tolist() == sub["class"].tolist()  # submit and predict decide alike


def test_settings_for_every_numeric_factor_and_their_override():
    two = Task("t", (Factor.binned("age", [30, 60]), Factor.binned("height", [150, 180])))
    got = {n.factor.name: n.cfg.aux for n in numerics(two, cfg_with("numeric.*.aux=ordinal", "numeric.height.aux=regression"))}
    assert got == {"age": "ordinal", "height": "regression"}
    assert numerics(Task("c", (Factor("g", ("m", "f")),)), cfg_with("numeric.*.aux=ordinal")) == []


def test_a_single_edge_ordinal_output_is_read_as_a_probability_not_a_number():
    """One edge gives an ordinal output one wide, as wide as a regression: the kind, not the width,
    says how to read it (raw logits clipped to [0, 1] would turn -3 into certainty of the low bin
    and 0.4 into 0.4)."""
    from torch import nn

    from multitask.export import RunGraph
    from multitask.numeric import aux_activation, aux_kind

    size = Factor.binned("size", [25])
    task = Task("t", (size,))
    cfg = cfg_with("numeric.*.aux=ordinal")
    assert aux_kind(cfg, "aux_size") == "ordinal"
    assert aux_kind(cfg_with("numeric.*.aux=ordinal", "numeric.size.aux=regression"), "aux_size") == "regression"
    logits = torch.tensor([[3.0], [-3.0], [0.4]])
    read = aux_activation(logits, aux_kind(cfg, "aux_size"))
    torch.testing.assert_close(read, logits.sigmoid())
    p = aux_bins(size, "ordinal", read.numpy())
    assert p.argmax(1).tolist() == [1, 0, 1] and 0.5 < p[2, 1] < 0.7
    torch.testing.assert_close(aux_activation(logits, "regression"), logits)  # a regression keeps its number

    class Stub(nn.Module):  # a fold model: the head and the single-edge ordinal output
        def forward(self, x):
            return {"size": torch.zeros(len(x), 2), "aux_size": torch.full((len(x), 1), 3.0)}

    graph = RunGraph([Stub()], ["none"], "soft", task, task.heads(None), ["size", "aux_size"], [],
                     {"aux_size": aux_kind(cfg, "aux_size")})
    _, _, p_aux = graph(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    torch.testing.assert_close(p_aux, torch.full((2, 1), 3.0).sigmoid())  # the exported file reads it alike
