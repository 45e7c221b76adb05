"""Device helpers shared by training and prediction: which device (and which ones a round's
workers spread over), its fast kernels, autocast and memory format. bf16 autocast and
channels_last on CUDA; plain fp32 on the CPU."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from multitask.config import Config, ConfigError


def resolve_device(name: str) -> torch.device:
    """`train.device` as a torch device, checked here rather than deep in a fold's first batch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: torch names them, mt does not train there
        raise ConfigError(f"train.device {name!r}: mt runs on the CPU or CUDA GPUs only; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible or (device.index or 0) >= visible:
            raise ConfigError(f"train.device {name!r}: {visible} CUDA GPU(s) visible here; use auto or cpu "
                              f"(--set train.device=cpu, or `mt predict --device cpu` for a run trained elsewhere)")
    return device


def bind(device: str | torch.device) -> None:
    """Make a worker's CUDA device the process's current one: pinned memory, the caching allocator
    and library handles then open their context there, not on GPU 0 (one context per worker on GPU 0
    costs every worker's memory on one card)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def worker_devices(name: str) -> list[str]:
    """`auto` spreads workers over every visible GPU; any other name puts them all on that device."""
    if name == "auto" and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(resolve_device(name))]


def tune_for(device: torch.device) -> None:
    """Fast kernels on CUDA: inputs keep one size, so cuDNN's one-off search for the fastest
    convolution algorithms pays back at once; TF32 for the fp32 work outside autocast. (Both give up
    bitwise reproducibility, which only the CPU promises.)"""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def place_model(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """`model` on `device`, channels-last on CUDA (the layout the batches come in there), with the
    device's fast kernels switched on: one place for training and prediction alike."""
    tune_for(device)
    model = model.to(device)
    if cfg.train.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device, enabled: bool):
    """bf16 on CUDA; the CPU stays fp32 (bf16 autocast is slower than fp32 on most CPUs)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def compiled(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """`model` under torch.compile in `train.compile_mode` where `train.compile` asks for it, else itself."""
    return torch.compile(model, mode=cfg.train.compile_mode) if cfg.train.compile else model


def prepare_input(x: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    if cfg.train.channels_last and device.type == "cuda":
        return x.contiguous(memory_format=torch.channels_last)
    return x
