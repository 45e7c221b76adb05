#!/usr/bin/env python3
"""Wall time of a whole `mt train` k-fold run, prediction included, on a competition-size synthetic
set. Prints one JSON line.

  python scripts/bench_kfold.py --data /tmp/comp                 # 2,700 + 1,800 persons, configs/competition.yaml
  python scripts/bench_kfold.py --data /tmp/comp --jobs 2        # two folds at once
  python scripts/bench_kfold.py --data /tmp/comp --set train.batch_size=256 --set train.compile=true
  python scripts/bench_kfold.py --quick                          # CPU smoke run

The set is drawn by mt's synthetic generator at the competition's 384x512 (width x height): 7 images
a person, 18,900 train and 12,600 test images by default (generated once into --data and reused;
drawing is not timed). The run starts from a cold cache: `cache_build_s` is the decode of every
train and test image, `train_run_s` is `kfold.train_run` over that cache (folds, every epoch's
validation, best-checkpoint OOF and test prediction with TTA, aggregation), and `total_s` their sum
is what a first `mt train` on the set takes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from multitask.config import load_config
from multitask.data.cache import cached_images
from multitask.data.layout import read_layout
from multitask.data.synthetic import make_demo_dataset
from multitask.demo import score_submission
from multitask.kfold import train_run
from multitask.device import resolve_device
from multitask.run import RunDir
from multitask.submit import make_submission



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 14 persons, 2 folds, 1 epoch")
    ap.add_argument("--data", default=None, help="generate (or reuse) the set here (default: a temp dir)")
    ap.add_argument("--persons", type=int, default=None, help="train persons (7 images each) [2700]")
    ap.add_argument("--eval-persons", type=int, default=None, help="test persons [1800]")
    ap.add_argument("--config", default=None, help="config name or file [competition]")
    ap.add_argument("--jobs", type=int, default=1, help="folds trained at once")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override (repeatable)")
    a = ap.parse_args(argv)

    quick = a.quick
    persons = a.persons or (14 if quick else 2700)
    eval_persons = a.eval_persons if a.eval_persons is not None else (3 if quick else 1800)
    overrides = ["model.backbone=test_efficientnet", "data.img_size=[64, 48]", "train.folds=2", "train.epochs=1",
                 "train.batch_size=16", "train.eval_batch_size=64", "model.drop_rate=0"] if quick else []
    tmp = tempfile.TemporaryDirectory()
    root = Path(a.data or tmp.name) / f"synthetic_{persons}_{eval_persons}"
    t0 = time.perf_counter()
    if not (root / "answers.csv").exists():
        make_demo_dataset(root, persons, eval_persons, image_size=(128, 96) if quick else (512, 384), seed=0,
                          workers=os.cpu_count() or 1)
    generation_s = time.perf_counter() - t0

    cache_dir = Path(tmp.name) / "cache"  # cold on every run of the script
    cfg = load_config(a.config or ("demo" if quick else "competition"), [
        f"data_root={root}", f"data.cache_dir={cache_dir}", f"train.jobs={a.jobs}", *overrides, *a.overrides])
    layout = read_layout(root, cfg.data.age_bins)
    size = tuple(cfg.data.img_size)

    t0 = time.perf_counter()
    cached_images(layout.train["path"].tolist(), size, cache_dir, cfg.data.decode_workers)
    cached_images(layout.test["path"].tolist(), size, cache_dir, cfg.data.decode_workers)
    cache_build_s = time.perf_counter() - t0

    run = Path(tmp.name) / "run"
    t0 = time.perf_counter()
    summary = train_run(cfg, run)
    train_run_s = time.perf_counter() - t0
    sub = make_submission(run)

    epochs = [pd.read_csv(RunDir(run).fold_dir(0, k) / "metrics.csv") for k in summary["folds_done"]]
    device = resolve_device(cfg.train.device)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "config": a.config or ("demo" if quick else "competition"), "overrides": overrides + a.overrides,
        "model": cfg.model.backbone, "img_size": list(size), "batch_size": cfg.train.batch_size,
        "folds": cfg.train.folds, "epochs": cfg.train.epochs, "jobs": cfg.train.jobs, "compile": cfg.train.compile,
        "n_train_images": len(layout.train), "n_test_images": len(layout.test),
        "cache_build_s": round(cache_build_s, 1), "train_run_s": round(train_run_s, 1),
        "total_s": round(cache_build_s + train_run_s, 1), "goal_s": 300,
        # each fold's own epoch loop rate (its time excludes validation); with jobs > 1 folds share the device
        "fold_train_img_s_median": round(float(pd.concat(epochs)["train_img_s"].median()), 1),
        "oof_f1": round(summary["oof"]["f1"], 4),
        "submission_f1": round(score_submission(root / "answers.csv", sub, cfg.data.age_bins)["f1_18"], 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "generation_s": round(generation_s, 1), "torch": torch.__version__,
    }
    print(json.dumps(result))
    tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
