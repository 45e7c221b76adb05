"""Train one fold: AdamW, warmup + cosine, bf16 autocast and channels_last on CUDA, optional EMA and
torch.compile, gradient clipping; validate every epoch and keep the checkpoint with the best combined
macro F1 (the competition metric, not accuracy).

Writes FOLD/metrics.csv (a row per epoch, counted from 1: training losses, validation macro F1 and
negative log-likelihood per head), FOLD/best.pt (weights), FOLD/last.pt (everything a resume needs:
model, EMA, optimizer, scheduler, epochs done, RNG states), and with `train.avg_top_k` the kept
epochs' weights and their average FOLD/avg.pt.
"""
from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3

from multitask import dist
from multitask.config import Config, ConfigError
from multitask.data.augment import BatchMixer
from multitask.data.dataset import RowImages, TrainBatches
from multitask.data.sampling import class_weights, sample_weights
from multitask.device import autocast, compiled, place_model, prepare_input
from multitask.inference import predict_probs
from multitask.labels import Head, Task
from multitask.losses import MultiHeadLoss
from multitask.metrics import heads_nll, score_probs
from multitask.model import build_model, param_groups
from multitask.numeric import Targets, aux_losses, aux_outputs, trained_classes
from multitask.run import RunError, atomic_write_text, load_torch, save_torch


