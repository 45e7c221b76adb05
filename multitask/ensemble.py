"""`mt ensemble`: a weighted soft vote across finished runs (other backbones, seeds, head layouts),
written as a run directory of its own that `submit` and `predict` accept.

Each member's round that `submit` would use (its best OOF) gives final-class probabilities (its heads' product with its own
auxiliary blend); the ensemble averages them with weights fitted on the members' OOF for macro F1.
That only means something when every member's OOF row was predicted by a model that did not see it
under the same split, so the runs must share folds.csv. The weights are fitted on OOF, so their
gain is reported fold-honestly too (refitted without each fold, scored on it).

The ensemble run holds config.yaml (the first member's, with `heads: class` and `ensemble:` naming
the members and their weights), folds.csv, round0/{oof.npz, test_probs.npz, summary.json} and the
decision fitted on its own OOF (decide: in the config).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from multitask.config import Config, ConfigError, EnsembleCfg, dump_config
from multitask.context import build_task, check_ensemble_members, check_round, load_run_config
from multitask.data.folds import read_folds
from multitask.decide import (Decision, blend_only, decide_round, fit_decision, is_active, load_decision,
                              predict_classes, take)
from multitask.labels import FLAT_HEAD, Head, Task
from multitask.metrics import macro_f1, score_classes
from multitask.run import RunDir, atomic_write_text, head_probs, load_npz, read_json, save_npz, staged_dir, write_json

WEIGHT_STEP = 0.05


def member_probs(run_dir: Path, r: int | None = None) -> dict:
    """A finished run's round `r`, by default the chosen one (the one `submit` uses): OOF and test
    final-class probabilities, with its blend."""
    run = RunDir(run_dir)
    cfg = load_run_config(run)
    task, heads = build_task(cfg)
    if r is None:
        r, _ = run.choose_round(cfg.train.folds, can_pick=False)
    check_round(run, r, cfg)
    blend = blend_only(load_decision(run.round_dir(r)))
    oof = load_npz(run.round_dir(r) / "oof.npz")
    test_path = run.round_dir(r) / "test_probs.npz"
    test = load_npz(test_path) if test_path.exists() else None
    probs = lambda z, d=blend: predict_classes(task, heads, head_probs(z), cfg, d)[0]  # noqa: E731
    oof_probs = probs(oof)
    # fold k held out: an ensemble's vote with its weights refitted without fold k (they saw it
    # otherwise), or a run's OOF under its blend refitted without fold k
    inner = oof_votes_without(cfg)
    refit = blends_without(task, heads, cfg, blend, oof)
    if inner is not None:
        without = lambda k: inner(k)[FLAT_HEAD]  # noqa: E731
    elif refit is not None:
        without = lambda k: probs(oof, refit(k))  # noqa: E731
    else:
        without = lambda k: oof_probs  # noqa: E731
    return {"cfg": cfg, "task": task, "round": r, "train_ids": run.round_train_ids(r) or {}, "oof": oof,
            "oof_probs": oof_probs, "oof_without": without,
            "test_ids": test["image_id"] if test is not None else None,
            "test_likeness": {"likeness": test["likeness"]} if test is not None and "likeness" in test else {},
            "test_probs": probs(test) if test is not None else None}


def blends_without(task: Task, heads: list[Head], cfg: Config, blend: Decision | None,
                   oof: dict) -> Callable[[int], Decision] | None:
    """A run's auxiliary blend (its weights, a regression's spread) refitted on its OOF without fold k,
    once per fold: the blend it keeps (`blend`) was fitted on every fold, fold k's rows too, so the
    figures an ensemble calls fold-honest, and fold k's pseudo labels, read this one. None where the
    kept blend stands: there is none, or the OOF is of one fold (a refit would be fitted on no row)."""
    if blend is None or not blend.blend or len(np.unique(oof["fold"])) < 2:
        return None
    fit_cfg = cfg.model_copy(update={"decide": cfg.decide.model_copy(update={"offsets": "none"})})
    probs, values = head_probs(oof), {key[len("value_"):]: v for key, v in oof.items() if key.startswith("value_")}
    fitted: dict[int, Decision] = {}

    def refit(k: int) -> Decision:
        if k not in fitted:
            rows = np.flatnonzero(oof["fold"] != k)
            fitted[k] = blend_only(fit_decision(task, heads, take(probs, rows), oof["factors"][rows], take(values, rows),
                                                fit_cfg))
        return fitted[k]
    return refit


def check_same_split(run: Path, other: Path, why: str) -> None:
    split = lambda r: read_folds(RunDir(r).folds)[["group", "fold"]]  # noqa: E731 (labels digests kept or not)
    if not split(run).equals(split(other)):
        raise ConfigError(f"{RunDir(run).folds} differs from {RunDir(other).folds}: {why}, which needs both runs to "
                          f"share one split (same data, train.folds and train.fold_seed)")


def check_members(runs: list[Path], members: list[dict]) -> None:
    for path, m in zip(runs[1:], members[1:]):
        check_same_split(path, runs[0], "an ensemble's weights are fitted on OOF")
        if m["task"].factors != members[0]["task"].factors:
            raise ConfigError(f"{path} predicts other factors than {runs[0]}: {m['task'].factor_names} vs "
                              f"{members[0]['task'].factor_names}")
        if not np.array_equal(m["oof"]["rows"], members[0]["oof"]["rows"]):
            raise ConfigError(f"{path}'s OOF rows differ from {runs[0]}'s (a fold missing in one of them?)")
        ids, first_ids = m["test_ids"], members[0]["test_ids"]
        if (ids is None) != (first_ids is None) or (ids is not None and not np.array_equal(ids, first_ids)):
            raise ConfigError(f"{path}'s test images differ from {runs[0]}'s")


def fold_test_probs(run: RunDir, r: int, test_ids: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    """Round r of another run, fold by fold: its head probabilities of the test images, checked to be
    made for exactly these test images. The caller checks the round (context.check_round, or
    check_ensemble_members for an ensemble's members), once."""
    out = {}
    for k in read_json(run.round_dir(r) / "summary.json")["folds_done"]:
        test = load_npz(run.fold_dir(r, k) / "test.npz")
        if not np.array_equal(test["image_id"], test_ids):
            raise ConfigError(f"{run.fold_dir(r, k) / 'test.npz'}: predicted for other test images than this run's")
        out[k] = head_probs(test)
    return out


def fold_votes(run_dir: Path, test_ids: np.ndarray) -> dict[int, np.ndarray]:
    """Per fold k, the ensemble's weighted vote of its members' fold-k models on the test images (each
    member's auxiliary blend in, offsets out). Fold k of every member validated on fold k's groups
    and never trained on them, and fitted weights are those refitted without fold k, so fold k of a
    run under the same split may learn from this vote."""
    cfg = load_run_config(RunDir(run_dir))
    votes: dict[int, np.ndarray] = {}
    total: dict[int, float] = {}
    check_ensemble_members(cfg)
    ens = cfg.ensemble
    for i, (path, r, w) in enumerate(zip(ens.runs, ens.rounds, ens.weights)):
        run = RunDir(path)
        member = load_run_config(run)
        if member.ensemble is not None:  # an ensemble among the members has no fold models: its own fold-k votes
            member_votes = fold_votes(run.root, test_ids)
        else:
            task, heads = build_task(member)
            blend = blend_only(load_decision(run.round_dir(r)))
            # fold k reads the blend fitted without its groups (the OOF is read only where there is a blend)
            refit = (blends_without(task, heads, member, blend, load_npz(run.round_dir(r) / "oof.npz"))
                     if blend is not None and blend.blend else None)
            blend_of = refit or (lambda k: blend)
            member_votes = {k: predict_classes(task, heads, probs, member, blend_of(k))[0]
                            for k, probs in fold_test_probs(run, r, test_ids).items()}
        for k, p in member_votes.items():
            wk = ens.fold_weights[k][i] if ens.fold_weights else w
            votes[k] = votes.get(k, 0) + wk * p
            total[k] = total.get(k, 0) + wk
    return {k: v / total[k] for k, v in votes.items() if total[k] > 0}


def oof_votes_without(cfg) -> Callable[[int], dict[str, np.ndarray]] | None:
    """An ensemble's OOF vote as it would be had fold k been left out of its weights' fit, from its
    members' OOF (decide.honest_scores' `probs_without`); None for a run that is not such an ensemble.
    A decision refitted on an ensemble's stored OOF vote is fold-honest only with it."""
    ens = cfg.ensemble
    if ens is None:
        return None
    # the members' rounds the ensemble voted, whichever each would choose now (a later pseudo-label round)
    members = [member_probs(Path(run), r) for run, r in zip(ens.runs, ens.rounds)]
    weights = held_out_weights(ens.fold_weights, ens.weights, members[0]["oof"]["fold"])
    return votes_without([m["oof_without"] for m in members], weights) if weights else None


def held_out_weights(fold_weights: dict | None, weights, folds: np.ndarray) -> dict | None:
    """The weights fold k's held-out vote takes: those refitted without it, else the given ones, the
    same for every fold (the members' blends are still refitted without it); None for OOF of one
    fold, where nothing is fitted without it."""
    if len(np.unique(folds)) < 2:
        return None
    return fold_weights or {int(k): weights for k in np.unique(folds)}


Without = Callable[[int], np.ndarray]  # a member's OOF probabilities with fold k held out of every fit


def votes_without(probs: list[Without],
                  fold_weights: dict[int, np.ndarray]) -> Callable[[int], dict[str, np.ndarray]]:
    return lambda k: {FLAT_HEAD: weighted([p(k) for p in probs], fold_weights[k])}


def weighted(probs: list[np.ndarray], w) -> np.ndarray:
    return sum(wi * p for wi, p in zip(w, probs))


MAX_GRID = 20_000  # weight vectors tried exhaustively: five members (10,626); more climb instead


def simplex_grid(n: int, steps: int) -> Iterator[np.ndarray]:
    """Every split of `steps` steps among n members (stars and bars), as counts."""
    for bars in itertools.combinations(range(steps + n - 1), n - 1):
        edges = np.array([-1, *bars, steps + n - 1])
        yield np.diff(edges) - 1


def fit_weights(probs: list[np.ndarray], y: np.ndarray, n_classes: int) -> np.ndarray:
    """Weights on a grid over the simplex (step 0.05) for the best OOF macro F1 of the weighted vote;
    among equals, the most even. Every point of the grid up to five members; beyond, the grid grows
    past what a fit (refitted once per fold) can score, so the weights climb from even ones, a step
    moved from one member to another at a time, while that gains."""
    steps, n = round(1 / WEIGHT_STEP), len(probs)
    score = lambda counts: macro_f1(y, weighted(probs, counts / steps).argmax(1), n_classes)  # noqa: E731
    if math.comb(steps + n - 1, n - 1) <= MAX_GRID:
        best, best_c = -1.0, None
        for c in simplex_grid(n, steps):
            s = score(c)
            if s > best + 1e-9 or (abs(s - best) <= 1e-9 and np.ptp(c) < np.ptp(best_c)):
                best, best_c = s, c
        return best_c / steps
    c = np.full(n, steps // n)
    c[: steps - c.sum()] += 1
    best = score(c)
    while True:
        moves = [(i, j) for i in range(n) for j in range(n) if i != j and c[i] > 0]
        gains = []
        for i, j in moves:
            trial = c.copy()
            trial[i] -= 1
            trial[j] += 1
            gains.append(score(trial))
        if not gains or max(gains) <= best + 1e-9:
            return c / steps
        i, j = moves[int(np.argmax(gains))]
        c[i] -= 1
        c[j] += 1
        best = max(gains)


def weights_without(probs: list[Without], y: np.ndarray, folds: np.ndarray, n_classes: int) -> dict[int, np.ndarray]:
    """The weights refitted without each fold: fold k is scored by weights that never saw it, fitted
    on members whose own fitted parts (an ensemble member's weights) never saw it either."""
    return {k: fit_weights([p(k)[folds != k] for p in probs], y[folds != k], n_classes) for k in np.unique(folds)}


def honest_weights_score(probs: list[Without], factors: np.ndarray, folds: np.ndarray, task,
                         fold_weights: dict[int, np.ndarray]) -> dict:
    classes = np.zeros(len(factors), np.int64)
    for k, w in fold_weights.items():
        held = folds == k
        classes[held] = weighted([p(k)[held] for p in probs], w).argmax(1)
    return score_classes(task, classes, factors)


def make_ensemble(runs: list[str | Path], out: str | Path, weights: list[float] | None = None) -> dict:
    """Vote `runs` into the run directory `out`; weights fitted on OOF unless given."""
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ConfigError("an ensemble needs at least two runs")
    seen = {}
    for r in runs:  # a run twice would only weigh itself up: a slip of the command line
        if r.resolve() in seen:
            raise ConfigError(f"{r} is given twice (as {seen[r.resolve()]} too); an ensemble votes different runs")
        seen[r.resolve()] = r
    if RunDir(out).config.exists():
        raise ConfigError(f"{out} already holds a run; choose another --out")
    members = [member_probs(r) for r in runs]
    check_members(runs, members)
    task, oof = members[0]["task"], members[0]["oof"]
    factors, folds = oof["factors"], oof["fold"]
    oof_probs = [m["oof_probs"] for m in members]
    without = [m["oof_without"] for m in members]
    # one fold: weights refitted without it would be fitted on no row (and read as fold-honest)
    fold_weights = (weights_without(without, task.encode(factors), folds, task.n_classes)
                    if weights is None and len(np.unique(folds)) > 1 else None)
    if weights is None:
        w = fit_weights(oof_probs, task.encode(factors), task.n_classes)
    else:
        if (len(weights) != len(runs) or not all(math.isfinite(x) and x >= 0 for x in weights)
                or sum(weights) <= 0):
            raise ConfigError(f"weights {weights}: one finite, non-negative weight per run, not all zero")
        w = np.asarray(weights, float) / sum(weights)
    cfg = members[0]["cfg"].model_copy(update={
        "heads": FLAT_HEAD, "numeric": {}, "losses": {},
        "ensemble": EnsembleCfg(runs=[str(r.resolve()) for r in runs], rounds=[m["round"] for m in members],
                                weights=[float(x) for x in w], train_ids=[m["train_ids"] for m in members],
                                fold_weights={int(k): [float(x) for x in v] for k, v in fold_weights.items()}
                                if fold_weights is not None else None)})
    task, heads = build_task(cfg)
    # built aside and moved to `out` whole: an ensemble stopped while its decision is fitted leaves
    # nothing there that a retry would take for a finished run
    with staged_dir(Path(out)) as staging:
        run = RunDir(staging)
        atomic_write_text(run.config, dump_config(cfg))
        atomic_write_text(run.folds, RunDir(runs[0]).folds.read_text(encoding="utf-8"))
        if RunDir(runs[0]).skipped.exists():  # members trained with --skip-bad: the same rows, as their folds agree
            atomic_write_text(run.skipped, RunDir(runs[0]).skipped.read_text(encoding="utf-8"))
        voted = weighted(oof_probs, w)
        save_npz(run.round_dir(0) / "oof.npz", **{k: v for k, v in oof.items() if not k.startswith("p_")}, p_class=voted)
        if members[0]["test_probs"] is not None:
            save_npz(run.round_dir(0) / "test_probs.npz", image_id=members[0]["test_ids"],
                     p_class=weighted([m["test_probs"] for m in members], w), **members[0]["test_likeness"])
        summary = {"round": 0, "folds_done": read_json(RunDir(runs[0]).round_dir(members[0]["round"]) / "summary.json")["folds_done"],
                   "members": [{"run": str(r), "round": m["round"], "weight": float(x), "oof": score_classes(task, m["oof_probs"].argmax(1), factors)}
                               for r, m, x in zip(runs, members, w)],
                   "oof": score_classes(task, voted.argmax(1), factors),
                   "oof_weights_honest": honest_weights_score(without, factors, folds, task, fold_weights)
                   if fold_weights is not None else None}
        if is_active(task, cfg):
            # fold-honest: fold k's decision is fitted on a vote whose weights (where fitted) and members'
            # auxiliary blends never saw fold k
            held_out = held_out_weights(fold_weights, w, folds)
            voted_without = votes_without(without, held_out) if held_out else None
            summary["decision"] = decide_round(run.round_dir(0), task, heads, {FLAT_HEAD: voted}, factors, {}, folds, cfg,
                                               oof.get("likeness"), voted_without)
        write_json(run.round_dir(0) / "summary.json", summary)
        write_json(run.summary, {"latest_round": 0, "rounds": [summary]})
    return summary
