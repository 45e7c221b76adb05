#!/usr/bin/env python3
"""What serving a finished run costs and keeps, on the CPU: the torch fold ensemble with TTA as
`mt predict` runs it (each picture on its own, so without the subjects reading, `decide.subjects`,
that `mt submit` applies to a whole test set: what an ONNX file can serve), that ensemble as one
fp32 ONNX file, a distilled student in torch, as fp32 ONNX and as int8 ONNX. Prints one JSON line.

  python scripts/bench_serve.py --run RUN --answers DATA/answers.csv               # distils a student first
  python scripts/bench_serve.py --run RUN --answers DATA/answers.csv --student ST  # a student already trained
  python scripts/bench_serve.py --quick                                            # CPU smoke run, generated data

The held-out set is the run's own test images (eval/info.csv), scored against `--answers`
(ImageID,ans) with the final-class macro F1 of the competition, each variant with the run's
decision offsets as `predict` applies them (so `ensemble_torch_f1` can fall short of the run's
submission where it reads subjects). Images are decoded once, before the clock starts; model
loading is not timed either: a full batch warms each variant up, then whole passes over the images
are timed until `--seconds` have passed (3 s; at least one pass; `--quick` 0.3 s, a smoke run's
figures mean nothing). Each variant runs in its own process, so `<variant>_peak_mb` is that
process's peak RSS (interpreter, libraries, decoded images and the model). Keys per variant: `<variant>_img_s`, `<variant>_f1`, `<variant>_mb` (the model's files
on disk), `<variant>_peak_mb`; and `int8_student_speedup` = student_int8_img_s / ensemble_torch_img_s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("ensemble_torch", "ensemble_onnx", "student_torch", "student_onnx", "student_int8")
MIN_SECONDS = 3.0  # the timed window per variant, unless --seconds


def held_out(run: Path, answers: Path) -> tuple[list[str], np.ndarray]:
    """The run's test images and their true classes."""
    import pandas as pd

    from multitask.context import reopen_context

    ctx = reopen_context(run, with_images=False)
    truth = pd.read_csv(answers, dtype={"ImageID": str}).set_index("ImageID")["ans"]
    ids = ctx.table.test["image_id"].astype(str)
    missing = sorted(set(ids) - set(truth.index))
    if missing:
        sys.exit(f"{answers}: no answer for {len(missing)} of the run's test images, e.g. {missing[0]}")
    return ctx.table.test["path"].tolist(), truth.loc[ids].to_numpy()


