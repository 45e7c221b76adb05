"""`mt ensemble`: a weighted vote of finished runs that share their folds, as a run of its own."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import stopped_in, tiny_config
from multitask.cli import app
from multitask.config import ConfigError
from multitask.context import build_task, load_run_config
from multitask.decide import blend_only, fit_decision, load_decision, predict_classes
from multitask.ensemble import fit_weights, fold_votes, make_ensemble, member_probs, weighted
from multitask.kfold import train_run
from multitask.labels import FLAT_HEAD
from multitask.predict import predict_images
from multitask.pseudo import pseudo_label
from multitask.metrics import macro_f1
from multitask.run import SOFT_FILE, RunDir, RunError, head_probs, load_npz, read_json
from multitask.subjects import Pictures
from multitask.submit import make_submission


@pytest.fixture(scope="module")
def members(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("members")
    a, b = base / "a", base / "b"
    train_run(tiny_config(demo_root, "train.epochs=2"), a)
    train_run(tiny_config(demo_root, "train.epochs=2", "heads=mask,gender_age", "model.backbone=resnet10t",
                          "decide.offsets=factor"), b)
    return a, b


def test_an_ensemble_of_two_layouts_submits_and_predicts(members, demo_root, tmp_path, monkeypatch):
    a, b = members
    out = tmp_path / "ens"
    summary = make_ensemble([a, b], out)
    weights = [m["weight"] for m in summary["members"]]
    assert np.isclose(sum(weights), 1)
    # the fold-honest figure: fold k's rows voted with the weights refitted without fold k, scored
    from multitask.metrics import score_classes
    from multitask.ensemble import fit_weights, member_probs

    parts = [member_probs(m) for m in (a, b)]
    oof0, task = parts[0]["oof"], parts[0]["task"]
    y, folds = task.encode(oof0["factors"]), oof0["fold"]
    classes = np.zeros(len(y), np.int64)
    for k in np.unique(folds):  # each member's OOF under its blend refitted without fold k (ensemble.blends_without)
        w = fit_weights([m["oof_without"](k)[folds != k] for m in parts], y[folds != k], task.n_classes)
        classes[folds == k] = sum(wi * m["oof_without"](k)[folds == k] for wi, m in zip(w, parts)).argmax(1)
    assert summary["oof_weights_honest"] == pytest.approx(score_classes(task, classes, oof0["factors"]))
    # the same votes for a decision refitted later (scripts/subjects_offline.py, blend_only.py)
    from multitask.ensemble import oof_votes_without

    ens_cfg = load_run_config(RunDir(out))
    with monkeypatch.context() as m:  # the rounds the ensemble voted, not those chosen after a later round
        m.setattr(RunDir, "choose_round", lambda *a, **k: pytest.fail("a member's round chosen anew"))
        without = oof_votes_without(ens_cfg)
    for k in np.unique(folds):
        assert (without(k)[FLAT_HEAD][folds == k].argmax(1) == classes[folds == k]).all()
    assert oof_votes_without(load_run_config(RunDir(a))) is None  # not an ensemble
    # mt runs ranks the ensemble by that honest figure, not by the vote scored on the rows it was fitted on
    from multitask.runs import run_row

    row = run_row(RunDir(out))
    assert (row["oof_f1"], row["oof_mask"]) == (summary["oof_weights_honest"]["f1"], summary["oof_weights_honest"]["f1_mask"])
    oof = load_npz(RunDir(out).round_dir(0) / "oof.npz")
    assert oof["p_class"].shape == (84, 18) and np.allclose(oof["p_class"].sum(1), 1)
    sub = pd.read_csv(make_submission(out))
    assert sub["ImageID"].tolist() == pd.read_csv(demo_root / "eval" / "info.csv")["ImageID"].tolist()
    made = read_json(out / "submission.csv.json")["predicted_by"]  # no fold models of its own: its members voted
    assert made["members"] == [str(a.resolve()), str(b.resolve())] and made["member_rounds"] == [0, 0]
    assert made["member_train_ids"] == [RunDir(m).round_train_ids(0) for m in (a, b)]
    # the members' pictures' likeness travels, so the ensemble reads subjects on the test set
    test = load_npz(RunDir(out).round_dir(0) / "test_probs.npz")
    assert test["likeness"].shape[0] == len(sub) and "likeness" in oof
    cfg = load_run_config(RunDir(out))
    task, heads = build_task(cfg)
    decision = load_decision(RunDir(out).round_dir(0))
    voted = {"class": test["p_class"]}
    order = pd.Index(test["image_id"]).get_indexer(sub["ImageID"])
    assert (predict_classes(task, heads, voted, cfg, decision, Pictures(test["likeness"]))[1][order] ==
            sub["ans"].to_numpy()).all()
    # predict re-runs every member's models, and reads each picture on its own
    predict_images(out, demo_root / "eval" / "images", tmp_path / "p.csv")
    preds = pd.read_csv(tmp_path / "p.csv").set_index("path").loc[sub["ImageID"]]
    assert (preds["class"].to_numpy() == predict_classes(task, heads, voted, cfg, decision)[1][order]).all()
    # given weights are used as given (normalised)
    fixed = make_ensemble([a, b], tmp_path / "fixed", weights=[3, 1])
    assert [m["weight"] for m in fixed["members"]] == [0.75, 0.25]
    # its fold-honest vote (a later decision's refit, an outer ensemble's) keeps the given weights and
    # reads each member's blend refitted without the fold
    fixed_without = oof_votes_without(load_run_config(RunDir(tmp_path / "fixed")))
    for k in np.unique(folds):
        assert np.allclose(fixed_without(k)[FLAT_HEAD],
                           0.75 * parts[0]["oof_without"](k) + 0.25 * parts[1]["oof_without"](k))
    for bad in ([float("nan"), 1], [float("inf"), 1], [-1, 2], [0, 0]):  # nan passed `min(w) < 0`
        with pytest.raises(ConfigError, match="finite, non-negative"):
            make_ensemble([a, b], tmp_path / "bad", weights=bad)
        assert not (tmp_path / "bad").exists()


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
    # nor may a run of another split teach one: its fold k saw some of this run's fold-k groups
    run = tmp_path / "a"
    shutil.copytree(a, run)
    with pytest.raises(ConfigError, match="folds.csv differs"):
        pseudo_label(run, precision=0.0, labels_from=other)
    assert RunDir(run).rounds() == [0] and not RunDir(run).round_dir(1).exists()
    with pytest.raises(ConfigError, match="at least two runs"):
        make_ensemble([a], tmp_path / "ens")
    with pytest.raises(ConfigError, match="is given twice"):
        make_ensemble([a, a.parent / "." / a.name, members[1]], tmp_path / "ens")
    assert not (tmp_path / "ens").exists()


def test_labels_from_a_run_whose_round_is_not_current_are_refused(members, tmp_path):
    """--labels-from another run reads its fold models' test predictions only where its round's
    results were built from the fold outputs it holds now."""
    from multitask.run import write_json

    a, b = members
    run, other = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a, run)
    shutil.copytree(b, other)
    summary_path = RunDir(other).round_dir(0) / "summary.json"
    summary = read_json(summary_path)
    summary["train_ids"]["0"] = "another training"
    write_json(summary_path, summary)
    with pytest.raises(RunError, match="built from other outputs of fold"):
        pseudo_label(run, precision=0.0, labels_from=other)
    assert RunDir(run).rounds() == [0] and not RunDir(run).round_dir(1).exists()


def test_a_member_retrained_since_the_ensemble_was_made_is_refused(members, demo_root, tmp_path):
    a, b = members
    member = tmp_path / "a"
    shutil.copytree(a, member)
    out = tmp_path / "ens"
    make_ensemble([member, b], out)
    cfg = load_run_config(RunDir(out))
    assert cfg.ensemble.train_ids[0] == read_json(RunDir(member).round_dir(0) / "summary.json")["train_ids"]
    test_ids = load_npz(RunDir(out).round_dir(0) / "test_probs.npz")["image_id"]
    fold_votes(out, test_ids)  # as made: fine
    train_run(tiny_config(demo_root, "train.epochs=2"), member, force=True)  # same settings, new models
    preds = tmp_path / "p.csv"
    with pytest.raises(RunError, match="retrained since the ensemble was made"):
        predict_images(out, demo_root / "eval" / "images", preds)
    with pytest.raises(RunError, match="retrained since the ensemble was made"):
        fold_votes(out, test_ids)
    assert not preds.exists()


def test_the_ensembles_honest_decision_scores_each_fold_with_weights_that_never_saw_it(members, tmp_path):
    a, b = members
    out = tmp_path / "ens"
    summary = make_ensemble([a, b], out)
    cfg = load_run_config(RunDir(out))
    task, heads = build_task(cfg)
    oof = load_npz(RunDir(out).round_dir(0) / "oof.npz")
    without = [member_probs(r)["oof_without"] for r in (a, b)]
    y, folds = task.encode(oof["factors"]), oof["fold"]
    pictures = Pictures(oof["likeness"], folds)
    classes = np.zeros(len(y), np.int64)
    for k in np.unique(folds):
        fit, held = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        probs = [p(k) for p in without]
        voted = weighted(probs, fit_weights([p[fit] for p in probs], y[fit], task.n_classes))
        d = fit_decision(task, heads, {"class": voted[fit]}, oof["factors"][fit], {}, cfg, pictures.take(fit))
        classes[held] = predict_classes(task, heads, {"class": voted[held]}, cfg, d, pictures.take(held))[1]
    assert summary["decision"]["honest"]["f1"] == macro_f1(y, classes, task.n_classes)


def test_a_members_fold_honest_oof_reads_its_blend_refitted_without_the_fold(members):
    """A member's auxiliary blend (weight, regression spread) was fitted on all its OOF, fold k's rows
    too: its OOF with fold k held out is read under the blend refitted without them."""
    differs = False
    for run in members:
        m = member_probs(run)
        oof, task, cfg = m["oof"], m["task"], m["cfg"]
        heads = build_task(cfg)[1]
        assert load_decision(RunDir(run).round_dir(0)).blend  # the built-in auxiliary regression head, blended
        refit_cfg = cfg.model_copy(update={"decide": cfg.decide.model_copy(update={"offsets": "none"})})
        for k in (0, 1):
            fit = oof["fold"] != k
            d = fit_decision(task, heads, {h: p[fit] for h, p in head_probs(oof).items()}, oof["factors"][fit],
                             {key[6:]: v[fit] for key, v in oof.items() if key.startswith("value_")}, refit_cfg)
            expected = predict_classes(task, heads, head_probs(oof), cfg, blend_only(d))[0]
            assert np.allclose(m["oof_without"](k), expected)
            differs |= not np.allclose(expected, m["oof_probs"])
    assert differs  # the case tells the refitted blend from the kept one


def test_a_nested_ensembles_honest_figures_refit_the_inner_weights_too(members, tmp_path):
    # an ensemble member's stored vote has weights fitted on every fold: with fold k held out, its
    # weights refitted without fold k are what the outer weights may be fitted on and scored with
    a, b = members
    inner, outer = tmp_path / "inner", tmp_path / "outer"
    make_ensemble([a, b], inner)
    summary = make_ensemble([inner, a], outer)
    ens = load_run_config(RunDir(inner)).ensemble
    task, _ = build_task(load_run_config(RunDir(outer)))
    wa, wb = member_probs(a)["oof_without"], member_probs(b)["oof_without"]
    oof = load_npz(RunDir(outer).round_dir(0) / "oof.npz")
    y, folds = task.encode(oof["factors"]), oof["fold"]
    classes, leaky = np.zeros(len(y), np.int64), np.zeros(len(y), np.int64)
    for k in np.unique(folds):
        fit, held = folds != k, folds == k
        pa, pb = wa(k), wb(k)
        for voted, out in ((weighted([pa, pb], ens.fold_weights[k]), classes), (weighted([pa, pb], ens.weights), leaky)):
            w = fit_weights([voted[fit], pa[fit]], y[fit], task.n_classes)
            out[held] = weighted([voted[held], pa[held]], w).argmax(1)
    assert not np.array_equal(classes, leaky)  # the case tells the two apart
    assert summary["oof_weights_honest"]["f1"] == macro_f1(y, classes, task.n_classes)


def test_a_moved_member_is_named_with_the_way_to_follow_it(members, demo_root, tmp_path):
    """An ensemble reads its members' models where they were: moved, it said only that a config.yaml
    was not found; its place may be rewritten in the ensemble's config.yaml, and predictions follow."""
    import yaml

    a, b = members
    shutil.copytree(a, tmp_path / "a")
    ens = tmp_path / "ens"
    make_ensemble([tmp_path / "a", b], ens)
    predict_images(ens, demo_root / "eval" / "images", tmp_path / "before.csv")
    (tmp_path / "a").rename(tmp_path / "a_moved")
    with pytest.raises(RunError, match=rf"{tmp_path / 'a'}: the ensemble's member run is not there; if it moved, "
                                       r"write its new place in ensemble.runs of the ensemble's config.yaml"):
        predict_images(ens, demo_root / "eval" / "images", tmp_path / "after.csv")
    cfg = yaml.safe_load(RunDir(ens).config.read_text())
    cfg["ensemble"]["runs"][0] = "../a_moved"  # relative: to config.yaml's folder (it was to the working directory)
    RunDir(ens).config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    predict_images(ens, demo_root / "eval" / "images", tmp_path / "after.csv")
    assert pd.read_csv(tmp_path / "after.csv").equals(pd.read_csv(tmp_path / "before.csv"))


