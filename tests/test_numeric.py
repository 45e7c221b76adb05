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
from multitask.numeric import (Targets, aux_bins, edge_distribution, near_edge, numerics, trained_classes,
                               training_rows)
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


def test_whole_numbers_are_cut_half_a_unit_below_the_edge():
    """Whole years: <60 ends at 59, so 59 and 60 must lie equally far from the cut, as 29 and 30 do;
    measured from the edge itself, 60 counted as half below it and 59 as mostly below."""
    years = Factor.binned("age", [30, 60], integer=True)
    task = Task("t", (Factor("g", ("m", "f")), years))
    ages = np.array([28.0, 29.0, 30.0, 31.0, 58.0, 59.0, 60.0, 61.0])
    y = batch(np.zeros(8), years.bin(ages), ages)
    soft = Targets(task, task.heads("g,age"), cfg_with("numeric.age.soft_edge=3"))(y)["age"]
    # 0.5·(1 − 0.5/3) of 59's and 60's mass crosses the cut at 59.5, and the two mirror each other
    torch.testing.assert_close(soft[5], torch.tensor([0, 7 / 12, 5 / 12]))
    torch.testing.assert_close(soft[6], torch.tensor([0, 5 / 12, 7 / 12]))
    torch.testing.assert_close(soft[1, :2], soft[2, :2].flip(0))
    assert soft.argmax(1).tolist() == years.bin(ages).tolist()  # the class is still the bin's
    # one year from the cut: 29, 30, 59 and 60, both sides alike
    keep = training_rows(task, cfg_with("numeric.age.drop_near_edge=1"), ages[:, None])
    assert ages[~keep].tolist() == [29, 30, 59, 60]
    # a regression that says 59 is as sure of 30-59 as one that says 60 is of >=60
    z = (np.array([[59.0], [60.0]]) - 45) / 30
    p = aux_bins(years, "regression", z, sigma=2.0)
    assert p[0, 1] == pytest.approx(p[1, 2]) and p[0, 1] > 0.5
    # a distribution's fine bins meet at the cuts, so each still lies within one bin
    from multitask.numeric import fine_edges, fine_to_bins

    grid = fine_edges(years)
    owner = fine_to_bins(years, grid)
    assert {29.5, 59.5} <= set(grid.tolist()) and owner[grid.tolist().index(59.5) + 1] == 2
    assert owner[grid.tolist().index(59.5)] == 1
    # a continuous number keeps its cut at the edge
    assert AGE.cuts.tolist() == [30.0, 60.0] and years.cuts.tolist() == [29.5, 59.5]


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
    # P(>= edge j) can only fall with j: a higher edge's exceedance is capped at the lower one's
    s = np.minimum.accumulate(raw, axis=1)
    expected = np.clip(np.stack([1 - s[:, 0], s[:, 0] - s[:, 1], s[:, 1]], 1), 1e-9, None)
    np.testing.assert_allclose(p, expected / expected.sum(1, keepdims=True))
    assert aux_bins(AGE, "ordinal", np.array([[0.99, 0.98]])).argmax() == 2
    # regression: the standardised number (centre 45, span 30); 20 years old is bin 0, 70 is bin 2
    z = (np.array([[20.0], [45.0], [70.0]]) - 45) / 30
    p = aux_bins(AGE, "regression", z, sigma=5.0)
    assert p.argmax(1).tolist() == [0, 1, 2] and np.allclose(p.sum(1), 1)
    assert aux_bins(AGE, "regression", z, sigma=50.0).max() < p.max()  # a wider spread is less sure


def test_the_regressions_spread_is_the_robust_spread_of_its_residuals():
    """1.4826 × the median absolute deviation, in years, of the number the output stands for
    (standardised by the edges: centre 45, span 30); unknown numbers are left out."""
    from multitask.numeric import regression_sigma

    rng = np.random.default_rng(1)
    years = rng.uniform(10, 80, 400)
    resid = 3.0 + rng.normal(0, 4.0, 400)  # a biased regression: the spread is about the median residual
    resid[:20] = 200.0  # a few wild misses barely move it
    out = ((years + resid - 45) / 30)[:, None]
    values = np.concatenate([years[:-1], [np.nan]])
    r = (out[:-1, 0] * 30 + 45) - years[:-1]
    expected = 1.4826 * np.median(np.abs(r - np.median(r)))
    assert regression_sigma(AGE, out, values) == pytest.approx(expected)
    assert 3.5 < regression_sigma(AGE, out, values) < 5.0 < r.std() / 5  # 5% wild misses: std about 43
    # nothing to fit it on: a thirtieth of the edges' span, one year for ages and as much for a number on
    # a 0-1 scale (one year there read every row as nearly flat)
    from multitask.labels import Factor
    from multitask.numeric import aux_bins

    assert regression_sigma(AGE, out[:0], values[:0]) == pytest.approx(1.0)
    share = Factor.binned("share", [0.25, 0.75])
    assert regression_sigma(share, out[:0], values[:0]) == pytest.approx(0.5 / 30)
    sure = aux_bins(share, "regression", np.array([[-0.8]]))  # standardised: 0.1, well inside bin 0
    assert sure[0, 0] > 0.99