@dataclass
class FoldData:
    train_images: RowImages
    train_factors: np.ndarray  # (N, F) true (or pseudo) factor values
    train_values: np.ndarray  # (N, V) the numbers behind the numeric factors (NaN where unknown)
    val_images: RowImages
    val_factors: np.ndarray
    train_teacher: np.ndarray | None = None  # (N, n_classes) a teacher's final-class probabilities (distill.py)

    def train_targets(self) -> np.ndarray:
        """(N, F + V [+ n_classes]) float32: what a training batch carries (see numeric.py)."""
        parts = [self.train_factors, self.train_values]
        if self.train_teacher is not None:
            parts.append(self.train_teacher)
        return np.concatenate(parts, axis=1).astype(np.float32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """The LR factor of each step: a linear warmup, then a cosine from the peak towards 0, which the
    step after the last would reach (the last step of 100 after a warmup of 10 runs at 0.03% of the
    peak; of 5 after 2, at 25%). The warmup takes at most half the steps: a run no longer than its
    warmup (one epoch, as `--time-limit` often leaves) would otherwise end at the peak LR and never
    decay."""
    warmup_steps = min(warmup_steps, total_steps // 2)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


MIX_STREAM = 0x6D6978  # "mix": MixUp/CutMix draws, a stream of their own


def mix_generator(seed: int, epoch: int) -> torch.Generator:
    """The MixUp/CutMix draws of one epoch. Their own stream: a seed made by adding to the batch
    order's (seed * 1_000_003 + epoch, data/dataset.py) would equal that of another epoch's order."""
    state = np.random.SeedSequence([seed % 2**64, epoch, MIX_STREAM]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def rng_state(device: torch.device) -> dict:
    # numpy's global generator is not used in training, and its state would not load with weights_only;
    # CUDA: the training device's generator only, so a fold resumes on a machine with fewer GPUs
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # older runs saved one state per visible GPU
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def check_finite(loss: float, label: str, epoch: int, lr: float) -> None:
    """A loss that is nan or inf has left nan weights behind (bf16 has no loss scaler to skip the
    step): every later epoch would train and predict nothing, and argmax would read the first class.
    Stopped here, before this epoch's checkpoints, the fold's earlier epochs stay as they were."""
    if not math.isfinite(loss):
        raise RunError(f"{label}: the training loss became {loss} in epoch {epoch}: the model diverged. Train "
                       f"again with a lower learning rate (train.lr is {lr:g}: `--set train.lr={lr / 3:.2g} --force`)")


def train_one_epoch(step_model, model, batches, make_targets: Targets, criterion: MultiHeadLoss, optimizer,
                    scheduler, ema, cfg: Config, device: torch.device, step: int, on_step=None, mix=None):
    """One pass over `batches`; returns (summed losses weighted by batch size, images seen, step).
    `step_model` is `model` or its torch.compile wrapper; clipping and EMA act on `model`; `mix`
    (x, targets) -> (x, targets) mixes each batch (MixUp / CutMix)."""
    model.train()
    seen = 0
    sums = {name: torch.zeros((), device=device) for name in criterion.fns} | {"loss": torch.zeros((), device=device)}
    for x, y in batches:
        targets = make_targets(y)
        if mix is not None:
            x, targets = mix(x, targets)
        with autocast(device, cfg.train.amp):
            outputs = step_model(prepare_input(x, cfg, device))
        loss, parts = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        if ema is not None:
            ema.update(model, step=step)
        n = len(x)
        seen += n
        # accumulate on the device: a .item() per step would wait for the GPU every batch
        sums["loss"] += loss.detach() * n
        for name, v in parts.items():
            sums[name] += v.detach() * n
        if on_step:
            on_step(step)
    return {k: float(v) for k, v in sums.items()}, seen, step


@dataclass
class Training:
    """Everything one fold's training loop steps: built in one place for the engine and the benchmark."""
    model: torch.nn.Module
    step_model: torch.nn.Module  # `model` or its torch.compile wrapper
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    criterion: MultiHeadLoss
    targets: Targets


class BiasCorrectedEma(ModelEmaV3):
    """timm's EMA with Adam's bias correction: after t steps it is the average of the t trained
    weights, step i's weighted decay**(t - i) and the weights renormalised. timm's plain EMA copies
    the first step's weights and keeps decay**(t - 1) of them to the end, weights barely off their
    random start: 6% after the competition config's 1,400 steps (decay 0.998), 76% after the one
    epoch that `--time-limit` can leave."""

    def get_decay(self, step: int | None = None) -> float:
        if step is None:
            return self.decay
        d = self.decay
        return d * (1 - d ** (step - 1)) / (1 - d ** step) if step > 1 else 0.0


def build_training(cfg: Config, task: Task, heads: list[Head], device: torch.device, steps_per_epoch: int,
                   class_counts: dict[str, np.ndarray] | None = None, partial: bool = False) -> Training:
    """`class_counts` (per head, from the fold's training rows) feed the heads whose loss has class_weights;
    `partial`: some training rows lack some factors (partial pseudo labels)."""
    tc = cfg.train
    model = place_model(build_model(cfg.model, heads, aux_outputs(task, cfg, heads)), cfg, device)
    ema = BiasCorrectedEma(model, decay=tc.ema_decay) if tc.ema else None
    # fused: one kernel for the whole update instead of several per parameter. On the CPU torch would
    # otherwise loop over the tensors one by one: 2.1 ms a step for test_efficientnet, 0.4 fused
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr, tc.backbone_lr), lr=tc.lr,
                                  fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(tc.warmup_epochs * steps_per_epoch), tc.epochs * steps_per_epoch))
    weights = {h.name: torch.as_tensor(class_weights(class_counts[h.name], cfg.loss_for(h.name).class_weight_power),
                                       dtype=torch.float32)
               for h in heads if cfg.loss_for(h.name).class_weights and class_counts is not None}
    criterion = MultiHeadLoss({h.name: cfg.loss_for(h.name) for h in heads}, aux_losses(task, cfg), weights, partial)
    step_model = compiled(model, cfg)
    return Training(model, step_model, ema, optimizer, scheduler, criterion, Targets(task, heads, cfg))


