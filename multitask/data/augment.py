"""Augmentation, two ways over the same uint8 cache.

- albumentations: per image on uint8 (H, W, 3) in the loader workers, transforms named in the config.
- torch: per batch on the training device (flip, affine crop, brightness, contrast) in one
  `grid_sample`, so a GPU needs no CPU workers at all. Random draws come from a CPU generator, so a
  seeded run is the same on any device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from multitask.config import ConfigError, TorchAugCfg


def build_albumentations(specs: list[dict], where: str = "aug.train"):
    """An albumentations Compose from [{name: Class, **params}], or None for an empty list."""
    if not specs:
        return None
    import albumentations as A

    transforms = []
    for spec in specs:
        params = {k: v for k, v in spec.items() if k != "name"}
        cls = getattr(A, spec["name"], None)
        if cls is None or not isinstance(cls, type):
            raise ConfigError(f"{where}: {spec['name']!r} is not an albumentations transform")
        try:
            transforms.append(cls(**params))
        except Exception as e:  # albumentations validates its params with pydantic and raises various errors
            raise ConfigError(f"{where}: {spec['name']}({params}) is invalid: {e}") from None
    return A.Compose(transforms)


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def augment_batch(x: torch.Tensor, cfg: TorchAugCfg, gen: torch.Generator) -> torch.Tensor:
    """Random flip + affine + brightness/contrast for a float batch in [0, 1], (N, 3, H, W)."""
    n = x.shape[0]
    flip = torch.where(torch.rand(n, generator=gen) < cfg.hflip, -1.0, 1.0)
    scale = _uniform(gen, n, *cfg.scale)
    angle = _uniform(gen, n, -cfg.rotate, cfg.rotate) * (math.pi / 180)
    shift = _uniform(gen, 2 * n, -2 * cfg.translate, 2 * cfg.translate).view(n, 2)  # grid spans [-1, 1]
    bright = _uniform(gen, n, 1 - cfg.brightness, 1 + cfg.brightness)
    contrast = _uniform(gen, n, 1 - cfg.contrast, 1 + cfg.contrast)

    # theta maps output to input coordinates, so zooming in (scale > 1) divides
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    view = (n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast.to(x.device, x.dtype).view(view) + mean
    x = x * bright.to(x.device, x.dtype).view(view)
    return x.clamp_(0, 1)


def tta_view(x: torch.Tensor, view: str) -> torch.Tensor:
    if view == "none":
        return x
    if view == "hflip":
        return x.flip(-1)
    raise ValueError(f"unknown TTA view {view!r}")
