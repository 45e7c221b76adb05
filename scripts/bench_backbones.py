#!/usr/bin/env python3
"""Training speed of timm backbones on this machine: what fits a time budget before a study row
spends minutes on it. One fp32 training step (AdamW) on random inputs, repeated for a few seconds
after three warm-up steps; prints one JSON line per backbone.

  python scripts/bench_backbones.py --size 64 test_efficientnet test_convnext lcnet_050 resnet10t
"""
import argparse
import json
import time

import timm
import torch


def train_img_s(name: str, size: int, batch: int, seconds: float) -> dict:
    model = timm.create_model(name, pretrained=False, num_classes=8)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size)
    model.train()

    def step():
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()

    for _ in range(3):
        step()
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return {"backbone": name, "img_size": size, "batch_size": batch,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "train_img_s": round(steps * batch / (time.perf_counter() - t0), 1), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbones", nargs="+")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0)
    a = ap.parse_args(argv)
    for name in a.backbones:
        print(json.dumps(train_img_s(name, a.size, a.batch_size, a.seconds)), flush=True)


if __name__ == "__main__":
    main()
