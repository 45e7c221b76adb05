#!/usr/bin/env python3
"""A run's decision without its offsets (the auxiliary blend alone): fold-honest OOF macro F1 and the
held-out score of the submission it would make.

  python scripts/blend_only.py RUN DATA    # DATA: the build_maskset.py build the run trained on
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from multitask.context import build_task, load_run_config
from multitask.decide import blend_only, honest_scores, load_decision, predict_classes
from multitask.ensemble import oof_votes_without
from multitask.run import RunDir, head_probs, load_npz
run, data = RunDir(sys.argv[1]), Path(sys.argv[2])
cfg = load_run_config(run); task, heads = build_task(cfg)
cfg_none = cfg.model_copy(update={"decide": cfg.decide.model_copy(update={"offsets": "none"})})
d = blend_only(load_decision(run.round_dir(0)))
oof = load_npz(run.round_dir(0) / "oof.npz"); probs = head_probs(oof)
values = {k[6:]: v for k, v in oof.items() if k.startswith("value_")}
honest = honest_scores(task, heads, probs, oof["factors"], values, oof["fold"], cfg_none,
                       probs_without=oof_votes_without(cfg))  # an ensemble's weights refitted too
t = load_npz(run.round_dir(0) / "test_probs.npz")
_, cls = predict_classes(task, heads, head_probs(t), cfg, d)
info = pd.read_csv(data / "eval" / "info.csv")
sub = pd.DataFrame({"ImageID": t["image_id"], "ans": cls}).set_index("ImageID").loc[info["ImageID"]].reset_index()
with tempfile.TemporaryDirectory() as tmp:
    sub.to_csv(Path(tmp) / "s.csv", index=False)
    held = json.loads(subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "score.py"), str(data / "answers.csv"), str(Path(tmp) / "s.csv")], capture_output=True, text=True).stdout)
print(json.dumps({"run": str(run.root), "blend": d.blend if d else None, "oof_honest_blend_only": {k: round(v, 4) for k, v in honest.items()} if honest else None, "held_out_blend_only": held}))
