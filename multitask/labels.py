"""The decomposition as data: factors, heads that join factors, and the final class.

A task is an ordered list of factors; the final class is the mixed-radix number over the factors in
order (mask·6 + gender·3 + age for the mask competition). A head predicts one factor or a join of
factors (`gender_age`, 6 classes) or all of them (`class`). Everything downstream (model, losses,
metrics, voting, pseudo-labels, submission) works on heads by name and size, never on the words
mask, gender or age: only the competition preset knows those (`mask_task()`, the competition
reader, the demo generator, and the preset's defaults in config.py: `data.age_bins`, the subjects'
anchor `mask=not_worn`).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

FLAT_HEAD = "class"
MARGINAL_FLOOR = 1e-12  # a factor's class whose probability is below this is taken as ruled out


@dataclass(frozen=True)
class Factor:
    """One sub-label. Categorical (`classes` named in order), or a binned number (`bins`: the class is
    the bin its value falls in, and the value itself is kept for techniques that read numbers)."""
    name: str
    classes: tuple[str, ...]
    bins: tuple[float, ...] | None = None
    integer: bool = False  # the numbers are whole (ages in years): see `cuts`

    @classmethod
    def binned(cls, name: str, bins, integer: bool = False) -> "Factor":
        """`integer`: the values are known to be whole numbers (names then read 30-59, see bin_names)."""
        bins = tuple(bins)
        return cls(name, bin_names(bins, integer), bins, integer)

    @property
    def cuts(self) -> np.ndarray:
        """Where the number passes from one bin to the next, for what measures distance to an edge
        (soft targets, rows near an edge, a regression read as bins). The edges themselves, but half a
        unit below them for whole numbers: 59 and 60 then lie equally far from the cut between 30-59
        and >=60, as 29 and 30 from the one below; at the edge itself, 60 would count as half below it."""
        return cut_points(self.bins, self.integer)

    @property
    def n(self) -> int:
        return len(self.classes)

    @property
    def numeric(self) -> bool:
        return self.bins is not None

    def bin(self, values: np.ndarray) -> np.ndarray:
        """Bin index of each value: bins [30, 60] give <30 → 0, 30–59 → 1, ≥60 → 2."""
        return np.searchsorted(np.asarray(self.bins, dtype=float), np.asarray(values, dtype=float), side="right")


def cut_points(edges, integer: bool) -> np.ndarray:
    """`Factor.cuts` of any edges (a factor's own, or the training bins of one)."""
    return np.asarray(edges, float) - (0.5 if integer else 0.0)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def bin_names(bins, integer: bool = False) -> tuple[str, ...]:
    """Readable bin names. The edges alone cannot tell whether 29.9 may occur, so a middle bin reads
    as the half-open range it is, [30,60), unless the values are known to be whole numbers
    (`integer`, with whole-number edges: the mask preset's ages), where [30, 60] gives 30-59."""
    bins = list(bins)
    if integer and not all(float(b).is_integer() for b in bins):
        raise ValueError(f"whole-number bin names need whole-number edges, got {bins}")
    middle = [f"{_num(lo)}-{_num(hi - 1)}" if integer else f"[{_num(lo)},{_num(hi)})" for lo, hi in zip(bins, bins[1:])]
    return (f"<{_num(bins[0])}", *middle, f">={_num(bins[-1])}")


def mixed_radix(values: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Columns of `values` (N, len(sizes)) as one integer, the first column most significant."""
    values = np.asarray(values, dtype=np.int64).reshape(-1, len(sizes))
    out = np.zeros(len(values), dtype=np.int64)
    for col, size in enumerate(sizes):
        out = out * size + values[:, col]
    return out


def split_radix(codes: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.int64).copy()
    out = np.zeros((len(codes), len(sizes)), dtype=np.int64)
    for col in range(len(sizes) - 1, -1, -1):
        out[:, col] = codes % sizes[col]
        codes //= sizes[col]
    return out


@dataclass(frozen=True)
class Head:
    name: str
    factor_idx: tuple[int, ...]  # positions in the task's factor list, in task order
    sizes: tuple[int, ...]

    @property
    def n(self) -> int:
        return prod(self.sizes)

    def targets(self, factor_values):
        """Head class of each row of task factor values (N, F); numpy or torch integers alike."""
        out = factor_values[:, self.factor_idx[0]]
        for i, size in zip(self.factor_idx[1:], self.sizes[1:]):
            out = out * size + factor_values[:, i]
        return out


@dataclass(frozen=True)
class Task:
    name: str
    factors: tuple[Factor, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(f.n for f in self.factors)

    @property
    def n_classes(self) -> int:
        return prod(self.sizes)

    @property
    def factor_names(self) -> list[str]:
        return [f.name for f in self.factors]

    @property
    def numeric_factors(self) -> list[Factor]:
        return [f for f in self.factors if f.numeric]

    def class_names(self, classes: np.ndarray) -> np.ndarray:
        """(N, F) names of each factor's class for final classes."""
        decoded = self.decode(classes)
        return np.array([[f.classes[v] for f, v in zip(self.factors, row)] for row in decoded], dtype=object
                        ).reshape(len(decoded), len(self.factors))

    def class_titles(self) -> list[str]:
        """Each final class as its number (what a submission holds: the competition's `ans`) and its
        factors' classes, e.g. `3: worn / female / <30`."""
        return [f"{c}: " + " / ".join(map(str, n)) for c, n in enumerate(self.class_names(np.arange(self.n_classes)))]

    def marginal(self, combined: np.ndarray, i: int) -> np.ndarray:
        """Probabilities of factor i's classes, summed out of final-class probabilities (N, n_classes)."""
        sizes = self.sizes
        p = np.asarray(combined).reshape(len(combined), *sizes)
        return p.sum(axis=tuple(a + 1 for a in range(len(sizes)) if a != i))

    def with_marginal(self, combined: np.ndarray, i: int, q: np.ndarray) -> np.ndarray:
        """Final-class probabilities rescaled so that factor i's marginal becomes q (N, n_i), each
        other factor's odds within a class of factor i kept (export.py writes the same in torch). A
        class the probabilities rule out (marginal below MARGINAL_FLOOR) has no odds to keep: its
        share of q takes the other factors' odds over all of factor i's classes, so that the rows
        still sum to one and a reading such as a regression can raise a class a head ruled out."""
        combined = np.asarray(combined)
        p = self.marginal(combined, i)
        full = combined.reshape(len(combined), *self.sizes)
        shape = [len(combined)] + [1] * len(self.sizes)
        shape[i + 1] = self.sizes[i]
        p, q = p.reshape(shape), np.asarray(q).reshape(shape)
        moved = np.where(p > MARGINAL_FLOOR, full * (q / np.maximum(p, MARGINAL_FLOOR)),
                         q * full.sum(axis=i + 1, keepdims=True))
        return moved.reshape(len(combined), self.n_classes)

    def encode(self, factor_values: np.ndarray) -> np.ndarray:
        return mixed_radix(factor_values, self.sizes)

    def decode(self, classes: np.ndarray) -> np.ndarray:
        return split_radix(classes, self.sizes)

    def head(self, name: str) -> Head:
        """`class` is every factor; otherwise factor names joined by `_` (in any order)."""
        names = self.factor_names
        if name == FLAT_HEAD:
            idx = tuple(range(len(names)))
        else:
            parts = _split_head_name(name, names)
            if parts is None:
                raise ValueError(f"unknown head {name!r}: heads are factors {names}, joins of them with '_' "
                                 f"(e.g. {'_'.join(names[-2:])!r}) or {FLAT_HEAD!r}")
            idx = tuple(sorted(names.index(p) for p in parts))
        return Head(name, idx, tuple(self.sizes[i] for i in idx))

    def heads(self, spec: str | list[str] | None) -> list[Head]:
        """Parse a comma list of heads that must cover each factor exactly once (None: a head per factor)."""
        if spec is None:
            spec = self.factor_names
        names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        names = [n for n in names if n]
        if not names:
            raise ValueError("no heads given: use e.g. " + ",".join(self.factor_names))
        heads = [self.head(n) for n in names]
        covered = [i for h in heads for i in h.factor_idx]
        missing = [self.factors[i].name for i in range(len(self.factors)) if i not in covered]
        twice = sorted({self.factors[i].name for i in covered if covered.count(i) > 1})
        if missing or twice:
            problems = ([f"missing {missing}"] if missing else []) + ([f"covered twice {twice}"] if twice else [])
            raise ValueError(f"heads {','.join(names)!r} must cover each factor of {self.factor_names} exactly "
                             f"once: {'; '.join(problems)}")
        return heads

    def class_to_head_index(self, head: Head) -> np.ndarray:
        """For each final class, the head class it implies (n_classes,)."""
        return head.targets(self.decode(np.arange(self.n_classes)))

    def combine(self, heads: list[Head], probs: dict[str, np.ndarray]) -> np.ndarray:
        """Final-class probabilities as the product of the heads' probabilities (N, n_classes).

        The heads cover disjoint factor sets, so the product is a proper distribution when each head's is.
        """
        out = None
        for h in heads:
            p = np.asarray(probs[h.name])[:, self.class_to_head_index(h)]
            out = p if out is None else out * p
        return out


def _split_head_name(name: str, factor_names: list[str]) -> list[str] | None:
    """Split `gender_age` into factor names; factor names may themselves contain '_'."""
    if name in factor_names:
        return [name]
    for f in factor_names:
        if name.startswith(f + "_"):
            rest = _split_head_name(name[len(f) + 1:], factor_names)
            if rest is not None and f not in rest:
                return [f] + rest
    return None


def mask_task(age_bins: list[int] = (30, 60)) -> Task:
    """The mask competition: 18 classes = mask (3) × gender (2) × age group (3), in that order."""
    return Task("mask", (
        Factor("mask", ("worn", "incorrect", "not_worn")),
        Factor("gender", ("male", "female")),
        Factor.binned("age", age_bins, integer=True),  # the reader takes whole years only
    ))