def last_state(t: Training, epochs_done: int, step: int, best: dict, device: torch.device, train_id: str,
               settings: str | None = None) -> dict:
    """What last.pt holds: everything a resumed fold needs to carry on as if never stopped, and the
    settings it was trained under (context.settings_hash), for `mt resume` to check."""
    return {"model": t.model.state_dict(), "ema": t.ema.module.state_dict() if t.ema is not None else None,
            "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
            "epochs_done": epochs_done, "step": step, "best": best, "rng": rng_state(device), "train_id": train_id,
            "settings": settings}


def resume_from(path: Path, t: Training, device: torch.device) -> tuple[int, int, dict, list[dict], str]:
    """Load a fold's last.pt into `t`; return (next epoch, step, best scores, metrics rows so far,
    the training's id)."""
    state = load_torch(path, "; delete it, and `mt resume` trains the fold from its start")
    t.model.load_state_dict(state["model"])
    if t.ema is not None:
        t.ema.module.load_state_dict(state["ema"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], device)
    # metrics.csv is written before last.pt: a kill between the two leaves a row to drop
    done = state["epochs_done"] if "epochs_done" in state else state["epoch"] + 1  # older last.pt counted from 0
    rows = pd.read_csv(path.parent / "metrics.csv", dtype={"train_id": str}).iloc[:done].to_dict("records")
    return done, state["step"], kept_best(path.parent, done, state["best"]), rows, state.get("train_id") or new_train_id()


def kept_best(out_dir: Path, done: int, best: dict) -> dict:
    """The best scores a resumed fold goes on from. best.pt and top_e<epoch>.pt are written before
    last.pt: a kill between them leaves files of an epoch that will run again. A top file is removed
    (the epoch offers itself again). best.pt has already replaced the best that last.pt records, so
    its own scores and epoch become the best: they describe the weights that are there (on the CPU
    the rerun epoch is the same; on a GPU it may score lower and leave that file as the best)."""
    for top in out_dir.glob("top_e*.pt"):
        if top.stem[len("top_e"):].isdigit() and int(top.stem[len("top_e"):]) > done:
            top.unlink(missing_ok=True)  # under torchrun every rank looks
    path = out_dir / "best.pt"
    if path.exists():
        written = load_torch(path, "; delete it and last.pt, and `mt resume` trains the fold from its start")
        if written.get("epoch", 0) > done and "scores" in written:
            return written["scores"] | {"epoch": written["epoch"]}
    return best


class TopEpochs:
    """The weights of the fold's k best epochs by validation macro F1, one file each (top_e<epoch>.pt,
    so a resumed fold still has them), and their average (avg.pt): a cheap ensemble along the
    trajectory, next to EMA."""

    def __init__(self, out_dir: Path, k: int, rows: list[dict]):
        self.out_dir, self.k = out_dir, k
        # a resumed fold: the kept epochs are the best of those already run whose file is there
        ranked = sorted(rows, key=lambda r: (-r["val_f1"], r["epoch"]))
        self.kept = [(r["val_f1"], int(r["epoch"])) for r in ranked if self.path(int(r["epoch"])).exists()][:k]

    def path(self, epoch: int) -> Path:
        return self.out_dir / f"top_e{epoch}.pt"

    def offer(self, epoch: int, score: float, model: torch.nn.Module) -> None:
        if self.k <= 0:
            return
        ranked = sorted(self.kept + [(score, epoch)], key=lambda s: (-s[0], s[1]))
        if (score, epoch) not in ranked[:self.k]:
            return
        save_torch(self.path(epoch), {"model": model.state_dict(), "epoch": epoch})
        for _, dropped in ranked[self.k:]:
            self.path(dropped).unlink(missing_ok=True)
        self.kept = ranked[:self.k]

    def write_average(self, train_id: str) -> None:
        states = [load_torch(self.path(e))["model"] for _, e in self.kept]
        avg = {key: torch.stack([s[key].float() for s in states]).mean(0).to(states[0][key].dtype) for key in states[0]}
        save_torch(self.out_dir / "avg.pt", {"model": avg, "epochs": [e for _, e in self.kept], "train_id": train_id})


