"""The final decision, fitted on the round's OOF probabilities for macro F1, and its honest estimate.

Three steps, each switchable in `decide:` of the config:
1. Each auxiliary numeric output is read as bin probabilities and blended into its factor:
   q = (1 - w)·p_factor + w·p_aux, the final-class probabilities rescaled so the factor's marginal
   becomes q (any head layout: the factor's marginal is summed out of the final class).
2. Where pictures come in subjects (`decide.subjects`), the factors a subject keeps are moved
   towards those of its clearest picture in the same way (subjects.py); this needs the pictures'
   likeness, so it applies to a set of pictures (OOF, the test set), not to one.
3. Additive log-prior offsets, per factor class (b_class = Σ_f b_f[class_f]) or per final class:
   argmax(log p + b). Argmax is the decision that maximises accuracy; macro F1 rewards the rare classes
   more, and offsets move the boundaries towards them.

Everything fitted here is fitted on OOF rows, so its OOF score is optimistic. `honest_scores` refits
it on every fold's complement and scores it on that fold alone: the figure to believe. The fitted
decision goes to roundN/decision.json; submit and predict apply it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from multitask.config import Config
from multitask.labels import Head, Task
from multitask.metrics import macro_f1, score_classes
from multitask.numeric import aux_bins, aux_name, numerics, regression_sigma
from multitask.outputs import LOG_FLOOR, decide_classes
from multitask.run import read_json, write_json
from multitask.subjects import Pictures, move_to_anchors, read_subjects, subject_anchors, subject_spec

OFFSET_GRID = np.linspace(-2, 2, 17)
BLEND_GRID = np.linspace(0, 1, 11)


@dataclass
class Decision:
    blend: dict[str, float] = field(default_factory=dict)  # numeric factor -> weight of its auxiliary output
    sigma: dict[str, float] = field(default_factory=dict)  # regression factor -> spread of its number
    grid: dict[str, list[float]] = field(default_factory=dict)  # distribution factor -> its fine edges
    offsets: list[float] | None = None  # per final class, added to the log-probabilities
    subjects: float = 0.0  # weight of a subject's clearest picture in the factors it keeps


def aux_kinds(task: Task, cfg: Config) -> dict[str, str]:
    return {n.factor.name: n.cfg.aux for n in numerics(task, cfg) if n.cfg.aux != "none"}


def final_probs(task: Task, heads: list[Head], probs: dict[str, np.ndarray], kinds: dict[str, str],
                decision: Decision, spec: tuple | None = None, pictures: Pictures | None = None) -> np.ndarray:
    """Final-class probabilities: the heads' product, with each auxiliary output blended in, then
    subjects read where `spec` (subjects.subject_spec) and the pictures' likeness are given."""
    combined = task.combine(heads, probs)
    for name, w in decision.blend.items():
        if w <= 0:
            continue
        i = task.factor_names.index(name)
        factor = task.factors[i]
        q_aux = aux_bins(factor, kinds[name], probs[aux_name(name)], decision.sigma.get(name), decision.grid.get(name))
        combined = task.with_marginal(combined, i, (1 - w) * task.marginal(combined, i) + w * q_aux)
    if decision.subjects > 0 and spec is not None and pictures is not None:
        combined = read_subjects(task, combined, spec, decision.subjects, pictures)
    return combined


def offset_design(task: Task, mode: str) -> np.ndarray:
    """(parameters, classes): which final classes each offset parameter adds to."""
    if mode == "class":
        return np.eye(task.n_classes)
    codes = task.decode(np.arange(task.n_classes))
    return np.concatenate([(codes[:, i][None, :] == np.arange(f.n)[:, None]).astype(float)
                           for i, f in enumerate(task.factors)])


def fit_offsets(task: Task, combined: np.ndarray, y: np.ndarray, mode: str, passes: int = 3) -> np.ndarray:
    """Coordinate ascent over a grid of each offset parameter, for macro F1 of the final class."""
    design = offset_design(task, mode)
    logp = np.log(combined.astype(np.float64) + LOG_FLOOR)  # as decide_classes applies them, computed once
    theta = np.zeros(len(design))
    score = lambda t: macro_f1(y, (logp + t @ design).argmax(1), task.n_classes)  # noqa: E731
    best = score(theta)
    for _ in range(passes):
        improved = False
        for j in range(len(theta)):
            keep = theta[j]
            for g in OFFSET_GRID:
                theta[j] = g
                s = score(theta)
                if s > best + 1e-9:
                    best, keep, improved = s, g, True
            theta[j] = keep
        if not improved:
            break
    return theta @ design