def measure(variant: str, model: str, paths: list[str], batch: int, seconds: float = MIN_SECONDS) -> dict:
    """One variant, in this process: (img/s, predicted classes)."""
    if variant.endswith("_torch"):
        from multitask.context import build_task, load_run_config
        from multitask.decide import load_decision, predict_classes
        from multitask.inference import DecodedImages, run_outputs
        from multitask.run import RunDir

        run = RunDir(model)
        cfg = load_run_config(run, [f"train.eval_batch_size={batch}"])
        task, heads = build_task(cfg)
        r, _ = run.choose_round(cfg.train.folds)
        decision = load_decision(run.round_dir(r))
        decoded = DecodedImages(paths, 0)
        decoded.at(tuple(cfg.data.img_size))
        models = {}
        overrides = [f"train.eval_batch_size={batch}"]

        def predict(rows):
            return predict_classes(task, heads, run_outputs(run, r, overrides, decoded, rows, None, models), cfg,
                                   decision)[1]
    else:
        from multitask.serve import ServedModel

        served = ServedModel(model)
        images, bad = served.decode(paths)
        assert not bad, bad

        def predict(rows):
            return served.classes(served.probs(images[rows], batch)["final"])
    predict(np.arange(min(batch, len(paths))))  # a full batch first: models loaded, memory planned
    passes, t0 = 0, time.perf_counter()
    while not passes or time.perf_counter() - t0 < seconds:  # steady state: whole passes, `seconds` at least
        classes = predict(np.arange(len(paths)))
        passes += 1
    elapsed = time.perf_counter() - t0
    return {"img_s": passes * len(paths) / elapsed, "passes": passes, "classes": classes.tolist(), "peak_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux keeps ru_maxrss across exec (a child would report its
    parent's peak), so VmHWM, which starts afresh with the new program, where there is one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_mb(variant: str, model: str) -> float:
    if not variant.endswith("_torch"):
        return os.path.getsize(model) / 2**20
    from multitask.context import load_run_config
    from multitask.inference import round_models
    from multitask.run import RunDir

    run = RunDir(model)
    cfg = load_run_config(run)
    r, _ = run.choose_round(cfg.train.folds)
    if cfg.ensemble is not None:
        return sum(model_mb(variant, m) for m in cfg.ensemble.runs)
    return sum(p.stat().st_size for p in round_models(run, r, cfg)) / 2**20


def in_subprocess(variant: str, model: str, paths_file: Path, batch: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--variant", variant, "--model", model, "--paths", str(paths_file),
                          "--batch-size", str(batch), "--seconds", str(seconds)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def quick_run(work: Path) -> tuple[Path, Path]:
    """A tiny trained run on generated data, and its answer key."""
    from multitask.config import load_config
    from multitask.data.synthetic import make_demo_dataset
    from multitask.kfold import train_run

    data = make_demo_dataset(work / "data", n_train_persons=12, n_eval_persons=4, image_size=(64, 48), seed=0)
    cfg = load_config(None, [f"data_root={work / 'data'}", "train.device=cpu", "model.backbone=test_efficientnet",
                             "data.img_size=[32, 32]", "train.folds=2", "train.epochs=1", "train.batch_size=16",
                             f"data.cache_dir={work / 'cache'}"])
    train_run(cfg, work / "run")
    return work / "run", Path(data["answers"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a finished k-fold run (the teacher)")
    ap.add_argument("--answers", help="ImageID,ans for the run's test images")
    ap.add_argument("--student", help="a student of the run (`mt distill`); default: distil one into --work")
    ap.add_argument("--student-backbone", default=None)
    ap.add_argument("--student-epochs", type=int, default=None)
    ap.add_argument("--work", help="folder for the student and the ONNX files (default: a temp folder)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on generated data: tiny model, one epoch")
    ap.add_argument("--seconds", type=float, default=None, help=f"timed window per variant (default {MIN_SECONDS}; --quick 0.3)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.seconds is not None and a.seconds <= 0:
        ap.error("--seconds must be above 0")
    if a.seconds is None:
        a.seconds = 0.3 if a.quick else MIN_SECONDS
    if a.variant:  # one measurement, in a process of its own
        print(json.dumps(measure(a.variant, a.model, Path(a.paths).read_text().splitlines(), a.batch_size,
                                 a.seconds)))
        return

    from multitask.context import build_task, load_run_config
    from multitask.distill import distill
    from multitask.export import export_run
    from multitask.metrics import macro_f1
    from multitask.run import RunDir

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MT_CACHE_DIR", str(work / "cache"))
        if a.quick:
            run, answers = quick_run(work)
            a.student_epochs = a.student_epochs or 1
        elif a.run and a.answers:
            run, answers = Path(a.run), Path(a.answers)
        else:
            ap.error("--run and --answers (or --quick)")
        t0 = time.perf_counter()
        student = Path(a.student) if a.student else work / "student"
        if not a.student:
            distill(run, student, backbone=a.student_backbone, epochs=a.student_epochs, force=True)
        distill_s = time.perf_counter() - t0
        files = {"ensemble_onnx": work / "ensemble.onnx", "student_onnx": work / "student.onnx",
                 "student_int8": work / "student.int8.onnx"}
        checks = {"ensemble_onnx": export_run(run, files["ensemble_onnx"]),
                  "student_onnx": export_run(student, files["student_onnx"]),
                  "student_int8": export_run(student, files["student_int8"], int8=True)}
        paths, truth = held_out(run, answers)
        n_classes = build_task(load_run_config(RunDir(run)))[0].n_classes
        paths_file = work / "paths.txt"
        paths_file.write_text("\n".join(paths))
        models = {"ensemble_torch": str(run), "student_torch": str(student)} | {k: str(v) for k, v in files.items()}
        result = {"n_images": len(paths), "threads": os.cpu_count(), "batch_size": a.batch_size,
                  "seconds": a.seconds, "run": str(run),
                  "student": str(student), "distill_s": round(distill_s, 1) if not a.student else None}
        for variant in VARIANTS:
            m = in_subprocess(variant, models[variant], paths_file, a.batch_size, a.seconds)
            result[f"{variant}_img_s"] = round(m["img_s"], 1)
            result[f"{variant}_f1"] = round(macro_f1(truth, np.asarray(m["classes"]), n_classes), 4)
            result[f"{variant}_mb"] = round(model_mb(variant, models[variant]), 3)
            result[f"{variant}_peak_mb"] = round(m["peak_mb"], 1)
        result["int8_student_speedup"] = round(result["student_int8_img_s"] / result["ensemble_torch_img_s"], 2)
        # the int8 student's F1 minus the other's (positive: int8 scores higher), as docs/PERFORMANCE.md prints them
        result["student_f1_gap"] = round(result["student_int8_f1"] - result["ensemble_torch_f1"], 4)
        result["int8_vs_fp32_f1_gap"] = round(result["student_int8_f1"] - result["student_onnx_f1"], 4)
        result["int8_size_ratio"] = round(result["student_onnx_mb"] / result["student_int8_mb"], 2)
        result["ensemble_onnx_max_abs_diff"] = checks["ensemble_onnx"]["max_abs_diff"]
        result["int8_agreement_train"] = checks["student_int8"]["int8_agreement"]
        print(json.dumps(result))


if __name__ == "__main__":
    main()
