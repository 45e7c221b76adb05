"""`mt demo`: a synthetic data set in the competition layout, then train → pseudo-label → submit
with configs/demo.yaml, everything under one folder, scored against the generated answer key."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.config import ConfigError, load_config
from multitask.data.synthetic import AGE_EDGES, make_demo_dataset
from multitask.kfold import train_run
from multitask.labels import mask_task
from multitask.metrics import macro_f1
from multitask.pseudo import pseudo_label
from multitask.run import write_json
from multitask.submit import make_submission


def score_submission(answers: Path, submission: Path, age_bins=(30, 60)) -> dict:
    """The competition metric (as ../shared/tools/score.py computes it) of a submission."""
    task = mask_task(list(age_bins))
    truth = pd.read_csv(answers).set_index("ImageID")["ans"]
    sub = pd.read_csv(submission).set_index("ImageID")["ans"]
    y, p = truth.to_numpy(), sub.reindex(truth.index).to_numpy()
    out = {"n": len(y), "f1_18": macro_f1(y, p, task.n_classes), "acc_18": float((y == p).mean())}
    for i, f in enumerate(task.factors):
        out[f"f1_{f.name}"] = macro_f1(task.decode(y)[:, i], task.decode(p)[:, i], f.n)
    return out


def demo_config(out: Path, overrides: list[str] = ()):
    """configs/demo.yaml on the demo's data and cache under `out`. The folder is quoted: an
    override's value is YAML, where " #" starts a comment and ": " a mapping."""
    return load_config("demo", [f"data.cache_dir={json.dumps(str(out / 'cache'))}", *overrides], data=out / "data")


def run_demo(out: str | Path, n_train_persons: int = 80, n_eval_persons: int = 16,
             overrides: list[str] = (), progress=None, log=print) -> dict:
    out = Path(out)
    cfg = demo_config(out, overrides)
    if tuple(cfg.data.age_bins) != AGE_EDGES:
        # its answers and the age its pictures show (hair colour) follow these edges, whatever the config
        raise ConfigError(f"mt demo: its generated faces show their age group at {list(AGE_EDGES)} years, so "
                          f"data.age_bins must stay {list(AGE_EDGES)} (got {list(cfg.data.age_bins)}); "
                          f"try other age groups on your own data with mt train")
    data = make_demo_dataset(out / "data", n_train_persons, n_eval_persons, seed=0)
    log(f"data set: {data['n_train_images']} train images, {data['n_eval_images']} test images -> {out / 'data'}")
    summary = train_run(cfg, out / "run", progress, force=True)  # a demo starts over
    log(f"round 0: OOF macro F1 {summary['oof']['f1']:.3f}")
    for rep in pseudo_label(out / "run", progress=progress):
        if not rep["trained"]:
            log(f"round {rep['round']}: no pseudo-labelled test image, not trained")
            continue
        log(f"round {rep['round']}: {rep['added']}/{rep['of']} pseudo-labelled test images added per fold, "
            f"OOF macro F1 {rep['oof_f1']:.3f}")
    sub = make_submission(out / "run", out / "submission.csv", log=log)
    score = score_submission(Path(data["answers"]), sub, cfg.data.age_bins)
    write_json(out / "score.json", score)
    return {"data": str(data["root"]), "run": str(out / "run"), "submission": str(sub), "score": score,
            "oof_f1": float(np.round(summary["oof"]["f1"], 4))}
