"""`mt train --time-limit`: fit the epochs to a time budget, so that a user with a deadline gets a
finished run rather than a killed one.

Two real epochs of the first fold (the same data, model, validation, checkpoints and OOF/test
prediction) run in a scratch folder and are timed apart: the first epoch with the fold's set-up, a
second one, and the prediction. The first carries the process's one-off costs (on a GPU, probably
CUDA's lazy start and cuDNN's algorithm search for each new shape: on an H200 a probe of one epoch
once took some 100 s where each later fold, epoch and prediction, took 11 s, and a 180-s budget
left one epoch of ten; docs/PERFORMANCE.md), so the later folds are reckoned at the second epoch's
time and the prediction's; `--jobs` workers, each a fresh process, pay the first epoch's extra once
more each. The budget is the whole command's, counted from its start: reading the table and decoding
the images come off it first (on an H200 a 420-s budget ran 432 s: the probe took 77 s and the
folds 288 s, and the other 67 s, before the probe and after the folds, were not reckoned). The
epochs per fold are the most that fit what is left, a tenth of the budget kept back for what the
probe does not time (each fold's set-up, the end of the round); never more than configured.
Workers that share a device count as one after another, so the estimate errs on the short side.

A run directory that already holds a run (`--fold K` from another shell) is not measured again: it
trains the epochs its config.yaml records (kfold.train_run), or it would be refused for other settings.
"""
from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import time

from multitask import dist
from multitask.config import Config, ConfigError, load_config
from multitask.context import open_context
from multitask.device import worker_devices
from multitask.run import RunDir

UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in '90s', '20m', '2h', '1h30m' or a plain number of seconds."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", text)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s", "", text):
            raise ConfigError(f"time limit {text!r}: expected e.g. 90s, 20m, 2h or 1h30m")
        seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if seconds <= 0:  # a budget of nothing would otherwise read as no budget at all
        raise ConfigError(f"time limit {text!r}: must be more than 0 (leave --time-limit out for none)")
    return seconds


def folds_in_turn(folds: int, jobs: int, devices: int) -> int:
    """How many folds' time the round takes end to end. Only workers on distinct devices count as
    running side by side: workers that share one (a GPU, or the CPU whose threads parallel.py splits
    between them) each run at about their share of its speed, so they are counted as one after
    another (on one GPU two may overlap a little: the estimate stays on the short side)."""
    return math.ceil(folds / max(1, min(jobs, devices)))


@dataclasses.dataclass(frozen=True)
class Probe:
    """What the probe fold took, in seconds: all of it, its second epoch (training, validation and
    the checkpoints) and its prediction after the last epoch."""
    total_s: float
    epoch_s: float
    predict_s: float

    @property
    def first_s(self) -> float:
        """The fold's set-up and first epoch."""
        return self.total_s - self.epoch_s - self.predict_s

    @property
    def one_off_s(self) -> float:
        """What the set-up and first epoch took beyond a steady epoch: paid again by a fresh process."""
        return max(0.0, self.first_s - self.epoch_s)


KEPT = 0.1  # of the budget, for what the probe does not time (each fold's set-up, the end of the round)