def fit_decision(task: Task, heads: list[Head], probs: dict[str, np.ndarray], factors: np.ndarray,
                 values: dict[str, np.ndarray], cfg: Config, pictures: Pictures | None = None) -> Decision:
    """Spread of each regression, blend weights, the subjects' weight, then offsets, all on the rows given."""
    kinds = aux_kinds(task, cfg) if cfg.decide.blend_aux else {}
    y = task.encode(factors)
    d = Decision()
    for n in numerics(task, cfg):
        name = n.factor.name
        if kinds.get(name) == "regression":
            d.sigma[name] = regression_sigma(n.factor, probs[aux_name(name)], values[name])
        if kinds.get(name) == "distribution":
            d.grid[name] = n.grid.tolist()
    for name in kinds:
        scores = []
        for w in BLEND_GRID:
            trial = Decision(d.blend | {name: float(w)}, d.sigma, d.grid)
            scores.append(macro_f1(y, final_probs(task, heads, probs, kinds, trial).argmax(1), task.n_classes))
        d.blend[name] = float(BLEND_GRID[int(np.argmax(scores))])  # the first best: the smallest weight
    spec = subject_spec(task, cfg) if pictures is not None else None
    if spec is not None:
        blended = final_probs(task, heads, probs, kinds, d)
        anchor_of = subject_anchors(task, blended, spec, pictures)  # the weight moves no anchor: match once
        scores = [macro_f1(y, move_to_anchors(task, blended, spec, float(w), anchor_of).argmax(1), task.n_classes)
                  for w in BLEND_GRID]
        d.subjects = float(BLEND_GRID[int(np.argmax(scores))])
    if cfg.decide.offsets != "none":
        d.offsets = fit_offsets(task, final_probs(task, heads, probs, kinds, d, spec, pictures), y,
                                cfg.decide.offsets).tolist()
    return d


def predict_classes(task: Task, heads: list[Head], probs: dict[str, np.ndarray], cfg: Config,
                    decision: Decision | None, pictures: Pictures | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(final-class probabilities, final classes) under a decision (None: the heads' product, argmax);
    subjects are read only where the pictures' likeness is given."""
    d = decision or Decision()
    spec = subject_spec(task, cfg) if pictures is not None else None
    combined = final_probs(task, heads, probs, aux_kinds(task, cfg), d, spec, pictures)
    return combined, decide_classes(combined, d.offsets)


def take(d: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in d.items()}


def honest_scores(task: Task, heads: list[Head], probs: dict[str, np.ndarray], factors: np.ndarray,
                  values: dict[str, np.ndarray], folds: np.ndarray, cfg: Config,
                  pictures: Pictures | None = None,
                  probs_without: Callable[[int], dict[str, np.ndarray]] | None = None) -> dict | None:
    """The decision refitted without each fold and applied to that fold only; scored over all rows.
    `probs_without(k)`: the probabilities as they would be had fold k been left out of what made
    them (an ensemble's vote with its weights refitted without fold k); `probs` where not given.
    None for OOF of one fold: there the decision would be refitted on no row at all, and score the
    plain argmax under the name of a decision that `mt submit` never applies."""
    if len(np.unique(folds)) < 2:
        return None
    classes = np.zeros(len(factors), np.int64)
    part = lambda rows: pictures.take(rows) if pictures is not None else None  # noqa: E731
    for k in np.unique(folds):
        fit_rows, held = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        p = probs_without(k) if probs_without is not None else probs
        d = fit_decision(task, heads, take(p, fit_rows), factors[fit_rows], take(values, fit_rows), cfg,
                         part(fit_rows))
        classes[held] = predict_classes(task, heads, take(p, held), cfg, d, part(held))[1]
    return score_classes(task, classes, factors)


def is_active(task: Task, cfg: Config) -> bool:
    return (cfg.decide.offsets != "none" or cfg.decide.subjects is not None
            or (cfg.decide.blend_aux and bool(aux_kinds(task, cfg))))


def honest_f1(summary: dict) -> float | None:
    """A round's final-class macro F1 under its decision, fold-honest (decide_round's report, which
    the round summary keeps); None for a round without a decision."""
    return ((summary.get("decision") or {}).get("honest") or {}).get("f1")


def decide_round(round_dir: Path, task: Task, heads: list[Head], probs: dict[str, np.ndarray],
                 factors: np.ndarray, values: dict[str, np.ndarray], folds: np.ndarray, cfg: Config,
                 look: np.ndarray | None = None,
                 probs_without: Callable[[int], dict[str, np.ndarray]] | None = None) -> dict:
    """Fit the decision on the round's OOF, write decision.json, and report OOF macro F1 three ways:
    plain argmax, the decision in-sample (optimistic), and fold-honest (`probs_without`: see
    honest_scores). With the pictures' likeness (`look`), subjects are matched within each fold:
    the pictures one fold model predicted."""
    pictures = Pictures(look, folds) if look is not None else None
    d = fit_decision(task, heads, probs, factors, values, cfg, pictures)
    report = {
        "argmax": score_classes(task, task.combine(heads, probs).argmax(1), factors),
        "in_sample": score_classes(task, predict_classes(task, heads, probs, cfg, d, pictures)[1], factors),
        "honest": honest_scores(task, heads, probs, factors, values, folds, cfg, pictures, probs_without),
    }
    write_json(round_dir / "decision.json", {"decision": asdict(d), "oof": report})
    return report


def blend_only(decision: Decision | None) -> Decision | None:
    """A decision's auxiliary blend without its offsets or subjects: what a run contributes to a vote
    of runs, one picture at a time."""
    return Decision(decision.blend, decision.sigma, decision.grid) if decision else None


def load_decision(round_dir: Path) -> Decision | None:
    path = round_dir / "decision.json"
    return Decision(**read_json(path)["decision"]) if path.exists() else None
