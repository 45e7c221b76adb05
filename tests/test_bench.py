"""The throughput benchmark runs end to end and reports every figure the performance issue asks for
(the figures themselves are measured by running the script, never asserted in a unit test)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_throughput.py"


def test_bench_throughput_quick_prints_one_json_line(capsys, script_module):
    script_module("bench_throughput").main(["--quick", "--n-images", "14", "--steps", "2", "--warmup", "1",
                                            "--folds", "2", "--img-size", "64x48", "--batch-size", "4"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("model_bound_img_s", "pipeline_img_s", "naive_img_s", "cache_build_s", "infer_img_s", "run_img_s",
                "run_vs_model_bound", "peak_rss_mb", "device", "model", "img_size"):
        assert key in result, key
    assert result["n_images"] == 14 and result["img_size"] == [64, 48]
    assert all(result[k] > 0 for k in ("model_bound_img_s", "pipeline_img_s", "naive_img_s", "infer_img_s", "run_img_s"))
    assert result["run_train_images"] + result["run_val_images"] == 14


def test_bench_kfold_quick_prints_one_json_line(tmp_path, capsys, script_module):
    script_module("bench_kfold").main(["--quick", "--data", str(tmp_path)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_train_images"] == 14 * 7 and result["n_test_images"] == 3 * 7
    assert result["folds"] == 2 and result["epochs"] == 1
    assert result["total_s"] >= result["train_run_s"] > 0
    assert 0 <= result["submission_f1"] <= 1 and 0 <= result["oof_f1"] <= 1


def test_bench_serve_quick_prints_one_json_line():
    script = SCRIPT.parent / "bench_serve.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    variants = ("ensemble_torch", "ensemble_onnx", "student_torch", "student_onnx", "student_int8")
    for v in variants:
        assert result[f"{v}_img_s"] > 0 and 0 <= result[f"{v}_f1"] <= 1
        assert result[f"{v}_mb"] > 0 and result[f"{v}_peak_mb"] > 0
    assert result["n_images"] == 4 * 7 and result["seconds"] == 0.3  # a smoke run's timed window
    assert result["int8_student_speedup"] == round(result["student_int8_img_s"] / result["ensemble_torch_img_s"], 2)
    assert result["ensemble_onnx_max_abs_diff"] <= 1e-4
    # the same ensemble, as torch and as ONNX, predicts the same classes
    assert result["ensemble_onnx_f1"] == result["ensemble_torch_f1"]


def test_bench_backbones_prints_a_json_line_per_backbone(capsys, script_module):
    script_module("bench_backbones").main(["test_efficientnet", "lcnet_050", "--size", "32", "--batch-size", "4",
                                           "--seconds", "0.2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["backbone"] for r in rows] == ["test_efficientnet", "lcnet_050"]
    assert all(r["train_img_s"] > 0 and r["params_m"] > 0 and r["img_size"] == 32 for r in rows)


def test_step_overhead_counts_a_steps_operators_and_times_it(capsys, script_module):
    script_module("step_overhead").main(["--size", "8", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--set", "train.device=cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["backbone"] == "test_efficientnet" and result["img_size"] == 8 and result["batch_size"] == 4
    assert result["step_ms"] > 0 and result["operators_all"] >= result["operators_top_level"] > 100
