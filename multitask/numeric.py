"""What a binned numeric factor adds beyond its bins: training targets that know where the number
sits (other training edges, soft targets near an edge, rows too close to an edge left out), and an
auxiliary output on the number that is read at prediction, not only trained.

Written for any factor with `bins` (the competition's age is one): the settings live under
`numeric.<factor>` in the config. The auxiliary output `aux_<factor>` is a regression on the
number (standardised by the bin edges, so no statistic of the data is needed to read it back),
ordinal, one logit per bin edge (P(number >= edge)), or a distribution over fine bins of the number
(label distribution learning: the target is a normal around the number, so neighbouring numbers
share what they teach). Each is turned into bin probabilities (`aux_bins`) and blended into the
factor by `decide.py`.

Training batches carry (N, F + V) float targets: the F factor class indices, then the V numbers of
the task's numeric factors (NaN where unknown, e.g. pseudo-labelled rows); a distilled student's batches,
and those of a soft pseudo-label round, carry a teacher's final-class probabilities after them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import ndtr

from multitask.config import AUX_PREFIX, Config, ConfigError, NumericCfg
from multitask.labels import Factor, Head, Task, cut_points


def aux_name(factor: str) -> str:
    return AUX_PREFIX + factor


def is_aux(name: str) -> bool:
    return name.startswith(AUX_PREFIX)


@dataclass(frozen=True)
class Numeric:
    index: int  # the factor's position in the task
    column: int  # the number's column in the value block of a batch
    factor: Factor
    cfg: NumericCfg

    @property
    def train_cuts(self) -> np.ndarray:
        """The cuts (`Factor.cuts`) of the bins the factor is trained on."""
        return cut_points(self.cfg.train_bins if self.cfg.train_bins is not None else self.factor.bins,
                          self.factor.integer)

    @property
    def reshapes_targets(self) -> bool:
        return self.cfg.train_bins is not None or self.cfg.soft_edge > 0

    @cached_property  # read for every training batch: made once
    def grid(self) -> np.ndarray:
        """The fine edges of a distribution output."""
        return fine_edges(self.factor, self.cfg.aux_step)

    @cached_property
    def owner(self) -> np.ndarray:
        """The bin that holds each fine bin of a distribution output."""
        return fine_to_bins(self.factor, self.grid)

    @property
    def sigma(self) -> float:
        """The spread of a distribution output's targets, in the number's units."""
        return self.cfg.aux_sigma or fine_step(self.factor, self.cfg.aux_step) / 2


EVERY = "*"  # settings under numeric."*" hold for every numeric factor; a factor's own lie over them (config.py)


def settings_of(cfg: Config, factor: str) -> NumericCfg:
    """A numeric factor's settings: its own (already laid over those under "*" when the config was
    read), else those under "*", else the defaults."""
    return cfg.numeric.get(factor, cfg.numeric.get(EVERY, NumericCfg()))


def numerics(task: Task, cfg: Config) -> list[Numeric]:
    """The task's numeric factors with their settings; settings for anything else are an error."""
    names = [f.name for f in task.numeric_factors]
    unknown = sorted(set(cfg.numeric) - set(names) - {EVERY})
    if unknown:
        raise ConfigError(f"numeric settings for {unknown}, which are not binned numeric factors of the task "
                          f"(those are {names})")
    out = []
    for col, f in enumerate(task.numeric_factors):
        c = settings_of(cfg, f.name)
        if c.train_bins is not None and len(c.train_bins) != len(f.bins):
            raise ConfigError(f"numeric.{f.name}.train_bins {c.train_bins} must have as many edges as its bins {list(f.bins)}")
        out.append(Numeric(task.factor_names.index(f.name), col, f, c))
    return out


def check_training_bins(task: Task, cfg: Config) -> None:
    """Before training: a whole-number factor's training edges are whole numbers. Its cuts sit half a
    unit below an edge, so 57.5 would cut at 57 and teach 57 as the upper bin. (Checked where folds
    are trained, not where a run is read: one trained so before this check still submits.)"""
    for n in numerics(task, cfg):
        edges = n.cfg.train_bins
        if edges is not None and n.factor.integer and not all(float(b).is_integer() for b in edges):
            raise ConfigError(f"numeric.{n.factor.name}.train_bins {edges}: {n.factor.name} is a whole number, so "
                              f"its training edges must be whole numbers too (58 puts 58 in the upper bin)")


def aux_size(n: Numeric) -> int:
    return {"regression": 1, "ordinal": len(n.factor.bins), "distribution": len(n.grid) + 1}[n.cfg.aux]