def tensorboard_writer_class():
    """TensorBoard's SummaryWriter (the package is the `tensorboard` extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"train.tensorboard needs the tensorboard package ({e}): pip install tensorboard "
                          f"(or, in mt's checkout, pip install -e '.[tensorboard]')") from None
    return SummaryWriter


def scalar_writer(out_dir: Path):
    """TensorBoard's writer into FOLD/tb."""
    return tensorboard_writer_class()(str(out_dir / "tb"))


def board_tag(key: str) -> str:
    """metrics.csv's column as a TensorBoard tag, grouped: val_f1_age -> val_f1/age, loss_mask -> loss/mask."""
    for group in ("val_f1_", "val_nll_", "loss_"):
        if key.startswith(group):
            return f"{group[:-1]}/{key[len(group):]}"
    return key


def write_scalars(board, row: dict, epoch: int) -> None:
    for key, value in row.items():
        if key not in ("epoch", "train_id"):
            board.add_scalar(board_tag(key), value, epoch)
    board.flush()


def new_train_id() -> str:
    return uuid.uuid4().hex[:16]


def fold_batches(cfg: Config, task: Task, heads: list[Head], data: FoldData, device: torch.device,
                 seed: int) -> tuple[TrainBatches, np.ndarray]:
    """The fold's training batches (drawn by the configured sampler, a shard of them per process
    under torchrun) and which training rows hold every factor (a partial pseudo label does not)."""
    tc = cfg.train
    weights = (sample_weights(task, heads, trained_classes(task, cfg, data.train_factors, data.train_values),
                              tc.sampler, tc.sampler_power) if tc.sampler != "none" else None)
    shard = (dist.rank(), dist.world()) if dist.world() > 1 else None  # batch_size divides: kfold.check_processes
    return TrainBatches(cfg, data.train_images, data.train_targets(), device, seed, weights, shard), \
        (data.train_factors >= 0).all(1)


def head_counts(cfg: Config, task: Task, heads: list[Head], data: FoldData) -> dict[str, np.ndarray]:
    """Each head's class counts over the fold's training rows that hold its factors, in the classes
    training teaches (a numeric factor's training bins): what per-class loss weights are made from."""
    classes = trained_classes(task, cfg, data.train_factors, data.train_values)
    known = {h.name: (classes[:, h.factor_idx] >= 0).all(1) for h in heads}
    return {h.name: np.bincount(h.targets(classes[known[h.name]]), minlength=h.n) for h in heads}


def validate(model, cfg: Config, task: Task, heads: list[Head], data: FoldData,
             device: torch.device) -> tuple[dict, dict]:
    """The validation rows' scores and each head's NLL, one view each (TTA is for the fold's final
    prediction, not for choosing its epoch)."""
    probs = predict_probs(model, data.val_images, cfg, device, views=["none"])
    return score_probs(task, heads, probs, data.val_factors), heads_nll(heads, probs, data.val_factors)


