"""`mt ensemble`: a weighted vote of finished runs that share their folds, as a run of its own."""
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from multitask.cli import app
from multitask.config import ConfigError
from multitask.ensemble import fit_weights, make_ensemble
from multitask.kfold import train_run
from multitask.predict import predict_images
from multitask.pseudo import pseudo_label
from multitask.run import RunDir, load_npz, read_json
from multitask.submit import make_submission


@pytest.fixture(scope="module")
def members(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("members")
    a, b = base / "a", base / "b"
    train_run(tiny_config(demo_root, "train.epochs=2"), a)
    train_run(tiny_config(demo_root, "train.epochs=2", "heads=mask,gender_age", "model.backbone=resnet10t",
                          "decide.offsets=factor"), b)
    return a, b


def test_an_ensemble_of_two_layouts_submits_and_predicts(members, demo_root, tmp_path):
    a, b = members
    out = tmp_path / "ens"
    summary = make_ensemble([a, b], out)
    weights = [m["weight"] for m in summary["members"]]
    assert np.isclose(sum(weights), 1) and summary["oof_weights_honest"] is not None
    oof = load_npz(RunDir(out).round_dir(0) / "oof.npz")
    assert oof["p_class"].shape == (84, 18) and np.allclose(oof["p_class"].sum(1), 1)
    sub = pd.read_csv(make_submission(out))
    assert sub["ImageID"].tolist() == pd.read_csv(demo_root / "eval" / "info.csv")["ImageID"].tolist()
    predict_images(out, demo_root / "eval" / "images", tmp_path / "p.csv")
    preds = pd.read_csv(tmp_path / "p.csv").set_index("path").loc[sub["ImageID"]]
    assert (preds["class"].to_numpy() == sub["ans"].to_numpy()).all()  # predict re-runs every member's models
    # given weights are used as given (normalised)
    fixed = make_ensemble([a, b], tmp_path / "fixed", weights=[3, 1])
    assert [m["weight"] for m in fixed["members"]] == [0.75, 0.25]


def test_runs_of_another_seed_share_the_split(members, demo_root, tmp_path):
    a, _ = members
    other = tmp_path / "seed1"
    train_run(tiny_config(demo_root, "train.epochs=2", "train.seed=1"), other)
    assert RunDir(other).folds.read_text() == RunDir(a).folds.read_text()
    oof_a, oof_b = (load_npz(RunDir(r).round_dir(0) / "oof.npz") for r in (a, other))
    assert not np.allclose(oof_a["p_mask"], oof_b["p_mask"])  # the seed still changes the models
    assert len(make_ensemble([a, other], tmp_path / "ens")["members"]) == 2


def test_an_ensemble_refuses_runs_with_other_folds(members, demo_root, tmp_path):
    a, _ = members
    other = tmp_path / "other"
    train_run(tiny_config(demo_root, "train.fold_seed=1"), other)
    with pytest.raises(ConfigError, match="folds.csv differs"):
        make_ensemble([a, other], tmp_path / "ens")
    assert not (tmp_path / "ens").exists()
    with pytest.raises(ConfigError, match="at least two runs"):
        make_ensemble([a], tmp_path / "ens")


def test_an_ensemble_run_cannot_be_trained_further(members, tmp_path):
    out = tmp_path / "ens"
    make_ensemble(list(members), out)
    with pytest.raises(ConfigError, match="no models of its own"):
        pseudo_label(out, precision=0.0)


def test_fit_weights_prefers_the_better_run():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    good = np.eye(3)[y] * 0.6 + 0.4 / 3
    noise = rng.dirichlet(np.ones(3), 500)
    w = fit_weights([noise, good], y, 3)
    assert w[1] > w[0]


def test_cli_ensemble(members, tmp_path):
    a, b = members
    result = CliRunner().invoke(app, ["ensemble", "--runs", str(a), "--runs", str(b), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "ensemble out-of-fold" in result.output and read_json(tmp_path / "e" / "summary.json")["latest_round"] == 0
