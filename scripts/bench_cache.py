#!/usr/bin/env python3
"""Decode speed of mt's cache build against a plain PIL decode + resize, on real photos scaled to the
competition's 384x512 JPEGs. Prints one JSON line.

  python scripts/bench_cache.py --faces ../shared/data/utkface --n 1400 --workers 1 2

The faces (200x200) are upscaled once into a temp folder and saved at JPEG quality 92, so the files
have photo content at the competition's size (they are smaller and smoother than real 384x512
photographs, so absolute rates here are optimistic; the ratio to the plain decode is the figure).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from multitask.data.cache import cached_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", required=True, help="folder of face JPEGs (e.g. ../shared/data/utkface)")
    ap.add_argument("--n", type=int, default=1400)
    ap.add_argument("--size", default="256x192", help="cache HxW")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    a = ap.parse_args()
    h, w = (int(v) for v in a.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        src = sorted(Path(a.faces).glob("*.jpg"))[: a.n]
        paths = []
        for i, f in enumerate(src):
            p = Path(tmp) / f"{i}.jpg"
            Image.open(f).convert("RGB").resize((384, 512), Image.Resampling.BICUBIC).save(p, quality=92)
            paths.append(str(p))
        out = {"n": len(paths), "jpeg_kb": round(sum(os.path.getsize(p) for p in paths) / len(paths) / 1024, 1),
               "cache_size": [h, w], "cores": os.cpu_count()}
        sample = paths[:300]
        t0 = time.perf_counter()
        for p in sample:
            with Image.open(p) as im:
                im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        out["pil_decode_resize_img_s_1core"] = round(len(sample) / (time.perf_counter() - t0), 1)
        for k in dict.fromkeys(a.workers):  # a count twice would time its cache's second reading, not a build
            t0 = time.perf_counter()
            arr = cached_images(paths, (h, w), Path(tmp) / f"cache{k}", workers=k)
            out[f"cache_build_img_s_workers{k}"] = round(len(paths) / (time.perf_counter() - t0), 1)
        out["cache_gb_per_18900"] = round(arr.nbytes / len(paths) * 18_900 / 1e9, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