def test_an_ensemble_run_cannot_be_trained_further(members, tmp_path):
    out = tmp_path / "ens"
    make_ensemble(list(members), out)
    with pytest.raises(ConfigError, match="no models of its own"):
        pseudo_label(out, precision=0.0)


def fold_probs(run, k):
    """A run's fold-k final-class probabilities of the test images, from its files, with its auxiliary
    blend as fitted on its OOF without fold k (fold k's labels must not come from a blend that saw it)."""
    cfg = load_run_config(RunDir(run))
    task, heads = build_task(cfg)
    test = load_npz(RunDir(run).fold_dir(0, k) / "test.npz")
    oof = load_npz(RunDir(run).round_dir(0) / "oof.npz")
    fit = oof["fold"] != k
    refit_cfg = cfg.model_copy(update={"decide": cfg.decide.model_copy(update={"offsets": "none"})})
    values = {key[6:]: v[fit] for key, v in oof.items() if key.startswith("value_")}
    blend = blend_only(fit_decision(task, heads, {h: p[fit] for h, p in head_probs(oof).items()}, oof["factors"][fit],
                                    values, refit_cfg))
    return predict_classes(task, heads, head_probs(test), cfg, blend)[0]


def test_pseudo_labels_from_an_ensemble_come_from_its_members_fold_k_models(members, tmp_path):
    a, b = members
    ens = tmp_path / "ens"
    make_ensemble([a, b], ens)
    ids = load_npz(RunDir(a).fold_dir(0, 0) / "test.npz")["image_id"]
    votes = fold_votes(ens, ids)
    task = build_task(load_run_config(RunDir(ens)))[0]
    oof = load_npz(RunDir(ens).round_dir(0) / "oof.npz")
    without, y, folds = [member_probs(r)["oof_without"] for r in (a, b)], task.encode(oof["factors"]), oof["fold"]
    for k in (0, 1):  # weighted as fitted without fold k: no fold's labels are voted by weights fitted on it
        w = fit_weights([p(k)[folds != k] for p in without], y[folds != k], task.n_classes)
        assert load_run_config(RunDir(ens)).ensemble.fold_weights[k] == pytest.approx(list(w))
        assert np.allclose(votes[k], sum(wi * fold_probs(m, k) for wi, m in zip(w, (a, b))), atol=1e-6)
    assert not np.allclose(votes[0], votes[1])  # each fold its own models

    run = tmp_path / "a"
    shutil.copytree(a, run)
    report = pseudo_label(run, precision=0.0, rounds=1, labels_from=ens)[0]
    assert report["trained"] and report["added"] == len(ids)
    assert Path(read_json(RunDir(run).round_dir(1) / "pseudo.json")["labels_from"]).resolve() == ens.resolve()
    labels = pd.read_csv(RunDir(run).round_dir(1) / "pseudo.csv")
    cfg = load_run_config(RunDir(ens))
    task, heads = build_task(cfg)
    for k in (0, 1):
        combined = predict_classes(task, heads, {"class": votes[k]}, cfg, load_decision(RunDir(ens).round_dir(0)))[0]
        rows = labels[labels["fold"] == k]
        assert rows["ImageID"].tolist() == ids.tolist()
        for i, f in enumerate(task.factors):
            assert (rows[f.name].to_numpy() == task.marginal(combined, i).argmax(1)).all()