def test_other_training_bins_move_the_targets_and_the_rows_left_out():
    """numeric.age.train_bins [30, 58]: a 58-year-old is taught as >=60 (the scoring bins stay [30,
    60]), and drop_near_edge measures from the training edges."""
    ages = np.array([25.0, 57.0, 58.0, 59.0, 61.0])
    y = batch(np.zeros(5), AGE.bin(ages), ages)
    moved = Targets(TASK, TASK.heads("g,age"), cfg_with("numeric.age.train_bins=[30, 58]"))(y)["age"]
    assert moved.argmax(1).tolist() == [0, 1, 2, 2, 2]
    assert AGE.bin(ages).tolist() == [0, 1, 1, 1, 2]
    keep = training_rows(TASK, cfg_with("numeric.age.train_bins=[30, 58]", "numeric.age.drop_near_edge=1.5"),
                         ages[:, None])
    assert ages[~keep].tolist() == [57, 58, 59]


def test_class_balance_counts_the_training_bins_the_targets_teach():
    """With train_bins [30, 58] a 58-year-old is taught as >=60: the sampler draws it, and the loss
    weights count it, as one of that class, not of 30-59 (they counted the scoring bins)."""
    from multitask.data.dataset import RowImages
    from multitask.engine import FoldData, fold_batches, head_counts
    ages = np.array([20.0, 40, 45, 50, 58, 59, 62, 70])
    factors = np.stack([np.zeros(8, int), AGE.bin(ages)], 1)
    cfg = cfg_with("numeric.age.train_bins=[30, 58]", "train.sampler=age", "train.sampler_power=1.0")
    data = FoldData(RowImages.of(np.zeros((8, 8, 8, 3), np.uint8)), factors, ages[:, None], None, None)
    taught = Targets(TASK, TASK.heads("g,age"), cfg)(batch(factors[:, 0], factors[:, 1], ages))["age"].argmax(1)
    assert np.bincount(taught.numpy(), minlength=3).tolist() == [1, 3, 4]
    assert head_counts(cfg, TASK, TASK.heads("g,age"), data)["age"].tolist() == [1, 3, 4]
    batches, _ = fold_batches(cfg, TASK, TASK.heads("g,age"), data, torch.device("cpu"), seed=0)
    drawn = np.bincount(taught.numpy(), weights=batches.weights.numpy())
    assert np.allclose(drawn, 1 / 3)  # every taught class drawn alike
    # without train_bins the scoring bins are the classes taught
    assert (trained_classes(TASK, cfg_with(), factors, ages[:, None]) == factors).all()


def test_fine_bins_of_a_distribution_output_each_lie_within_one_bin():
    from multitask.numeric import fine_edges, fine_to_bins

    grid = fine_edges(AGE)  # a sixth of the 30-year span: 5 years, one span beyond the outer edges
    assert grid.tolist() == [float(a) for a in range(0, 95, 5)]
    assert fine_to_bins(AGE, grid).tolist() == [0] * 7 + [1] * 6 + [2] * 7
    odd = Factor.binned("x", [1 / 3, 1.0])  # edges off the grid: they are added to it, exactly
    grid = fine_edges(odd, step=0.25)
    assert 1 / 3 in grid.tolist() and 1.0 in grid.tolist() and (np.diff(grid) > 0).all()
    lower = np.concatenate([[-np.inf], grid])
    owner = fine_to_bins(odd, grid)
    upper = np.concatenate([grid, [np.inf]])
    bins = np.asarray(odd.bins)
    assert all(((lo >= np.r_[-np.inf, bins][b]) and (up <= np.r_[bins, np.inf][b]))
               for lo, up, b in zip(lower, upper, owner))