def aux_outputs(task: Task, cfg: Config, heads: list[Head]) -> dict[str, tuple[int, str]]:
    """Auxiliary outputs: name -> (size, the head whose features it reads: the one covering the factor)."""
    out = {}
    for n in numerics(task, cfg):
        if n.cfg.aux != "none":
            head = next(h for h in heads if n.index in h.factor_idx)
            out[aux_name(n.factor.name)] = (aux_size(n), head.name)
    return out


def standardise(factor: Factor, values):
    """The number on a scale set by the bin edges alone (centre 0, edges span 1)."""
    edges = np.asarray(factor.bins, float)
    centre = float(edges.mean())
    scale = float(edges[-1] - edges[0]) if len(edges) > 1 else max(abs(float(edges[0])), 1.0)
    return (values - centre) / scale, centre, scale


def fine_step(factor: Factor, step: float | None = None) -> float:
    """A distribution output's fine-bin width: `step`, else a sixth of the span the edges set."""
    return float(step) if step else standardise(factor, np.zeros(1))[2] / 6


def fine_edges(factor: Factor, step: float | None = None) -> np.ndarray:
    """The edges of a distribution output's fine bins: `fine_step` apart from the first cut (half a
    unit below the first edge for whole numbers), one span (standardise's scale) beyond the outer
    edges, with every cut between bins (`Factor.cuts`) among them so that each fine bin lies within
    one bin. Below the first and above the last fine edge, one open bin each."""
    edges = factor.cuts
    scale = standardise(factor, np.zeros(1))[2]
    width = fine_step(factor, step)
    k = np.arange(np.floor(-scale / width), np.ceil((edges[-1] - edges[0] + scale) / width) + 1)
    grid = edges[0] + width * k
    grid = grid[np.abs(grid[:, None] - edges[None, :]).min(1) > 1e-9 * width]  # the bin edge itself, exactly
    return np.sort(np.concatenate([grid, edges]))


def fine_to_bins(factor: Factor, grid) -> np.ndarray:
    """(len(grid) + 1,) the bin that holds each fine bin (the bin of its lower edge)."""
    lower = np.concatenate([[-np.inf], np.asarray(grid, float)])
    return np.searchsorted(factor.cuts, lower, side="right")


