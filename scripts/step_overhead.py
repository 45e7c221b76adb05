#!/usr/bin/env python3
"""The fixed cost of one of mt's training steps: a config's whole step (engine.train_one_epoch:
model, every head's loss, clipping, the fused AdamW, the schedule) on one synthetic batch, timed at
a size of the caller's choosing, with the number of operators the step dispatches. At a tiny size
(8 px) the arithmetic is nearly nothing, and what is left is the cost of dispatching the operators:
on a GPU, one kernel launch each. Prints one JSON line.

  python scripts/step_overhead.py --config demo --size 8 --batch-size 32
  python scripts/step_overhead.py --config demo --size 64 --batch-size 32 --set train.compile=true \
      --set train.compile_mode=reduce-overhead          # on a GPU: the step as CUDA graphs
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from multitask.config import load_config
from multitask.context import build_task
from multitask.device import resolve_device
from multitask.engine import build_training, train_one_epoch


def measure(config: str | None, size: int, batch: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    cfg = load_config(config, [f"data.img_size=[{size}, {size}]", f"train.batch_size={batch}", *overrides])
    task, heads = build_task(cfg)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(0)
    t = build_training(cfg, task, heads, device, steps_per_epoch=10**4)
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    x = x.float().div(255).to(device)
    # what a training batch carries: each factor's class, then the numbers behind binned factors
    factors = [rng.integers(0, f.n, batch) for f in task.factors]
    numbers = [rng.uniform(f.bins[0] / 2, f.bins[-1] * 1.5, batch) for f in task.numeric_factors]
    y = torch.as_tensor(np.column_stack(factors + numbers), dtype=torch.float32, device=device)

    def run(n: int) -> None:
        train_one_epoch(t.step_model, t.model, ((x, y) for _ in range(n)), t.targets, t.criterion, t.optimizer,
                        t.scheduler, t.ema, cfg, device, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(warmup)  # a compiled step compiles here
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(1)
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    t0 = time.perf_counter()
    run(steps)
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "backbone": cfg.model.backbone, "img_size": size, "batch_size": batch, "compile": cfg.train.compile,
            "compile_mode": cfg.train.compile_mode if cfg.train.compile else None, "steps": steps,
            "step_ms": round(step_ms, 2), "img_s": round(batch / step_ms * 1e3, 1),
            "operators_top_level": len(top), "operators_all": len(aten)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.config, a.size, a.batch_size, a.steps, a.warmup, a.overrides)))


if __name__ == "__main__":
    main()