def test_distribution_targets_a_normal_around_the_number_or_the_class_evenly():
    from multitask.numeric import fine_edges, fine_to_bins

    y = batch([0, 1, 0, 1], [0, 2, 1, -1], [45.0, 62.0, float("nan"), float("nan")])
    t = Targets(TASK, TASK.heads("g,age"), cfg_with("numeric.age.aux=distribution"))(y)["aux_age"]
    grid, owner = fine_edges(AGE), fine_to_bins(AGE, fine_edges(AGE))
    assert t.shape == (4, len(grid) + 1)
    torch.testing.assert_close(t[:3].sum(1), torch.ones(3))
    # 45 sits on a fine edge: half its mass each side, the sigma (2.5 years) keeps 95% within 5 years
    assert t[0, 9].item() == pytest.approx(t[0, 10].item()) and t[0, 8:12].sum().item() > 0.95
    assert t[1, owner == 2].sum().item() == pytest.approx(0.79, abs=0.01)  # 62: 2 years above the edge at 60
    known_class = t[2][owner == 1]
    torch.testing.assert_close(known_class, torch.full_like(known_class, 1 / 6))  # the class, evenly
    assert t[2][owner != 1].sum() == 0 and torch.isnan(t[3]).all()  # neither: left out of the loss
    wide = Targets(TASK, TASK.heads("g,age"), cfg_with("numeric.age.aux=distribution", "numeric.age.aux_sigma=10"))(y)
    assert wide["aux_age"][0].max() < t[0].max()


def test_a_distribution_output_reads_as_its_bins_summed():
    from multitask.numeric import fine_edges

    grid = fine_edges(AGE)
    out = np.zeros((3, len(grid) + 1))
    out[0, [2, 3]] = 0.5  # 5-15 years: all in bin 0
    out[1, [6, 7]] = [0.25, 0.75]  # 25-30 and 30-35: a quarter in bin 0
    out[2, -1] = 1.0  # 90 and over
    p = aux_bins(AGE, "distribution", out, grid=grid)
    np.testing.assert_allclose(p, [[1, 0, 0], [0.25, 0.75, 0], [0, 0, 1]], atol=1e-8)


@pytest.mark.parametrize("kind", ["regression", "ordinal", "distribution"])
@pytest.mark.parametrize("integer", [False, True])
def test_the_exported_reading_of_an_auxiliary_output_equals_numpys(kind, integer):
    from multitask.export import aux_bin_probs
    from multitask.numeric import fine_edges, fine_to_bins, standardise

    age = Factor.binned("age", [30, 60], integer)
    rng = np.random.default_rng(1)
    grid = fine_edges(age)
    width = {"regression": 1, "ordinal": 2, "distribution": len(grid) + 1}[kind]
    out = rng.random((40, width)) if kind != "distribution" else rng.dirichlet(np.ones(width), 40)
    _, centre, scale = standardise(age, np.zeros(1))
    got = aux_bin_probs(kind, torch.as_tensor(out), list(age.cuts), centre, scale, 7.0,
                        torch.as_tensor(fine_to_bins(age, grid)))
    np.testing.assert_allclose(got.numpy(), aux_bins(age, kind, out, sigma=7.0, grid=grid), atol=1e-6)


def test_rows_near_an_edge_are_left_out_of_training_only():
    values = np.array([[10.0], [29.0], [31.5], [45.0], [58.0], [62.5], [90.0]])
    assert near_edge(values[:, 0], [30, 60], 2).tolist() == [False, True, True, False, False, False, False]
    cfg = cfg_with("numeric.age.drop_near_edge=3")
    assert training_rows(TASK, cfg, values).tolist() == [True, False, False, True, False, False, True]
    assert training_rows(TASK, cfg_with(), values).all()


def test_a_fold_left_with_no_training_row_says_which_setting_emptied_it(demo_root, tmp_path):
    # it divided by zero, as a traceback, in the batches of a fold of nothing
    with pytest.raises(ConfigError, match=r"fold 0: no training row is left .*numeric.age.drop_near_edge=100"):
        train_run(tiny_config(demo_root, "numeric.age.drop_near_edge=100", "train.epochs=1"), tmp_path / "run")


@pytest.mark.parametrize("override, message", [
    ("numeric.gender.aux=regression", "not binned numeric factors"),
    ("numeric.age.train_bins=[30]", "as many edges"),
])
def test_numeric_settings_are_checked_against_the_task(demo_root, override, message):
    with pytest.raises(ConfigError, match=message):
        numerics(build_task(tiny_config(demo_root, override))[0], tiny_config(demo_root, override))


