"""The project's macro F1 agrees with the competition's own score.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from multitask.demo import score_submission
from multitask.labels import mask_task
from multitask.metrics import macro_f1, score_probs

SCORE_PY = Path(__file__).resolve().parents[2] / "shared" / "tools" / "score.py"


def test_macro_f1_by_hand():
    y = np.array([0, 0, 1, 2])
    p = np.array([0, 1, 1, 1])
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp1 fp2 fn0 -> 2/4; class 2: tp0 -> 0
    assert macro_f1(y, p, 3) == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    # a class absent from truth and prediction is not averaged in; one that is there and never hit counts 0
    assert macro_f1(np.array([0, 0]), np.array([0, 0]), 3) == 1.0
    assert macro_f1(np.array([0, 2]), np.array([0, 0]), 3) == pytest.approx((2 / 3 + 0) / 2)


def test_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 19))
        size = int(rng.integers(1, 40))
        # few rows over many classes: most trials leave some classes out of the truth, the prediction or both
        y, p = rng.integers(0, n, size), rng.integers(0, n, size)
        assert macro_f1(y, p, n) == pytest.approx(f1_score(y, p, average="macro", zero_division=0)), trial


@pytest.mark.skipif(not SCORE_PY.exists(), reason="../shared/tools/score.py not beside the checkout")
@pytest.mark.parametrize("classes", [18, 5])  # 5: most of the 18 classes absent from both files
def test_agrees_with_competition_score_py(tmp_path, classes):
    rng = np.random.default_rng(0)
    ids = [f"{i:04d}.jpg" for i in range(300)]
    y = rng.integers(0, classes, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, classes, 300))
    pd.DataFrame({"ImageID": ids, "ans": y}).to_csv(tmp_path / "answers.csv", index=False)
    pd.DataFrame({"ImageID": ids, "ans": p}).to_csv(tmp_path / "sub.csv", index=False)
    theirs = json.loads(subprocess.run([sys.executable, str(SCORE_PY), str(tmp_path / "answers.csv"),
                                        str(tmp_path / "sub.csv")], capture_output=True, text=True,
                                       check=True).stdout)
    ours = score_submission(tmp_path / "answers.csv", tmp_path / "sub.csv")
    for key in ("f1_18", "acc_18", "f1_mask", "f1_gender", "f1_age"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key


def test_score_probs_reads_factors_off_the_combined_class():
    task = mask_task()
    heads = task.heads("mask,gender_age")
    factors = task.decode(np.arange(18))
    probs = {"mask": np.eye(3)[factors[:, 0]], "gender_age": np.eye(6)[factors[:, 1] * 3 + factors[:, 2]]}
    s = score_probs(task, heads, probs, factors)
    assert s["f1"] == 1.0 and s["f1_mask"] == 1.0 and s["f1_gender_combined"] == 1.0 and s["acc"] == 1.0