def epochs_that_fit(budget_s: float, probe: Probe, in_turn: int, restarts: int = 0, spent_s: float = 0.0) -> int:
    """Epochs per fold that fit what the probe left of the budget (0: not one); `restarts`: fresh
    processes (`--jobs` workers) one after another, each paying the one-off costs again; `spent_s`:
    what the command took before the probe (reading the table, decoding the images)."""
    left = (1 - KEPT) * budget_s - spent_s - probe.total_s - restarts * probe.one_off_s
    per_fold = left / in_turn - probe.predict_s
    return int(per_fold // probe.epoch_s) if per_fold > 0 else 0


def restarts_in_turn(folds: int, jobs: int, devices: int) -> int:
    """How many `--jobs` workers start one after another, as folds_in_turn counts them (0: the folds
    train in this process)."""
    return math.ceil(min(jobs, folds) / max(1, devices)) if jobs > 1 and folds > 1 else 0


def run_probe(cfg: Config, table, images, device, progress=None) -> Probe:
    """Train two epochs of the first fold in a scratch folder, timing the second epoch apart."""
    from multitask.kfold import train_round_fold  # kfold.train_run calls this module: imported here, not at the top

    probe = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})})
    ends = []  # each epoch's end, after its validation (rank 0 alone validates)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mt-probe-") as scratch:
        ctx = open_context(RunDir(scratch), probe, progress, table, images, make_missing_folds=True)
        first = cfg.train.fold[0] if cfg.train.fold else 0
        train_round_fold(dataclasses.replace(ctx, cfg=probe), 0, first, device, progress,
                         on_epoch=lambda *_: ends.append(time.perf_counter()))
        t1 = time.perf_counter()
    # the second epoch's span holds the first one's checkpoint writes, the prediction's the second's
    return dist.broadcast(Probe(t1 - t0, ends[1] - ends[0], t1 - ends[1]) if dist.is_main() else None)


def epochs_of_run(run: RunDir, cfg: Config, say=print) -> Config | None:
    """`cfg` with the epochs the run already in `run` trains, and its time limit, or None where there
    is no run yet. A second `--fold K --time-limit` into a run must not measure again: another
    measurement gives other epochs, and the run's settings cannot change. Its own limit is the one
    its epochs were fitted to, whatever this one's (another limit, or none, was refused as other
    settings after this had said it would train the run's epochs). Recorded epochs above the
    configured ones are not taken: claim_run_dir then refuses the other settings, as without a
    time limit."""
    if not run.config.exists():
        return None
    recorded = load_config(run.config).train
    if recorded.epochs <= cfg.train.epochs:
        limit = f", fitted to its time limit of {recorded.time_limit_s:g} s" if recorded.time_limit_s else ""
        say(f"time limit: {run.root} already holds a run; training its {recorded.epochs} epochs per fold "
            f"(its config.yaml{limit}), not measured again")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
            "epochs": recorded.epochs, "time_limit_s": recorded.time_limit_s})})
    return cfg


def fit_epochs(cfg: Config, table, images, device, progress=None, say=print, spent_s: float = 0.0) -> Config:
    """`cfg` with train.epochs lowered to what fits train.time_limit_s (measured), and a line saying so.
    `spent_s`: what the command took before the probe, already off the budget."""
    budget = cfg.train.time_limit_s
    if cfg.train.epochs == 1:
        say(f"time limit {budget:.0f} s: one epoch per fold is configured, the least there is: not measured")
        return cfg
    # the probe takes a while and a log that is not a terminal shows no bar: say why nothing starts yet
    say(f"time limit {budget:.0f} s: timing two epochs of one fold to see how many fit")
    probe = run_probe(cfg, table, images, device, progress)
    folds = len(cfg.train.selected_folds())
    devices = len(set(worker_devices(cfg.train.device)))
    in_turn = folds_in_turn(folds, cfg.train.jobs, devices)
    fits = epochs_that_fit(budget, probe, in_turn, restarts_in_turn(folds, cfg.train.jobs, devices), spent_s)
    epochs = max(1, min(cfg.train.epochs, fits))
    line = (f"time limit {budget:.0f} s: starting, reading and decoding took {spent_s:.1f} s, a probe of two epochs "
            f"{probe.total_s:.1f} s (the set-up and first epoch {probe.first_s:.1f} s, the second "
            f"{probe.epoch_s:.1f} s, the prediction {probe.predict_s:.1f} s); {in_turn} fold(s) one after another: ")
    if epochs < cfg.train.epochs:
        line += f"training {epochs} epochs per fold instead of {cfg.train.epochs}"
        line += "" if fits >= 1 else " (the least there is: the budget is shorter than one epoch per fold)"
    else:
        line += f"all {cfg.train.epochs} epochs per fold fit"
    say(line)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
