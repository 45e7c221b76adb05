"""Head probabilities with TTA, and soft voting across folds.

Soft voting averages each head's probabilities (over TTA views, then over folds) before combining
heads into the final class: averaging probabilities keeps each model's confidence, which a hard
majority vote throws away.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from multitask.config import Config
from multitask.data.augment import tta_view
from multitask.data.dataset import RowImages, eval_batches
from multitask.labels import Head
from multitask.model import MultiHeadNet, build_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tune_for(device: torch.device) -> None:
    """Fast kernels on CUDA: inputs keep one size, so cuDNN's one-off search for the fastest
    convolution algorithms pays back at once; TF32 for the fp32 work outside autocast. (Both give up
    bitwise reproducibility, which only the CPU promises.)"""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, enabled: bool):
    """bf16 on CUDA; the CPU stays fp32 (bf16 autocast is slower than fp32 on most CPUs)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def prepare_input(x: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    if cfg.train.channels_last and device.type == "cuda":
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def predict_probs(model: MultiHeadNet, images: RowImages, cfg: Config, device: torch.device,
                  views: list[str] | None = None) -> dict[str, np.ndarray]:
    """Softmax probabilities per head (N, n_h), averaged over the TTA views. They stay on the device
    until the end: a copy to the host per batch would wait for the GPU every batch.

    With `train.compile` the forward is compiled too. Dynamo treats the weights as inputs, so every
    fold's model (and the EMA copy validated each epoch) reuses the same graphs: one for the full
    batch and one, dynamic in the batch size, for the shorter last batches."""
    views = list(cfg.aug.tta if views is None else views)
    was_training = model.training
    model.eval()
    forward = torch.compile(model) if cfg.train.compile else model
    probs = {name: torch.empty((len(images), head.out_features), device=device)
             for name, head in model.heads.items()}
    start = 0
    for x in eval_batches(images, cfg.train.eval_batch_size, device, cfg.data.cache_on_device):
        for i, view in enumerate(views):
            with autocast(device, cfg.train.amp):
                out = forward(prepare_input(tta_view(x, view), cfg, device))
            for name, logits in out.items():
                p = logits.float().softmax(1)
                batch = probs[name][start:start + len(x)]
                if i == 0:
                    batch.copy_(p)
                else:
                    batch.add_(p)
        for p in probs.values():
            p[start:start + len(x)].div_(len(views))
        start += len(x)
    model.train(was_training)
    return {name: p.cpu().numpy() for name, p in probs.items()}


def soft_vote(prob_sets: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.mean([p[name] for p in prob_sets], axis=0) for name in prob_sets[0]}


def load_model(path: Path, cfg: Config, heads: list[Head], device: torch.device) -> MultiHeadNet:
    """A fold's model from its checkpoint; the backbone is built without fetching pretrained weights,
    since the checkpoint already holds every weight."""
    model_cfg = cfg.model.model_copy(update={"pretrained": False, "checkpoint": None})
    model = build_model(model_cfg, heads)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.to(device)
    tune_for(device)
    if cfg.train.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model.eval()