def test_an_ensemble_among_the_members_votes_its_own_fold_k_models(members, tmp_path):
    a, b = members
    inner = tmp_path / "inner"
    make_ensemble([a, b], inner)
    outer = tmp_path / "outer"
    weights = [m["weight"] for m in make_ensemble([inner, b], outer, weights=[3, 1])["members"]]
    ids = load_npz(RunDir(a).fold_dir(0, 0) / "test.npz")["image_id"]
    inner_votes, votes = fold_votes(inner, ids), fold_votes(outer, ids)
    for k in (0, 1):
        assert np.allclose(votes[k], weights[0] * inner_votes[k] + weights[1] * fold_probs(b, k), atol=1e-6)
        assert np.allclose(votes[k].sum(1), 1, atol=1e-5)


def test_an_interrupted_ensemble_leaves_nothing_behind(members, tmp_path, monkeypatch):
    import multitask.ensemble as ensemble

    a, b = members
    out = tmp_path / "ens"
    with stopped_in(monkeypatch, ensemble, "decide_round"):  # while it fits the decision
        make_ensemble([a, b], out)
    assert not out.exists() and not list(tmp_path.iterdir())  # nor the staging folder beside it
    make_ensemble([a, b], out)  # the retry is not taken for a finished run
    assert (out / "summary.json").exists() and make_submission(out).exists()
    # into a folder that holds other files: they stay, and the run joins them
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    make_ensemble([a, b], other)
    assert (other / "notes.txt").read_text() == "mine" and (other / "config.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens", "other"]


