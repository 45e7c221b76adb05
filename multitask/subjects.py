"""Subjects: the pictures of one person in a set of predictions, found by their likeness, and the
factors a person keeps in every picture read from the picture that shows them best.

In the competition each person has seven pictures (five masks, one worn wrongly, one without), and
gender and age are the same in all of them, but the unmasked picture shows them best. Test pictures
carry no person id, so each picture is matched to the most alike *anchor*: a picture whose
predicted class of the anchor factor (`decide.subjects.anchor`, e.g. `mask=not_worn`) marks it as a
subject's clearest. The likeness compares what a face covering never hides, the top half of the
picture and its left and right edges (hair, forehead, background, clothes), as the mean colours
of an 8 x 8 grid. On the real-face build this finds the right anchor for 96% of training pictures (a fold's
validation persons, docs/RESULTS.md).

The subject's factors are then (1 - w)·own + w·anchor's, per factor, with w fitted on OOF like
every other part of the decision (decide.py). Galleries keep matching apart where the pictures are
not one set: OOF pictures match within their fold, as the test pictures match within the test set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from multitask.config import Config, ConfigError
from multitask.labels import Task

GRID = 8  # the likeness is the mean colour of GRID x GRID cells of the picture
CHUNK = 4096  # pictures matched at a time: (CHUNK x anchors) similarities in memory
READ_CHUNK = 256  # pictures turned into floats at a time (256 x 256 x 192 x 3 floats: 150 MB)
IPF_PASSES = 100  # rescaling passes at most: separate heads settle in one; a confident joined head's
# correlated factors can still be 1e-3 off their targets after 100 (logits spread 3 wide), which moves a
# class only at a near tie
IPF_TOL = 1e-6  # the largest gap between a kept marginal and its target that ends the passes


@dataclass
class Pictures:
    """What reading subjects needs beside the probabilities: each picture's likeness, and the
    gallery each matches within (None: all one set)."""
    look: np.ndarray
    galleries: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> Pictures:
        return Pictures(self.look[rows], None if self.galleries is None else self.galleries[rows])


def stored_pictures(z: dict[str, np.ndarray]) -> Pictures | None:
    """The pictures' likeness a round's oof.npz or test_probs.npz holds (written where subjects are
    read), OOF pictures matched within their fold."""
    return Pictures(z["likeness"], z.get("fold")) if "likeness" in z else None


def likeness(images: np.ndarray) -> np.ndarray:
    """(N, D) unit vectors from (N, H, W, 3) uint8 pictures: the cells of an 8 x 8 colour grid in
    the top half and the outer columns, centred on their mean (so that light matters less)."""
    n, h, w = images.shape[:3]
    if h < GRID or w < GRID:
        raise ValueError(f"pictures of {h}x{w} are smaller than the likeness grid ({GRID}x{GRID})")
    bh, bw = h // GRID, w // GRID
    kept = np.zeros((GRID, GRID), bool)
    kept[: GRID // 2] = True
    kept[:, [0, -1]] = True
    v = np.empty((n, int(kept.sum()) * images.shape[3]), np.float32)
    for start in range(0, n, READ_CHUNK):  # float copies of every picture at once would not fit
        part = np.asarray(images[start:start + READ_CHUNK, :bh * GRID, :bw * GRID], dtype=np.float32)
        cells = part.reshape(len(part), GRID, bh, GRID, bw, -1).mean((2, 4))
        v[start:start + READ_CHUNK] = cells[:, kept].reshape(len(part), -1)
    v -= v.mean(1, keepdims=True)
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-6)


def nearest_anchor(look: np.ndarray, is_anchor: np.ndarray, galleries: np.ndarray | None = None) -> np.ndarray:
    """Each picture's anchor (a row index): itself for an anchor, otherwise the most alike anchor
    of its gallery; itself where its gallery has no anchor, or none is alike at all (a uniform
    picture has a likeness of zeros, alike to none: it would take the first anchor's reading)."""
    out = np.arange(len(look))
    galleries = np.zeros(len(look), np.int64) if galleries is None else np.asarray(galleries)
    for g in np.unique(galleries):
        rows = np.flatnonzero(galleries == g)
        anchors, others = rows[is_anchor[rows]], rows[~is_anchor[rows]]
        if not len(anchors):
            continue
        for start in range(0, len(others), CHUNK):
            part = others[start:start + CHUNK]
            alike = look[part] @ look[anchors].T
            out[part] = np.where(alike.max(1) > 0, anchors[alike.argmax(1)], part)
    return out


def subject_spec(task: Task, cfg: Config) -> tuple[int, int, list[int]] | None:
    """(anchor factor index, anchor class index, indices of the factors a subject keeps), or None
    where `decide.subjects` is not set; its names checked against the task."""
    s = cfg.decide.subjects
    if s is None:
        return None
    name, _, cls = s.anchor.partition("=")
    if name not in task.factor_names:
        raise ConfigError(f"decide.subjects.anchor {s.anchor!r}: no factor {name!r} (factors: {task.factor_names})")
    factor = task.factors[task.factor_names.index(name)]
    if cls not in factor.classes:
        raise ConfigError(f"decide.subjects.anchor {s.anchor!r}: {name} has no class {cls!r} "
                          f"(classes: {list(factor.classes)})")
    unknown = [f for f in s.factors if f not in task.factor_names]
    if unknown or name in s.factors:
        raise ConfigError(f"decide.subjects.factors {s.factors}: each must be a factor of the task other than "
                          f"the anchor's {name!r} (factors: {task.factor_names})")
    return task.factor_names.index(name), factor.classes.index(cls), [task.factor_names.index(f) for f in s.factors]


def subject_anchors(task: Task, combined: np.ndarray, spec: tuple[int, int, list[int]],
                    pictures: Pictures) -> np.ndarray:
    """Each picture's anchor (a row index), anchors being the pictures whose predicted class of the
    anchor factor is the anchor class."""
    i_anchor, c_anchor, _ = spec
    return nearest_anchor(pictures.look, task.marginal(combined, i_anchor).argmax(1) == c_anchor, pictures.galleries)


def move_to_anchors(task: Task, combined: np.ndarray, spec: tuple[int, int, list[int]], weight: float,
                    anchor_of: np.ndarray) -> np.ndarray:
    """Final-class probabilities with each kept factor's marginal moved to (1 - weight)·own +
    weight·its anchor's: the final class rescaled, factor by factor, until every kept marginal is
    within IPF_TOL of its target or IPF_PASSES have run (iterative proportional fitting; one pass
    when the factors are independent, as separate heads make them; joined heads, a flat head or an
    ensemble's vote correlate them, and confident ones settle slowly)."""
    kept = spec[2]
    targets = {}
    for i in kept:
        p = task.marginal(combined, i)
        targets[i] = (1 - weight) * p + weight * p[anchor_of]
    out = combined
    for _ in range(IPF_PASSES):
        for i in kept:
            out = task.with_marginal(out, i, targets[i])
        if all(np.max(np.abs(task.marginal(out, i) - targets[i]), initial=0.0) <= IPF_TOL for i in kept):
            break
    return out


def read_subjects(task: Task, combined: np.ndarray, spec: tuple[int, int, list[int]], weight: float,
                  pictures: Pictures) -> np.ndarray:
    """The kept factors of each picture moved towards its anchor's, found among `pictures`."""
    return move_to_anchors(task, combined, spec, weight, subject_anchors(task, combined, spec, pictures))