def test_fractional_training_edges_of_whole_years_are_refused_before_training(demo_root, tmp_path):
    """Whole years are cut half a year below an edge: 57.5 taught 57 as the upper bin. Refused where
    folds are trained (a run trained so before the check still reads)."""
    cfg = tiny_config(demo_root, "numeric.age.train_bins=[30, 57.5]")
    numerics(build_task(cfg)[0], cfg)  # reading such a run's settings is not refused
    with pytest.raises(ConfigError, match=r"numeric.age.train_bins \[30.0, 57.5\]: age is a whole number"):
        train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


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
    import multitask.engine as engine

    trained, real_batches = [], engine.TrainBatches  # the rows each fold's training is handed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "TrainBatches", lambda c, images, targets, *a, **k:
                   trained.append(len(targets)) or real_batches(c, images, targets, *a, **k))
        summary = train_run(cfg, out)
    return root, out, summary | {"trained_rows": trained}


def test_the_auxiliary_head_is_trained_decided_and_applied(aux_run):
    from multitask.context import reopen_context
    from multitask.data.table import numeric_matrix

    root, out, summary = aux_run
    run = RunDir(out)
    oof = load_npz(run.round_dir(0) / "oof.npz")
    assert sorted(oof["rows"].tolist()) == list(range(36))  # OOF keeps the rows training left out
    ctx = reopen_context(out, with_images=False)
    kept = training_rows(ctx.task, ctx.cfg, numeric_matrix(ctx.table.train, ctx.task))
    assert 0 < (~kept).sum() and summary["trained_rows"] == [int(((ctx.folds != k) & kept).sum()) for k in (0, 1)]
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


def test_a_distribution_head_is_trained_decided_and_read_alike_by_submit_and_predict(tmp_path):
    from multitask.numeric import fine_edges

    make_table_dataset(tmp_path, n_train_groups=12, n_test_groups=3, per_group=3, image_size=(32, 32))
    task = {"table": str(tmp_path / "train.csv"), "group_col": "group", "test": "test.csv",
            "factors": [{"name": "size", "bins": [20, 30]}, {"name": "colour", "classes": ["red", "green", "blue", "yellow"]}]}
    cfg = tiny_config(None, f"task={yaml.safe_dump(task, default_flow_style=True)}", "train.epochs=2",
                      "numeric.size.aux=distribution", "numeric.size.aux_step=2")
    out = tmp_path / "run"
    train_run(cfg, out)
    grid = fine_edges(Factor.binned("size", [20, 30]), 2)
    assert load_npz(RunDir(out).round_dir(0) / "oof.npz")["p_aux_size"].shape == (36, len(grid) + 1)
    decision = load_decision(RunDir(out).round_dir(0))
    assert decision.grid["size"] == grid.tolist() and "size" in decision.blend
    sub = pd.read_csv(make_submission(out))
    predict_images(out, tmp_path / "test.csv", tmp_path / "preds.csv")
    assert pd.read_csv(tmp_path / "preds.csv")["class"].tolist() == sub["class"].tolist()
    # the exported file reads the fine bins as torch does, with the reading blended in for sure
    from multitask.export import export_run
    from multitask.run import write_json

    path = RunDir(out).round_dir(0) / "decision.json"
    written = read_json(path)
    written["decision"]["blend"]["size"] = 0.5
    write_json(path, written)
    assert export_run(out, tmp_path / "m.onnx")["max_abs_diff"] <= 1e-4


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


@pytest.mark.parametrize("kind", ["regression", "ordinal", "distribution"])
def test_the_exported_reading_holds_no_op_that_int8_quantises(kind, tmp_path):
    # a distribution's fine bins were summed by a MatMul, which `--int8` quantised (0.003 off)
    onnx = pytest.importorskip("onnx")
    from multitask.export import OPSET, QUANTISED_OPS, aux_bin_probs
    from multitask.numeric import fine_edges, fine_to_bins, standardise

    age = Factor.binned("age", [30, 60], True)
    grid = fine_edges(age)
    owner = torch.as_tensor(fine_to_bins(age, grid))
    _, centre, scale = standardise(age, np.zeros(1))

    class Reading(torch.nn.Module):
        def forward(self, out):
            return aux_bin_probs(kind, out, list(age.cuts), centre, scale, 7.0, owner)

    width = {"regression": 1, "ordinal": 2, "distribution": len(grid) + 1}[kind]
    torch.onnx.export(Reading(), (torch.rand(2, width),), str(tmp_path / "r.onnx"), opset_version=OPSET, dynamo=False)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "r.onnx")).graph.node}
    assert ops and not ops & set(QUANTISED_OPS)
