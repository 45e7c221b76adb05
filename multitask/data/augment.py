"""Augmentation, two ways over the same uint8 cache.

- albumentations: per image on uint8 (H, W, 3) in the loader workers, transforms named in the config.
- torch: per batch on the training device (flip, affine crop, brightness, contrast) in one
  `grid_sample`, so a GPU needs no CPU workers at all. Random draws come from a CPU generator, so a
  seeded run is the same on any device.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from multitask.config import ConfigError, MixCfg, TorchAugCfg


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
            with warnings.catch_warnings():
                # an unknown argument is only warned about, and ignored: here it is a typo to report
                warnings.filterwarnings("error", message=".*not valid", category=UserWarning)
                transforms.append(cls(**params))
        except Exception as e:  # albumentations validates its params with pydantic and raises various errors
            raise ConfigError(f"{where}: {spec['name']}({params}) is invalid: {e}") from None
    return A.Compose(transforms)


def check_albumentations(specs: list[dict], size: tuple[int, int], where: str = "aug.train") -> None:
    """Each transform, fired once on a picture of the cache's size, keeps it uint8 of that size: the
    cache is already at data.img_size, training writes each picture back into a uint8 batch of that
    shape, and the model normalises the pixels itself (a Normalize would be cast back to uint8, a
    Resize or crop would not fit)."""
    compose = build_albumentations(specs, where)
    if compose is None:
        return
    picture = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    for spec, transform in zip(specs, compose.transforms):
        fired = copy.deepcopy(transform)
        fired.p = 1.0
        out = np.asarray(fired(image=picture)["image"])
        if out.dtype != np.uint8:
            raise ConfigError(f"{where}: {spec['name']} turns the uint8 picture into {out.dtype}; the model "
                              f"normalises the pixels itself, leave it out")
        if out.shape != picture.shape:
            raise ConfigError(f"{where}: {spec['name']} turns a {size[0]}x{size[1]} picture into "
                              f"{out.shape[0]}x{out.shape[1]}; pictures are cached at data.img_size, so a "
                              f"transform must keep their size (a crop: Affine's scale, or RandomResizedCrop to data.img_size)")


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def augment_batch(x: torch.Tensor, cfg: TorchAugCfg, gen: torch.Generator,
                  share: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Random flip + affine + brightness/contrast for a float batch in [0, 1], (N, 3, H, W).
    `share` (positions, batch size): x is these rows of a batch one process would augment whole
    (a torchrun rank's share): the draws are the whole batch's, so the ranks together augment it as
    one process would, and never alike."""
    n, picked = (x.shape[0], slice(None)) if share is None else (share[1], share[0])
    flip = torch.where(torch.rand(n, generator=gen) < cfg.hflip, -1.0, 1.0)[picked]
    scale = _uniform(gen, n, *cfg.scale)[picked]
    angle = _uniform(gen, n, -cfg.rotate, cfg.rotate)[picked] * (math.pi / 180)
    shift = _uniform(gen, 2 * n, -2 * cfg.translate, 2 * cfg.translate).view(n, 2)[picked]  # grid spans [-1, 1]
    bright = _uniform(gen, n, 1 - cfg.brightness, 1 + cfg.brightness)[picked]
    contrast = _uniform(gen, n, 1 - cfg.contrast, 1 + cfg.contrast)[picked]
    n = x.shape[0]

    # theta maps output to input coordinates, so zooming in (scale > 1) divides; the grid's x and y
    # both span [-1, 1] whatever H and W, so a rotation in pixels carries the aspect ratio (without
    # it a 256x192 picture was sheared, its right angles turned to 83 degrees)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    h_over_w = x.shape[2] / x.shape[3]
    theta = torch.stack([torch.stack([cos * flip, -sin * h_over_w, shift[:, 0]], 1),
                         torch.stack([sin * flip / h_over_w, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    view = (n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast.to(x.device, x.dtype).view(view) + mean
    x = x * bright.to(x.device, x.dtype).view(view)
    return x.clamp_(0, 1)


ZOOM = 0.9  # the share of each side a zoom view keeps


def tta_view(x: torch.Tensor, view: str) -> torch.Tensor:
    if view == "none":
        return x
    if view == "hflip":
        return x.flip(-1)
    if view in ("zoom", "zoom_hflip"):
        h, w = (int(n) for n in x.shape[-2:])  # ints: an ONNX export fixes the image size
        dh, dw = round(h * (1 - ZOOM) / 2), round(w * (1 - ZOOM) / 2)
        z = F.interpolate(x[..., dh:h - dh, dw:w - dw], size=(h, w), mode="bilinear", align_corners=False)
        return z.flip(-1) if view == "zoom_hflip" else z
    raise ValueError(f"unknown TTA view {view!r}")


class BatchMixer:
    """MixUp / CutMix of a training batch and of every head's targets with the same λ (heads' hard
    labels become one-hot first; numbers of auxiliary outputs mix linearly). Draws come from the
    epoch's generator, so a seeded run mixes the same way on any device."""

    def __init__(self, cfg: MixCfg, head_sizes: dict[str, int]):
        self.cfg, self.head_sizes = cfg, head_sizes

    def active(self, epoch: int) -> bool:
        c = self.cfg
        return (c.mixup_alpha > 0 or c.cutmix_alpha > 0) and (c.stop_epoch is None or epoch < c.stop_epoch)

    def __call__(self, x: torch.Tensor, targets: dict[str, torch.Tensor], gen: torch.Generator):
        c = self.cfg
        if torch.rand(1, generator=gen).item() >= c.prob:
            return x, targets
        cutmix = c.cutmix_alpha > 0 and (c.mixup_alpha <= 0 or torch.rand(1, generator=gen).item() < c.switch_prob)
        alpha = c.cutmix_alpha if cutmix else c.mixup_alpha
        # a Beta draw from two Gammas, from the epoch's generator (torch's Beta takes no generator)
        g = torch._standard_gamma(torch.full((2,), float(alpha)), generator=gen)
        lam = float(g[0] / g.sum())
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        if cutmix:
            h, w = x.shape[-2:]
            ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy, cx = (int(v) for v in torch.randint(0, 10**9, (2,), generator=gen) % torch.tensor([h, w]))
            y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of the picture that is really the row's own
        else:
            x = lam * x + (1 - lam) * x[perm]
        mixed = {}
        for name, t in targets.items():
            if name in self.head_sizes and t.ndim == 1:
                # an unknown label (-1, a partial pseudo label) brings no class's share
                t = F.one_hot(t.long().clamp(min=0), self.head_sizes[name]).float() * (t >= 0)[:, None]
            mixed[name] = lam * t + (1 - lam) * t[perm]
            if name in self.head_sizes:
                # mixed with an unknown label, a row's target would sum to λ or 1 - λ, and the loss would
                # take it for a label (smoothing and soft F1 spread the missing share over every class):
                # the row stays unknown for this head instead
                known = t.sum(1) > 0
                mixed[name] = mixed[name] * (known & known[perm])[:, None]
        return x, mixed