def train_fold(cfg: Config, task: Task, heads: list[Head], data: FoldData, out_dir: Path, seed: int,
               device: torch.device, progress=None, label: str = "fold", resume: bool = False,
               on_epoch=None, settings: str | None = None) -> dict:
    """Train, validate each epoch, checkpoint; return the best epoch's validation scores and the
    training's id. With `resume`, carry on from out_dir/last.pt where there is one: on the CPU the
    result is the one an uninterrupted run gives (batch order and augmentation are seeded per epoch,
    RNG states restored).

    Every metrics row and checkpoint carries the training's id (a fresh one unless resumed), and so
    do the predictions made from it: outputs of two trainings of one fold never pass for one.
    `on_epoch(number, row)` sees each epoch's metrics row as it is written (the tuner reports it to
    its pruner, which may stop the trial by raising)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    seed_everything(seed)
    batches, labelled = fold_batches(cfg, task, heads, data, device, seed)
    t = build_training(cfg, task, heads, device, len(batches), head_counts(cfg, task, heads, data),
                       partial=not labelled.all())
    model, ema, optimizer, scheduler, criterion = t.model, t.ema, t.optimizer, t.scheduler, t.criterion
    step_model = dist.wrap(t.step_model, device)
    main = dist.is_main()  # under torchrun, rank 0 alone validates and writes
    progress = progress if main else None

    mixer = BatchMixer(cfg.aug.mix, {h.name: h.n for h in heads})
    start, step, best, rows, train_id = 0, 0, {"f1": -1.0}, [], new_train_id()
    if resume and (out_dir / "last.pt").exists():
        start, step, best, rows, train_id = resume_from(out_dir / "last.pt", t, device)
    top = TopEpochs(out_dir, tc.avg_top_k, rows)
    board = scalar_writer(out_dir) if tc.tensorboard and main else None
    task_id = progress.add_task(label, total=(tc.epochs - start) * len(batches)) if progress else None
    for epoch in range(start, tc.epochs):
        t0 = time.perf_counter()

        def on_step(_):
            if progress:
                progress.update(task_id, advance=1, description=f"{label} epoch {epoch + 1}/{tc.epochs}")

        mix = partial(mixer, gen=mix_generator(seed, epoch)) if mixer.active(epoch) else None
        loss_sums, seen, step = train_one_epoch(step_model, model, batches.epoch(epoch), t.targets, criterion,
                                                optimizer, scheduler, ema, cfg, device, step, on_step, mix)
        loss_sums = dist.sum_over_ranks(loss_sums | {"seen": seen})
        seen = loss_sums.pop("seen")
        train_s = time.perf_counter() - t0
        check_finite(float(loss_sums["loss"]), label, epoch + 1, tc.lr)  # every rank: they stop together
        if not main:
            continue

        eval_model = ema.module if ema is not None else model
        t1 = time.perf_counter()
        scores, nll = validate(eval_model, cfg, task, heads, data, device)
        number = epoch + 1  # epochs are counted from 1 everywhere a person reads them
        row = {"epoch": number, "lr": scheduler.get_last_lr()[0], "train_loss": loss_sums["loss"] / seen}
        row |= {f"loss_{name}": loss_sums[name] / seen for name in criterion.fns}
        row |= {f"val_{k}": v for k, v in scores.items()} | {f"val_nll_{k}": v for k, v in nll.items()}
        row |= {"train_img_s": seen / train_s, "train_s": train_s, "validate_s": time.perf_counter() - t1,
                "train_id": train_id}
        rows.append(row)
        atomic_write_text(out_dir / "metrics.csv", pd.DataFrame(rows).to_csv(index=False))
        if on_epoch is not None:
            on_epoch(number, row)
        if board is not None:
            write_scalars(board, row, number)
        if scores["f1"] > best["f1"]:
            best = scores | {"epoch": number}
            save_torch(out_dir / "best.pt", {"model": eval_model.state_dict(), "epoch": number, "scores": scores,
                                             "train_id": train_id})
        top.offer(number, scores["f1"], eval_model)
        save_torch(out_dir / "last.pt", last_state(t, number, step, best, device, train_id, settings))
        if progress:
            progress.console.print(
                f"  {label} epoch {number}/{tc.epochs}  loss {row['train_loss']:.3f}  "
                + "  ".join(f"{h.name} {scores[f'f1_{h.name}']:.3f}" for h in heads)
                + f"  F1 {scores['f1']:.3f}  ({row['train_img_s']:.0f} img/s)", soft_wrap=True)
    if tc.avg_top_k > 0 and main:
        top.write_average(train_id)
    if board is not None:
        board.close()
    if progress:
        progress.remove_task(task_id)
    dist.barrier()  # the other ranks read what rank 0 wrote only after this
    return dist.broadcast(best | {"train_id": train_id})
