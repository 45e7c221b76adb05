"""Data-parallel training with torchrun: which process this is, and the few collective steps the
pipeline needs. Without torchrun (WORLD_SIZE unset or 1) every function is a no-op, so the same code
runs one process or many.

Under torchrun every rank runs the same command: all of them train each fold together (DDP, each on
its share of every batch), and rank 0 alone writes the run directory (config, folds, metrics,
checkpoints, OOF and test predictions, the round's results) and holds the fold locks; the others
wait for it at the points where they would read what it wrote.
"""
from __future__ import annotations

import atexit
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as td


def world() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if world() > 1 else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_name: str = "auto") -> None:
    """Join the process group torchrun describes in the environment: gloo on the CPU; on GPUs NCCL for
    CUDA tensors (DDP's gradients) and gloo beside it for CPU ones (the epoch's loss sums, objects)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or world() > 1:
        return
    cuda = torch.cuda.is_available() and device_name != "cpu" and not device_name.startswith("cpu")
    if cuda:
        torch.cuda.set_device(local_rank())
    td.init_process_group(backend_for(cuda))
    atexit.register(finish)
    previous = sys.excepthook

    def failing(*exc_info):  # an error this rank alone met: the others are not at the exit's barrier
        abandon()
        previous(*exc_info)

    sys.excepthook = failing


_abandoned = False


def abandon() -> None:
    """This process leaves on an error (the CLI's red line, or an uncaught exception): at exit it
    does not wait for the other ranks, which may be in the next epoch's collective and never come.
    Once it is gone, theirs fails and they leave too, instead of all waiting out the group's timeout."""
    global _abandoned
    _abandoned = True


def backend_for(cuda: bool) -> str:
    # NCCL alone takes only CUDA tensors: a CPU all_reduce under it fails at the first epoch's end
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def finish() -> None:
    """Leave the process group together: a rank whose group is torn down at interpreter exit while
    another still talks to it aborts (gloo's threads are still joinable)."""
    if td.is_available() and td.is_initialized():
        try:
            if not _abandoned:
                td.barrier()
        finally:
            td.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """Each rank on its own GPU (LOCAL_RANK); the CPU stays the CPU."""
    if world() > 1 and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if world() > 1:
        td.barrier()


def broadcast(obj):
    """Rank 0's `obj`, on every rank."""
    if world() == 1:
        return obj
    box = [obj if is_main() else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and give its result (or raise its error) on every rank, so that a
    refusal on rank 0 stops the others instead of leaving them waiting."""
    if world() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed to every rank, raised there
            error = e
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result


def main_only(context):
    """`context` on rank 0; a context yielding None on the others."""
    return context if is_main() else nullcontext(None)


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (on the CPU: float64, so that counts stay exact)."""
    if world() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    td.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model under DistributedDataParallel when there are several ranks (gradients averaged over
    them in backward), else the model itself."""
    if world() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
