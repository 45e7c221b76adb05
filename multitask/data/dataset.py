"""Batches for training and inference, from the uint8 cache.

Images travel as uint8 NCHW (a quarter of float32's bytes) and become floats on the device, where
the model normalises them. Labels travel as the task's factor values and numbers (N, F + V) in
float32, followed by a teacher's class probabilities where there is one (distillation, soft pseudo
labels); each head's target is derived from them on the fly (numeric.Targets), so one loader serves
every head, shared or separate backbones alike.
"""
from __future__ import annotations

import random
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from multitask.config import Config
from multitask.data.augment import augment_batch, build_albumentations


@dataclass
class RowImages:
    """Images drawn from several caches (train, test): row i is `arrays[src[i]][idx[i]]`."""
    arrays: list[np.ndarray]
    src: np.ndarray
    idx: np.ndarray

    @classmethod
    def of(cls, array: np.ndarray, rows: np.ndarray | None = None) -> "RowImages":
        rows = np.arange(len(array)) if rows is None else np.asarray(rows)
        return cls([array], np.zeros(len(rows), np.int64), rows.astype(np.int64))

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arrays[self.src[i]][self.idx[i]]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), H, W, 3) uint8, in the order of `rows`."""
        rows = np.asarray(rows)
        first = self.arrays[0]
        out = np.empty((len(rows), *first.shape[1:]), dtype=np.uint8)
        for s, arr in enumerate(self.arrays):
            sel = np.flatnonzero(self.src[rows] == s)
            if len(sel):
                order = self.idx[rows[sel]]
                # sorted reads are sequential on a memmap; put them back in the asked order after
                perm = np.argsort(order, kind="stable")
                out[sel[perm]] = arr[order[perm]]
        return out

    def concat(self, other: "RowImages") -> "RowImages":
        arrays = list(self.arrays)
        src = other.src.copy()
        for s, arr in enumerate(other.arrays):
            pos = next((i for i, a in enumerate(arrays) if a is arr), None)
            if pos is None:
                arrays.append(arr)
                pos = len(arrays) - 1
            src[other.src == s] = pos
        return RowImages(arrays, np.concatenate([self.src, src]), np.concatenate([self.idx, other.idx]))


def to_chw(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)


_DEVICE_COPIES: dict[tuple[int, str], torch.Tensor] = {}


def device_copy(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """One accelerator copy of a whole cache per process, shared by every fold and round that uses it,
    and let go with the array: each of `mt tune`'s trials reads its caches afresh, and copies kept
    for good would fill the GPU trial by trial. (The entry goes when the array does, so its id is
    never another array's while it stands.)"""
    key = (id(array), str(device))
    if key not in _DEVICE_COPIES:
        _DEVICE_COPIES[key] = to_chw(np.array(array)).to(device)  # np.array: the memmap is read-only
        weakref.finalize(array, _DEVICE_COPIES.pop, key, None)
    return _DEVICE_COPIES[key]


class DeviceImages:
    """A RowImages whose caches live on the device (one shared copy of each per process): batches are
    gathered there, with no host copy and no transfer per batch."""

    def __init__(self, images: RowImages, device: torch.device):
        self.stores = [device_copy(arr, device) for arr in images.arrays]
        self.src = torch.as_tensor(images.src, device=device)
        self.idx = torch.as_tensor(images.idx, device=device)
        self.device = device

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), 3, H, W) uint8 on the device, in the order of `rows`."""
        rows = rows.to(self.device)
        src, idx = self.src[rows], self.idx[rows]
        if len(self.stores) == 1:
            return self.stores[0][idx]
        x = torch.empty((len(rows), *self.stores[0].shape[1:]), dtype=torch.uint8, device=self.device)
        for s, store in enumerate(self.stores):
            sel = src == s
            x[sel] = store[idx[sel]]
        return x


class AugmentedImages(Dataset):
    """Per-image albumentations over cached uint8 images, seeded per (epoch, draw): a draw is the
    position in the epoch's order, so the result does not depend on the number of workers, nor on
    whether a worker made it at all, and a row the weighted sampler draws twice gets two pictures.
    Items are (position, row) pairs; a plain index i stands for (i, i)."""

    def __init__(self, images: RowImages, targets: np.ndarray, specs: list[dict], seed: int):
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.float32)
        self.transform = build_albumentations(specs)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def augment(self, img: np.ndarray, position: int) -> np.ndarray:
        if self.transform is None:
            return img
        seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(position)
        # one generator pair for the whole pipeline: Compose.set_random_seed builds a pair for every
        # transform, which at 64 px costs a third of the augmentation itself
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.transform(image=img)["image"]

    def __getitem__(self, item: int | tuple[int, int]):
        position, i = item if isinstance(item, tuple) else (item, item)
        img = np.ascontiguousarray(self.augment(np.array(self.images[i]), position))  # np.array: the cache is read-only
        return torch.from_numpy(img).permute(2, 0, 1), self.targets[i]

    def batch(self, rows: np.ndarray, positions: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' images and targets as a DataLoader over __getitem__ of (position, row) would
        collate them, made in this process without one (no per-item tensors, no collation);
        `positions` default to the rows."""
        positions = rows if positions is None else positions
        images = self.images.take(rows)  # a writable copy
        for j, position in enumerate(positions):
            images[j] = self.augment(images[j], int(position))
        return to_chw(images), self.targets[torch.from_numpy(np.asarray(rows))]


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class TrainBatches:
    """Shuffled, augmented training batches on `device`; `epoch(e)` yields (x float [0,1], y targets: see
    the module's docstring)."""

    def __init__(self, cfg: Config, images: RowImages, targets: np.ndarray, device: torch.device, seed: int,
                 weights: np.ndarray | None = None, shard: tuple[int, int] | None = None):
        """`weights`: draw rows with these probabilities (with replacement, N a epoch) instead of a shuffle.
        `shard` (rank, world): this process's share of every batch under data-parallel training; the
        ranks draw the same order and the same augmentation, so together they see exactly the
        batches one process would."""
        self.cfg, self.device, self.seed, self.shard = cfg, device, seed, shard
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.batch_size = min(cfg.train.batch_size, len(images))
        # BatchNorm cannot train on a batch of one; drop the ragged tail when there is a tail to drop
        self.drop_last = len(images) > cfg.train.batch_size
        self.n = len(images)
        if cfg.aug.backend == "torch":
            self.images = images
            # on the CPU this is one torch copy of the cache in RAM: harmless, and the same code path
            self.device_images = DeviceImages(images, device) if cfg.data.cache_on_device else None
            self.targets = torch.as_tensor(targets, dtype=torch.float32)
        else:
            self.dataset = AugmentedImages(images, targets, cfg.aug.train, seed)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = self._order(gen)
        # each batch's positions in the epoch's order: an image is seeded by its draw, not its row
        whole = self._batches(torch.arange(len(order)))
        batches = [self._share(pos) for pos in whole]
        if self.cfg.aug.backend == "torch":
            for pos, full in zip(batches, whole):
                rows = order[pos]
                x, y = _to_device(self._gather(rows), self.targets[rows], self.device)
                share = None if self.shard is None else (self._share(torch.arange(len(full))), len(full))
                yield augment_batch(x.float().div_(255), self.cfg.aug.torch, gen, share), y
            return
        self.dataset.set_epoch(epoch)
        workers = self.cfg.data.num_workers
        if workers:
            # the workers' own seeds do not matter (every image is seeded by its draw), so a fixed
            # generator keeps the loader from drawing on the global one
            made = DataLoader(self.dataset, batch_sampler=[list(zip(pos.tolist(), order[pos].tolist())) for pos in batches],
                              num_workers=workers, pin_memory=self.device.type == "cuda", prefetch_factor=4,
                              generator=torch.Generator().manual_seed(0))
        else:
            made = (self.dataset.batch(order[pos].numpy(), pos.numpy()) for pos in batches)
        for x, y in made:
            x, y = _to_device(x, y, self.device)
            yield x.float().div_(255), y

    def _order(self, gen: torch.Generator) -> torch.Tensor:
        """The epoch's rows: a permutation, or N weighted draws with replacement."""
        if self.weights is None:
            return torch.randperm(self.n, generator=gen)
        return torch.multinomial(self.weights, self.n, replacement=True, generator=gen)

    def _batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        return [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]

    def _share(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.shard is None else rows[self.shard[0]::self.shard[1]]

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        if self.device_images is not None:
            return self.device_images.take(rows)
        x = to_chw(self.images.take(rows.numpy()))
        return x.pin_memory() if self.device.type == "cuda" else x


def eval_batches(images: RowImages, batch_size: int, device: torch.device,
                 on_device: bool = False) -> Iterator[torch.Tensor]:
    """Plain batches in row order on `device` as float [0, 1]; gathered from the device's copy of the
    caches when `on_device`, else read from the memory map and sent over."""
    if on_device:
        source = DeviceImages(images, device)
        for start in range(0, len(images), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(images)), device=device)
            yield source.take(rows).float().div_(255)
        return
    for start in range(0, len(images), batch_size):
        x = to_chw(images.take(np.arange(start, min(start + batch_size, len(images)))))
        if device.type == "cuda":
            x = x.pin_memory()
        yield x.to(device, non_blocking=True).float().div_(255)
