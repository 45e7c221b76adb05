"""Prediction with an exported run (`mt export`): numpy, Pillow and onnxruntime only.

Nothing here imports torch, timm or pandas: a service needs numpy, Pillow and onnxruntime beside this
package (`pip install --no-deps` it), and predicts with the file alone: the task, the image size and
the decision offsets travel in the file's metadata. Images are decoded and resized exactly as training decoded them
(data/cache.py), and the files written are those of the torch path (outputs.py).

    python -m multitask.serve MODEL.onnx IMAGES OUT.csv [--probs]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from multitask.data.cache import decode_into, undecodable_error
from multitask.labels import Factor, Task
from multitask.outputs import CHUNK, decide_classes, list_images, stream_predictions

META_KEY = "mt"  # the ONNX metadata entry `mt export` writes: the task, image size, decision offsets


def task_meta(task: Task) -> dict:
    return {"name": task.name, "factors": [{"name": f.name, "classes": list(f.classes),
                                            "bins": list(f.bins) if f.bins is not None else None,
                                            "integer": f.integer}
                                           for f in task.factors]}


def task_from_meta(meta: dict) -> Task:
    return Task(meta["task"]["name"], tuple(Factor(f["name"], tuple(f["classes"]),
                                                   tuple(f["bins"]) if f["bins"] is not None else None,
                                                   f.get("integer", False))  # files exported before it
                                            for f in meta["task"]["factors"]))


class ServeError(ValueError):
    pass


def need_serve_extra() -> None:
    """onnx and onnxruntime are the `serve` extra: say so, rather than fail deep inside."""
    import importlib.util

    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(f"{' and '.join(missing)} not installed: pip install onnx onnxruntime "
                         f"(or, in mt's checkout, pip install -e '.[serve]')")


class ServedModel:
    """An exported run in an onnxruntime session, with what its metadata says about it."""

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ServeError("onnxruntime is not installed: pip install onnxruntime") from None

        self.path = onnx_file(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own kinds for a file it cannot load
            raise ServeError(f"{self.path}: onnxruntime cannot load it ({e})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise ServeError(f"{self.path}: no '{META_KEY}' metadata; export the run with `mt export`")
        try:
            self.meta = json.loads(raw)
            self.task = task_from_meta(self.meta)
            self.img_size = tuple(self.meta["img_size"])
            self.offsets = None if self.meta["offsets"] is None else np.asarray(self.meta["offsets"], np.float64)
        except (ValueError, KeyError, TypeError) as e:
            raise ServeError(f"{self.path}: its '{META_KEY}' metadata is damaged ({type(e).__name__}: {e}); "
                             f"export the run again with `mt export`") from None
        self.outputs = [o.name for o in self.session.get_outputs()]

    def probs(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Every output (final-class and head probabilities, auxiliary numeric outputs) for uint8 images
        (N, H, W, 3)."""
        runs = [self.session.run(None, {"images": np.ascontiguousarray(images[i:i + batch_size])})
                for i in range(0, len(images), batch_size)]
        return {name: np.concatenate([r[j] for r in runs]) for j, name in enumerate(self.outputs)}

    def classes(self, final: np.ndarray) -> np.ndarray:
        """The run's decision: argmax, after its offsets where it has them."""
        return decide_classes(final, self.offsets)

    def decode(self, paths: list[str], workers: int = 0) -> tuple[np.ndarray, list[tuple[int, str]]]:
        arr = np.empty((len(paths), *self.img_size, 3), dtype=np.uint8)
        return arr, decode_into(arr, paths, self.img_size, workers)

    def predict_paths(self, paths: list[str], batch_size: int = 256,
                      chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
        """(final-class probabilities, classes) of image files; an undecodable one stops it, all listed."""
        finals, bad = [], []
        for start in range(0, len(paths), chunk):
            images, failed = self.decode(paths[start:start + chunk])
            bad += [(start + i, why) for i, why in failed]
            if not bad:  # after a failure the later chunks are only decoded, so that the error lists them all
                finals.append(self.probs(images, batch_size)["final"])
        if bad:
            raise undecodable_error(paths, bad)
        final = np.concatenate(finals) if finals else np.empty((0, self.task.n_classes), np.float32)
        return final, self.classes(final)


def predict_images(model: str | Path | ServedModel, source: str | Path, out: str | Path, batch_size: int = 256,
                   with_probs: bool = False, skip_bad: bool = False, chunk: int = CHUNK) -> dict:
    """`mt predict --onnx`: the predictions file of `mt predict` (outputs.stream_predictions), with
    the run and round the file was exported from (its metadata)."""
    served = model if isinstance(model, ServedModel) else ServedModel(model)
    ids, paths = list_images(source)

    def predict(images: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        final = served.probs(images[keep], batch_size)["final"]
        return final, served.classes(final)

    result = stream_predictions(served.task, ids, paths, out, chunk, served.decode, predict, with_probs, skip_bad)
    return result | {"model": str(served.path), "run": served.meta["run"], "round": served.meta["round"]}


def onnx_file(path: str | Path) -> Path:
    """`path`, refused unless it is a file: a folder, or nothing there, each said in one line."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path}: a folder; name the .onnx file `mt export` wrote")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX file not found")
    return path


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give 1 or more")
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Predict with an ONNX file from `mt export` (numpy, Pillow, onnxruntime).")
    ap.add_argument("model")
    ap.add_argument("images", help="a folder (recursive), a CSV with a path column, or one image")
    ap.add_argument("out", help="predictions CSV to write")
    ap.add_argument("--probs", action="store_true", help="add every factor's probabilities")
    ap.add_argument("--skip-bad", action="store_true")
    ap.add_argument("--batch-size", type=positive, default=256)
    a = ap.parse_args(argv)
    try:
        result = predict_images(a.model, a.images, a.out, a.batch_size, a.probs, a.skip_bad)
    except (ValueError, FileNotFoundError) as e:  # the service's users' errors, one line as `mt` gives them
        if os.environ.get("MT_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