def normal_over_bins(values: torch.Tensor, grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, len(grid) + 1) the mass of a normal around each number that falls in each fine bin."""
    cdf = torch.special.ndtr((grid[None, :] - values[:, None]) / sigma)
    ends = torch.ones(len(values), 1, dtype=cdf.dtype, device=cdf.device)
    return torch.diff(torch.cat([0 * ends, cdf, ends], 1), dim=1)


def edge_distribution(values: torch.Tensor, classes: torch.Tensor, edges: np.ndarray, n: int,
                      soft: float) -> torch.Tensor:
    """(N, n) targets of a numeric factor: one-hot at the bin of the number under `edges` (cuts,
    `Factor.cuts`; the class where the number is unknown); within `soft` of a cut, mass moves
    linearly to the neighbouring bin, half of it at the cut itself."""
    known = torch.isfinite(values)
    v = torch.where(known, values, torch.zeros_like(values))
    e = torch.as_tensor(edges, dtype=v.dtype, device=v.device)
    bins = torch.where(known, torch.searchsorted(e, v.contiguous(), right=True), classes)
    out = F.one_hot(bins, n).to(v.dtype)
    if soft > 0:
        for j, edge in enumerate(e):  # edge j separates bin j and bin j + 1
            share = (0.5 * (1 - (v - edge).abs() / soft)).clamp(min=0) * known
            lower = bins == j  # below the edge: give to bin j + 1
            upper = bins == j + 1
            for side, to in ((lower, j + 1), (upper, j)):
                s = share * side
                out[:, to] += s
                out[torch.arange(len(v)), bins] -= s
    return out


class Targets:
    """Every head's and auxiliary output's training targets from a batch's (N, F + V) targets."""

    def __init__(self, task: Task, heads: list[Head], cfg: Config):
        self.task, self.heads = task, heads
        self.numerics = numerics(task, cfg)
        self.aux = [n for n in self.numerics if n.cfg.aux != "none"]
        # rows that carry a teacher's probabilities (a student's, soft pseudo labels): the true label's
        # share where the row has one
        self.true_weight = cfg.distill.true_weight if cfg.distill is not None else 1.0

    def factor_distributions(self, factors: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
        """(N, n_f) per factor; a row whose factor is unknown (-1, a partial pseudo label) is all zeros."""
        known = factors >= 0
        safe = factors.clamp(min=0)
        dists = [F.one_hot(safe[:, i], f.n).float() for i, f in enumerate(self.task.factors)]
        for n in self.numerics:
            if n.reshapes_targets:
                dists[n.index] = edge_distribution(values[:, n.column], safe[:, n.index], n.train_cuts,
                                                   n.factor.n, n.cfg.soft_edge)
        return [d * known[:, i, None] for i, d in enumerate(dists)]

    def __call__(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        n_f, n_v = len(self.task.factors), len(self.numerics)
        factors, values = y[:, :n_f].long(), y[:, n_f:n_f + n_v].float()
        out = self.label_targets(factors, values)
        if y.shape[1] > n_f + n_v:
            out |= self.taught(out, y[:, n_f + n_v:].float())
        return out

    def taught(self, hard: dict[str, torch.Tensor], teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head's target as the teacher's probabilities (summed out of its final-class ones)
        with the true label mixed in at `true_weight` where the row has one."""
        out = {}
        sizes = self.task.sizes
        full = teacher.reshape(len(teacher), *sizes)
        for h in self.heads:
            others = tuple(i + 1 for i in range(len(sizes)) if i not in h.factor_idx)
            soft = (full.sum(others) if others else full).reshape(len(teacher), h.n)
            t = hard[h.name]
            if t.ndim == 1:
                known = t >= 0
                t = F.one_hot(t.clamp(min=0), h.n).to(soft.dtype)
            else:
                known = t.sum(1) > 0
            w = self.true_weight * known.to(soft.dtype)[:, None]
            out[h.name] = w * t + (1 - w) * soft
        return out

    def label_targets(self, factors: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if any(n.reshapes_targets for n in self.numerics):
            dists = self.factor_distributions(factors, values)
            for h in self.heads:
                t = dists[h.factor_idx[0]]
                for i in h.factor_idx[1:]:  # outer product in mixed-radix order, first factor most significant
                    t = (t[:, :, None] * dists[i][:, None, :]).reshape(len(t), -1)
                out[h.name] = t
        else:
            # -1 where a factor of the head is unknown: the loss leaves the row out of that head
            out = {h.name: torch.where((factors[:, list(h.factor_idx)] >= 0).all(1), h.targets(factors), -1)
                   for h in self.heads}
        for n in self.aux:
            v = values[:, n.column]
            if n.cfg.aux == "regression":
                out[aux_name(n.factor.name)] = standardise(n.factor, v)[0][:, None]
            elif n.cfg.aux == "distribution":
                out[aux_name(n.factor.name)] = distribution_targets(n, v, factors[:, n.index])
            else:
                edges = torch.as_tensor(n.factor.bins, dtype=v.dtype, device=v.device)
                from_class = (factors[:, n.index, None] > torch.arange(len(edges), device=v.device)).to(v.dtype)
                from_value = (v[:, None] >= edges).to(v.dtype)
                target = torch.where(torch.isfinite(v)[:, None], from_value, from_class)
                unknown = ~torch.isfinite(v) & (factors[:, n.index] < 0)  # neither number nor class
                out[aux_name(n.factor.name)] = torch.where(unknown[:, None], float("nan"), target)
        return out


def distribution_targets(n: Numeric, values: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, fine bins): a normal around the number; where only the class is known (a pseudo label),
    even over the fine bins of that class; NaN where neither is."""
    grid = torch.as_tensor(n.grid, dtype=values.dtype, device=values.device)
    known = torch.isfinite(values)
    from_value = normal_over_bins(torch.where(known, values, torch.zeros_like(values)), grid, n.sigma)
    owner = torch.as_tensor(n.owner, device=values.device)
    member = (owner[None, :] == classes[:, None]).to(values.dtype)
    from_class = member / member.sum(1, keepdim=True).clamp(min=1)
    out = torch.where(known[:, None], from_value, from_class)
    return torch.where((~known & (classes < 0))[:, None], float("nan"), out)


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 on the standardised number, over the rows where it is known."""
    known = torch.isfinite(target)
    if not known.any():
        return pred.sum() * 0
    return F.smooth_l1_loss(pred.float()[known], target[known], beta=0.1)


def ordinal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per edge, over the rows whose bin is known."""
    known = torch.isfinite(target[:, 0])
    if not known.any():
        return logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits.float()[known], target[known])


def distribution_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the target distribution, over the rows where it is known."""
    known = torch.isfinite(target[:, 0])
    if not known.any():
        return logits.sum() * 0
    return -(target[known] * F.log_softmax(logits.float()[known], 1)).sum(1).mean()


AUX_LOSSES = {"regression": regression_loss, "ordinal": ordinal_loss, "distribution": distribution_loss}


def aux_losses(task: Task, cfg: Config) -> dict[str, tuple]:
    """name -> (loss function, weight) of every auxiliary output."""
    return {aux_name(n.factor.name): (AUX_LOSSES[n.cfg.aux], n.cfg.aux_weight)
            for n in numerics(task, cfg) if n.cfg.aux != "none"}


def aux_kind(cfg: Config, name: str) -> str:
    """The configured kind ("regression", "ordinal" or "distribution") of the auxiliary output `name`
    (aux_<factor>)."""
    return settings_of(cfg, name[len(AUX_PREFIX):]).aux


def aux_activation(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """What prediction stores of an auxiliary output: the standardised number (regression),
    P(number >= edge) per edge (ordinal), or the probability of each fine bin (distribution). Told
    by the configured kind (`aux_kind`), not the width: the ordinal output of a single-edge factor
    is one wide too, and its raw logits would be read as probabilities."""
    if kind == "regression":
        return logits.float()
    if kind == "ordinal":
        return logits.float().sigmoid()
    if kind == "distribution":
        return logits.float().softmax(1)
    raise ValueError(f"auxiliary output kind {kind!r} is not 'regression', 'ordinal' or 'distribution'")


def aux_bins(factor: Factor, kind: str, out: np.ndarray, sigma: float | None = None, grid=None) -> np.ndarray:
    """Bin probabilities (N, n) from an auxiliary output: ordinal exceedance probabilities made
    monotone and differenced; a regression's number read as a normal with spread `sigma` (in the
    number's units, fitted on OOF residuals); a distribution's fine bins summed into the bins that
    hold them (`grid`: its fine edges)."""
    if kind == "distribution":
        owner = fine_to_bins(factor, grid)
        p = np.clip(out, 0, None) @ (owner[:, None] == np.arange(factor.n)[None, :]).astype(float)
        p = np.clip(p, 1e-9, None)
        return p / p.sum(1, keepdims=True)
    if kind == "ordinal":
        s = np.minimum.accumulate(np.clip(out, 0, 1), axis=1)
    else:
        _, centre, scale = standardise(factor, np.zeros(1))
        mu = out[:, 0] * scale + centre
        s = 1 - ndtr((factor.cuts[None, :] - mu[:, None]) / max(spread_or_default(factor, sigma), 1e-6))
    p = -np.diff(np.concatenate([np.ones((len(s), 1)), s, np.zeros((len(s), 1))], axis=1), axis=1)
    p = np.clip(p, 1e-9, None)
    return p / p.sum(1, keepdims=True)


def spread_or_default(factor: Factor, sigma: float | None) -> float:
    """A regression's spread, or where none was fitted (no residuals to fit it on) a thirtieth of the
    span the edges set: one year for ages 30/60, and in proportion for a number on another scale."""
    return float(sigma) if sigma else standardise(factor, np.zeros(1))[2] / 30


def regression_sigma(factor: Factor, out: np.ndarray, values: np.ndarray) -> float:
    """Robust spread (1.4826 × MAD) of the regression's residuals, in the number's units."""
    _, centre, scale = standardise(factor, np.zeros(1))
    resid = out[:, 0] * scale + centre - values
    resid = resid[np.isfinite(resid)]
    return float(1.4826 * np.median(np.abs(resid - np.median(resid)))) if len(resid) else spread_or_default(factor, None)


def trained_classes(task: Task, cfg: Config, factors: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(N, F) each row's factor classes as training teaches them: a numeric factor with `train_bins`
    at its training bin where the number is known (the bin `edge_distribution` puts most mass in). Class
    balance counts these, not the scoring bins."""
    out = np.array(factors, copy=True)
    for n in numerics(task, cfg):
        if n.cfg.train_bins is not None:
            v = values[:, n.column]
            known = np.isfinite(v) & (factors[:, n.index] >= 0)
            out[known, n.index] = np.searchsorted(n.train_cuts, v[known], side="right")
    return out


def near_edge(values: np.ndarray, edges, distance: float) -> np.ndarray:
    """Rows whose number lies within `distance` of an edge (a cut, `Factor.cuts`; strictly closer
    than it)."""
    if distance <= 0:
        return np.zeros(len(values), bool)
    return (np.abs(values[:, None] - np.asarray(edges, float)[None, :]) < distance).any(1)


def training_rows(task: Task, cfg: Config, values: np.ndarray) -> np.ndarray:
    """Which training rows to keep: those not within `drop_near_edge` of a training cut (for whole
    numbers, 1 leaves out 59 and 60 at the edge 60). Only training rows are dropped; validation and
    OOF keep every row."""
    keep = np.ones(len(values), bool)
    for n in numerics(task, cfg):
        keep &= ~near_edge(values[:, n.column], n.train_cuts, n.cfg.drop_near_edge)
    return keep