def test_cli_soft_labels_from_another_run(members, tmp_path):
    a, b = members
    run = tmp_path / "b"
    shutil.copytree(b, run)
    result = CliRunner().invoke(app, ["pseudo-label", "--run", str(run), "--soft", "--labels-from", str(a)])
    assert result.exit_code == 0, result.output
    soft = load_npz(RunDir(run).round_dir(1) / SOFT_FILE)
    for k in (0, 1):  # fold k of the joined-head run learns run a's fold-k probabilities
        assert np.allclose(soft[f"fold{k}"], fold_probs(a, k), atol=1e-6)


def test_fit_weights_prefers_the_better_run():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    good = np.eye(3)[y] * 0.6 + 0.4 / 3
    noise = rng.dirichlet(np.ones(3), 500)
    w = fit_weights([noise, good], y, 3)
    assert w[1] > w[0]


def test_fit_weights_climbs_where_the_grid_is_too_large():
    from multitask.ensemble import MAX_GRID, simplex_grid

    assert sum(1 for _ in simplex_grid(5, 20)) <= MAX_GRID < sum(1 for _ in simplex_grid(6, 20))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    probs = [rng.dirichlet(np.ones(3), 500) for _ in range(7)]
    probs[4] = np.eye(3)[y] * 0.6 + 0.4 / 3
    w = fit_weights(probs, y, 3)  # 7 members: 230,230 points on the grid, scored as a climb instead
    assert np.isclose(w.sum(), 1) and np.allclose(w * 20, np.round(w * 20)) and w.argmax() == 4
    score = lambda v: macro_f1(y, weighted(probs, v).argmax(1), 3)  # noqa: E731
    assert score(w) >= score(np.full(7, 1 / 7))


def test_cli_ensemble(members, tmp_path):
    a, b = members
    result = CliRunner().invoke(app, ["ensemble", "--runs", str(a), "--runs", str(b), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "ensemble out-of-fold" in result.output and "mask read off the voted final class" in result.output
    assert "own argmax" not in result.output  # an ensemble has no heads but the final class
    assert read_json(tmp_path / "e" / "summary.json")["latest_round"] == 0
    result = CliRunner().invoke(app, ["ensemble", "--runs", str(a), "--runs", str(b), "--out", str(tmp_path / "e2"),
                                      "--weights", "a,b"])
    assert result.exit_code == 2 and "--weights 'a,b': a comma list of numbers, one per run" in result.output


def test_cli_ensemble_takes_the_runs_listed_after_one_flag(members, tmp_path):
    a, b = members  # the issue's own form, `--runs RUN1 RUN2 ... --out RUN`
    result = CliRunner().invoke(app, ["ensemble", "--runs", str(a), str(b), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert [m["run"] for m in read_json(tmp_path / "e" / "round0" / "summary.json")["members"]] == [str(a), str(b)]
