"""The servable ensemble: `mt export` (fp32 and int8 ONNX, checked against PyTorch), prediction with
onnxruntime and without torch (serve.py), and `mt distill` (one student of a run or an ensemble)."""
import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import stopped_in, tiny_config
from multitask import export as export_mod
from multitask import serve
from multitask.cli import app
from multitask.config import ConfigError, load_config
from multitask.context import build_task
from multitask.data.cache import ImageDecodeError
from multitask.data.synthetic import make_table_dataset
from multitask.distill import distill, student_config
from multitask.ensemble import make_ensemble
from multitask.export import ExportError, export_run
from multitask.kfold import train_run
from multitask.numeric import Targets
from multitask.predict import predict_images
from multitask.pseudo import pseudo_label
from multitask.run import RunDir, load_npz, read_json
from multitask.submit import make_submission, make_submission_onnx

LAYOUTS = {
    # every view, the auxiliary regression blended in, offsets per factor class; no subjects: an ONNX
    # file decides each picture on its own, so `mt submit --onnx` equals `mt submit` only without them
    # (with them, the tiny run's fitted weight decides whether the comparison means anything)
    "shared": ["aug.tta=[none, hflip, zoom]", "decide.offsets=factor", "decide.subjects=null"],
    # one backbone per head, an ordinal auxiliary output, a hard vote
    "separate": ["model.sharing=separate", "numeric.age.aux=ordinal", "decide.vote=hard", "aug.tta=[none, hflip]"],
}


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("served")
    out = {}
    for name, overrides in LAYOUTS.items():
        train_run(tiny_config(demo_root, "train.epochs=2", f"data.cache_dir={base / 'cache'}", *overrides), base / name)
        out[name] = base / name
    return out


def export_unwarned(*args) -> dict:
    """export_run, with no TracerWarning about what the trace keeps as constants on purpose (the bin
    edges, a zoom view's image size): torch printed them to every user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check = export_run(*args)
    traced = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not traced, traced
    return check


def read_pair(a, b):
    return pd.read_csv(a), pd.read_csv(b)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_exported_run_predicts_what_torch_predicts(runs, demo_root, tmp_path, layout):
    import socket
    import subprocess

    run = runs[layout]
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    killed = tmp_path / f".m.onnx~{socket.gethostname()}~{proc.pid}~q7.tmp"  # the work folder of an export killed
    (killed / "fp32.onnx").parent.mkdir()
    (killed / "fp32.onnx").write_bytes(b"x" * 100)
    check = export_run(run, tmp_path / "m.onnx")
    assert not killed.exists() and not list(tmp_path.glob(".*.tmp"))
    assert check["max_abs_diff"] <= 1e-4 and check["images"] > 0
    summary = read_json(RunDir(run).round_dir(0) / "summary.json")
    meta = serve.ServedModel(tmp_path / "m.onnx").meta
    assert meta["folds"] == len(summary["folds_done"]) == 2
    assert meta["views"] == load_config(RunDir(run).config).aug.tta
    predict_images(run, demo_root / "eval" / "images", tmp_path / "torch.csv", with_probs=True)
    result = serve.predict_images(tmp_path / "m.onnx", demo_root / "eval" / "images", tmp_path / "onnx.csv", with_probs=True)
    a, b = read_pair(tmp_path / "torch.csv", tmp_path / "onnx.csv")
    assert result["predicted"] == len(a) > 0 and result["run"] == str(run.resolve()) and result["round"] == 0
    assert list(a.columns) == list(b.columns)
    assert a["path"].tolist() == b["path"].tolist()
    assert (a["class"] == b["class"]).all()
    probs = [c for c in a.columns if c == "prob" or c.startswith("p_")]
    assert np.abs(a[probs].to_numpy() - b[probs].to_numpy()).max() < 1e-4


def test_the_reference_runs_on_the_cpu_in_fp32_whatever_the_runs_device(runs, tmp_path, monkeypatch):
    """The graph is fp32: compared with `mt predict` on a GPU (bf16 autocast) every export would be
    refused. A run whose config names CUDA exports on a machine without one, so the reference ran
    on the CPU."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["shared"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["device"] = "cuda"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    seen = []
    real = export_mod.run_outputs
    monkeypatch.setattr(export_mod, "run_outputs", lambda run_, r, overrides, *a, **k: seen.append(overrides)
                        or real(run_, r, overrides, *a, **k))
    check = export_run(run, tmp_path / "m.onnx")
    assert seen == [["train.device=cpu"]] and check["max_abs_diff"] <= 1e-4


def test_batch_size_is_dynamic_and_the_decision_offsets_travel_in_the_file(runs, tmp_path):
    export_run(runs["shared"], tmp_path / "m.onnx")
    served = serve.ServedModel(tmp_path / "m.onnx")
    decision = read_json(RunDir(runs["shared"]).round_dir(0) / "decision.json")["decision"]
    assert served.offsets is not None and np.allclose(served.offsets, decision["offsets"])
    images = np.random.default_rng(0).integers(0, 256, (5, *served.img_size, 3), dtype=np.uint8)
    one_by_one = np.concatenate([served.probs(images[i:i + 1])["final"] for i in range(5)])
    together = served.probs(images, batch_size=5)["final"]
    assert np.abs(one_by_one - together).max() < 1e-5
    assert np.allclose(together.sum(1), 1, atol=1e-5)


def test_an_export_that_differs_from_torch_writes_nothing(runs, tmp_path, monkeypatch):
    real = export_mod.reference
    monkeypatch.setattr(export_mod, "reference", lambda *a: {k: v + 1e-3 for k, v in real(*a).items()})
    with pytest.raises(ExportError, match="differs from PyTorch by up to 0.001"):
        export_run(runs["shared"], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_int8_export_loads_predicts_and_reports_its_agreement(runs, demo_root, tmp_path):
    from multitask.context import reopen_context
    from multitask.export import sample_rows

    check = export_run(runs["shared"], tmp_path / "m8.onnx", int8=True)
    assert check["calibration_images"] > 0 and check["int8_mb"] < check["fp32_mb"]
    # the agreement it reports is that of the int8 file with the fp32 one on the checked training images
    export_run(runs["shared"], tmp_path / "m32.onnx")
    paths = reopen_context(runs["shared"], with_images=False).table.train["path"].tolist()
    checked = [paths[i] for i in sample_rows(len(paths), check["images"], seed=0)]
    int8, fp32 = serve.ServedModel(tmp_path / "m8.onnx"), serve.ServedModel(tmp_path / "m32.onnx")
    q, f = int8.probs(int8.decode(checked)[0])["final"], fp32.probs(fp32.decode(checked)[0])["final"]
    assert check["int8_agreement"] == pytest.approx(float((q.argmax(1) == f.argmax(1)).mean()))
    assert check["int8_max_abs_diff"] == pytest.approx(float(np.abs(q - f).max()), abs=1e-6)
    served = serve.ServedModel(tmp_path / "m8.onnx")
    assert served.meta["check"]["int8"] is True
    ops = {n.op_type for n in __import__("onnx").load(str(tmp_path / "m8.onnx")).graph.node}
    assert "DequantizeLinear" in ops
    result = serve.predict_images(served, demo_root / "eval" / "images", tmp_path / "p.csv")
    assert result["predicted"] == len(pd.read_csv(tmp_path / "p.csv")) > 0


def test_int8_export_of_a_run_whose_check_takes_every_image_calibrates_on_them(runs, tmp_path):
    # calibration images are those the check leaves; with none left it takes the checked ones
    check = export_run(runs["shared"], tmp_path / "m8.onnx", int8=True, check_images=10**6)
    assert check["calibration_images"] == min(check["images"], 128) > 0


@pytest.mark.parametrize("reader", ["exported file", "a student's teacher"])
def test_undecodable_images_are_all_listed_whichever_chunk_holds_them(runs, demo_root, tmp_path, reader):
    from multitask.distill import teacher_probs
    from multitask.run import RunDir

    paths = sorted(str(p) for p in (demo_root / "eval" / "images").iterdir())[:10]
    for i in (1, 8):  # in the first chunk of four and in the third
        broken = tmp_path / f"broken{i}.jpg"
        broken.write_text("not a picture")
        paths[i] = str(broken)
    if reader == "exported file":
        export_run(runs["shared"], tmp_path / "m.onnx")
        predict = lambda: serve.ServedModel(tmp_path / "m.onnx").predict_paths(paths, chunk=4)  # noqa: E731
    else:
        run = RunDir(runs["shared"])
        predict = lambda: teacher_probs(run, 0, load_config(str(run.config)), None, paths, chunk=4)  # noqa: E731
    with pytest.raises(ImageDecodeError, match="2 image") as e:
        predict()
    assert "broken1.jpg" in str(e.value) and "broken8.jpg" in str(e.value)


def test_the_onnx_path_runs_without_torch(runs, demo_root, tmp_path):
    export_run(runs["shared"], tmp_path / "m.onnx")
    code = f"""
import sys
for name in ("torch", "timm", "pandas", "torchvision", "albumentations"):
    sys.modules[name] = None  # any import of them fails
from multitask import serve
r = serve.predict_images({str(tmp_path / 'm.onnx')!r}, {str(demo_root / 'eval' / 'images')!r}, {str(tmp_path / 'p.csv')!r})
assert not any(m == "torch" or m.startswith(("torch.", "timm")) for m, v in sys.modules.items() if v is not None)
print(r["predicted"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == len(pd.read_csv(tmp_path / "p.csv")) > 0


def test_cli_export_predict_and_submit_with_onnx(runs, demo_root, tmp_path):
    run = runs["shared"]
    r = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert "largest difference from PyTorch" in r.output
    r = CliRunner().invoke(app, ["predict", "--onnx", str(tmp_path / "m.onnx"), "--images",
                                 str(demo_root / "eval" / "images"), "--out", str(tmp_path / "p.csv")],
                           env={"COLUMNS": "1000"})
    assert r.exit_code == 0, r.output
    assert f"m.onnx (exported from run {run.resolve()}, round 0)" in r.output  # the run, not the file again
    r = CliRunner().invoke(app, ["submit", "--run", str(run), "--onnx", str(tmp_path / "m.onnx"),
                                 "--out", str(tmp_path / "sub_onnx.csv")])
    assert r.exit_code == 0, r.output
    assert "(what made it: sub_onnx.csv.json)" in " ".join(r.output.split())
    made = read_json(tmp_path / "sub_onnx.csv.json")["predicted_by"]
    assert made["onnx"] == str((tmp_path / "m.onnx").resolve()) and made["this_run"] and made["round"] == 0
    assert made["onnx_sha256"] == hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    make_submission(run, tmp_path / "sub.csv")
    a, b = read_pair(tmp_path / "sub.csv", tmp_path / "sub_onnx.csv")
    assert a.equals(b)
    r = CliRunner().invoke(app, ["predict", "--images", str(demo_root / "eval" / "images"), "--out", str(tmp_path / "x.csv")])
    assert r.exit_code == 2 and "--run or --onnx" in r.output
    r = CliRunner().invoke(app, ["predict", "--onnx", str(tmp_path / "nope.onnx"), "--images",
                                 str(demo_root / "eval" / "images"), "--out", str(tmp_path / "x.csv")])
    assert r.exit_code == 2 and "nope.onnx: ONNX file not found" in r.output
    for option in ("--chunk", "--batch-size"):  # 0 would loop forever or write nothing
        r = CliRunner().invoke(app, ["predict", "--onnx", str(tmp_path / "m.onnx"), "--images",
                                     str(demo_root / "eval" / "images"), "--out", str(tmp_path / "x.csv"), option, "0"],
                               env={"COLUMNS": "1000"})
        assert r.exit_code == 2 and f"Invalid value for {option!r}" in r.output, r.output
    assert not (tmp_path / "x.csv").exists()


def test_a_run_trained_again_refuses_its_old_export_and_force_removes_it(runs, demo_root, tmp_path):
    import shutil

    from multitask.context import clear_run
    from multitask.run import write_json
    from multitask.submit import SubmissionError

    run = tmp_path / "run"
    shutil.copytree(runs["shared"], run)
    told = lambda: [s for s in said if "each of which scores 0" not in s]  # noqa: E731 - classes never predicted: test_rundir
    decision_path = RunDir(run).round_dir(0) / "decision.json"
    decision = read_json(decision_path)
    decision["decision"]["blend"] = {"age": 0.5}  # the regression read into bins: traced with its edges
    write_json(decision_path, decision)
    export_unwarned(run)  # RUN/model.onnx
    said = []
    make_submission_onnx(run, RunDir(run).onnx, tmp_path / "before.csv", log=said.append)
    assert len(told()) == 1 and "subjects" not in told()[0]  # a subjects weight of 0: nothing is left out
    # with a weight, `mt submit` reads subjects and the exported file cannot: the submission says so
    write_json(decision_path, decision | {"decision": decision["decision"] | {"subjects": 0.7}})
    said = []
    make_submission_onnx(run, RunDir(run).onnx, tmp_path / "before.csv", log=said.append)
    assert told()[1] == (f"subjects are not read: the exported file takes each picture on its own, while `mt submit "
                       f"--run {run}` reads what a person keeps from their clearest picture (weight 0.70)")
    # `mt predict` on the test images (the torch path) takes each picture on its own too, and says so
    assert "subjects are not read" in predict_images(run, demo_root / "eval" / "images", tmp_path / "p.csv")["note"]
    # by default beside the run's own submission, which it would replace with answers made without subjects
    make_submission(run)
    own = RunDir(run).submission.read_bytes()
    assert make_submission_onnx(run, RunDir(run).onnx) == RunDir(run).submission_onnx
    assert RunDir(run).submission.read_bytes() == own and RunDir(run).submission_onnx.exists()
    # a later round the run would submit now: the file's round is said to be older
    shutil.copytree(RunDir(run).round_dir(0), RunDir(run).round_dir(1))
    later = read_json(RunDir(run).round_dir(1) / "summary.json")
    write_json(RunDir(run).round_dir(1) / "summary.json", later | {"round": 1, "oof": later["oof"] | {"f1": 0.99}})
    said = []
    make_submission_onnx(run, RunDir(run).onnx, tmp_path / "before.csv", log=said.append)
    assert told()[-1] == (f"the exported file holds round 0; `mt submit --run {run}` would submit round 1, the best by "
                        f"OOF since (`mt export --run {run}` exports that one)")
    shutil.rmtree(RunDir(run).round_dir(1))
    # the run moved: its folds' training ids say the file is still its own
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    said = []
    make_submission_onnx(moved, RunDir(run).onnx, tmp_path / "moved.csv", log=said.append)
    assert not any("its folds are not those" in line for line in said)
    summary_path = RunDir(run).round_dir(0) / "summary.json"
    summary = read_json(summary_path)
    summary["train_ids"] = {k: "trained-again" for k in summary["train_ids"]}  # what `mt train --force` leaves
    for root in (run, moved):
        write_json(RunDir(root).round_dir(0) / "summary.json", summary)
    with pytest.raises(SubmissionError, match="export it again"):
        make_submission_onnx(run, RunDir(run).onnx, tmp_path / "after.csv")
    # moved and trained again, the file cannot be told from another run's (which a submission may take): said
    said = []
    make_submission_onnx(moved, RunDir(run).onnx, tmp_path / "moved.csv", log=said.append)
    assert told()[1] == (f"its folds are not those of round 0 of {moved} as it is now: if that is this run, moved and "
                       f"trained again since, export it again (`mt export --run {moved}`)")
    made = read_json(tmp_path / "moved.csv.json")["predicted_by"]
    assert not made["this_run"] and made["exported_from"] == str(run.resolve()) and made["train_ids"] != summary["train_ids"]
    RunDir(run).report.write_text("<html></html>")
    assert (run / "submission_onnx.csv.json").exists()
    clear_run(RunDir(run))  # `--force`: nothing of the old run is left to be taken for the new one's
    assert not (run / "submission_onnx.csv.json").exists() and not (run / "submission.csv.json").exists()
    assert not RunDir(run).onnx.exists() and not RunDir(run).report.exists() and not RunDir(run).config.exists()


def test_a_file_without_mt_metadata_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(serve.ServeError, match="plain.onnx: no 'mt' metadata"):
        serve.ServedModel(tmp_path / "plain.onnx")
    for meta, why in (("{", "JSONDecodeError"), ("{}", "KeyError: 'task'")):  # a traceback, or a JSON error unnamed
        model = helper.make_model(graph)
        onnx.helper.set_model_props(model, {"mt": meta})
        onnx.save(model, str(tmp_path / "damaged.onnx"))
        with pytest.raises(serve.ServeError, match=f"damaged.onnx: its 'mt' metadata is damaged \\({why}"):
            serve.ServedModel(tmp_path / "damaged.onnx")


def test_the_service_command_says_a_users_error_in_one_line(tmp_path, capsys, monkeypatch):
    # `python -m multitask.serve` printed a traceback for a model that is not there
    monkeypatch.delenv("MT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        serve.main([str(tmp_path / "none.onnx"), str(tmp_path), str(tmp_path / "out.csv")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.onnx'}: ONNX file not found"
    assert not (tmp_path / "out.csv").exists()
    # a folder for the file, and a batch size of 0: one line each too
    with pytest.raises(SystemExit) as stop:
        serve.main([str(tmp_path), str(tmp_path), str(tmp_path / "out.csv")])
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: a folder; name the .onnx file `mt export` wrote"
    with pytest.raises(SystemExit) as stop:
        serve.main([str(tmp_path / "none.onnx"), str(tmp_path), str(tmp_path / "out.csv"), "--batch-size", "0"])
    assert stop.value.code == 2 and "--batch-size: 0: give 1 or more" in capsys.readouterr().err


def test_a_submission_from_a_folder_for_its_onnx_file_is_one_line(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: a folder; name the .onnx file"):
        make_submission_onnx(runs["shared"], tmp_path, tmp_path / "sub.csv")


def test_an_export_whose_round_changes_meanwhile_says_so(runs, tmp_path, monkeypatch):
    # a fold finished in another shell between the graph and its PyTorch reference: the check would
    # blame the graph ("differs from PyTorch") for two different fold sets
    import shutil

    from multitask.run import write_json

    run = tmp_path / "run"
    shutil.copytree(runs["shared"], run)
    summary_path = RunDir(run).round_dir(0) / "summary.json"
    summary, real = read_json(summary_path), export_mod.build_graph

    def graph_then_a_fold_finishes(*args):
        built = real(*args)
        write_json(summary_path, summary | {"folds_done": summary["folds_done"][:1]})
        return built

    monkeypatch.setattr(export_mod, "build_graph", graph_then_a_fold_finishes)
    with pytest.raises(ExportError, match=r"round0: its folds changed while it was exported \(\[0, 1\] then \[0\]"):
        export_run(run, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_an_export_refuses_a_training_picture_damaged_since(runs, demo_root, tmp_path):
    # its pixels would be whatever memory held, checked against PyTorch on the same garbage and
    # calibrated on by int8, unsaid
    import shutil

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(demo_root, data)
    shutil.copytree(runs["shared"], run)
    written = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(written | {"data_root": str(data)}))
    for picture in (data / "train" / "images").rglob("*.jpg"):
        picture.write_bytes(b"not a picture")  # every one: whichever the check samples
    with pytest.raises(ImageDecodeError, match="cannot be decoded"):
        export_run(run, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_an_ensemble_run_exports_as_one_file(demo_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_run(tiny_config(demo_root, "aug.tta=[none]"), a)
    train_run(tiny_config(demo_root, "heads=mask,gender_age", "model.backbone=resnet10t", "aug.tta=[none]"), b)
    make_ensemble([a, b], tmp_path / "ens")
    check = export_run(tmp_path / "ens", tmp_path / "e.onnx")
    assert check["max_abs_diff"] <= 1e-4
    meta = serve.ServedModel(tmp_path / "e.onnx").meta
    assert meta["folds"] == 4
    # no fold models of its own: its members' trainings say what the file was made from, so a file
    # from an ensemble whose members were trained since (and the ensemble made again) is refused
    assert meta["train_ids"]["member_train_ids"] == [RunDir(m).round_train_ids(0) for m in (a, b)]
    make_submission_onnx(tmp_path / "ens", tmp_path / "e.onnx", tmp_path / "s.csv")
    from multitask.export import with_metadata
    from multitask.submit import SubmissionError

    meta["train_ids"]["member_train_ids"][0]["0"] = "an earlier training"
    (tmp_path / "old.onnx").write_bytes(with_metadata(tmp_path / "e.onnx", json.dumps(meta)))
    with pytest.raises(SubmissionError, match="before it was trained again"):
        make_submission_onnx(tmp_path / "ens", tmp_path / "old.onnx", tmp_path / "s.csv")


def test_a_table_task_with_a_numeric_factor_exports(tmp_path):
    root = tmp_path / "table"
    make_table_dataset(root, n_train_groups=10, n_test_groups=2, per_group=3, image_size=(32, 32), seed=0)
    task = {"table": str(root / "train.csv"), "group_col": "group", "test": "test.csv",
            "factors": [{"name": "colour", "classes": ["red", "green", "blue", "yellow"]},
                        {"name": "size", "bins": [20, 30]}]}
    cfg = tiny_config(None, f"task={yaml.safe_dump(task, default_flow_style=True)}", "aug.tta=[none, hflip]")
    train_run(cfg, tmp_path / "run")
    check = export_unwarned(tmp_path / "run", tmp_path / "t.onnx")
    assert check["max_abs_diff"] <= 1e-4
    served = serve.ServedModel(tmp_path / "t.onnx")
    assert served.task.factor_names == ["colour", "size"] and served.task.factors[1].bins == (20, 30)
    predict_images(tmp_path / "run", root / "images", tmp_path / "torch.csv")
    serve.predict_images(served, root / "images", tmp_path / "onnx.csv")
    a, b = read_pair(tmp_path / "torch.csv", tmp_path / "onnx.csv")
    assert (a["class"] == b["class"]).all() and len(a) > 0


# ---- mt distill ----

def test_teacher_targets_are_marginals_with_the_true_label_mixed_in(demo_root):
    cfg = tiny_config(demo_root, "heads=mask,gender_age")
    cfg = cfg.model_copy(update={"distill": __import__("multitask.config", fromlist=["DistillCfg"]).DistillCfg(
        teacher="t", round=0, true_weight=0.25), "numeric": {}})
    task, heads = build_task(cfg)
    teacher = torch.softmax(torch.randn(2, task.n_classes), 1)
    # a labelled row and an unlabelled one: factor classes, the age behind the age class, the teacher
    factors = torch.tensor([[2, 1, 0, 25], [-1, -1, -1, float("nan")]], dtype=torch.float32)
    out = Targets(task, heads, cfg)(torch.cat([factors, teacher], 1))
    full = teacher.reshape(2, 3, 2, 3)
    mask_t, ga_t = full.sum((2, 3)), full.sum(1).reshape(2, 6)
    assert torch.allclose(out["mask"][0], 0.25 * torch.eye(3)[2] + 0.75 * mask_t[0])
    assert torch.allclose(out["gender_age"][0], 0.25 * torch.eye(6)[3] + 0.75 * ga_t[0])
    assert torch.allclose(out["mask"][1], mask_t[1]) and torch.allclose(out["gender_age"][1], ga_t[1])


def test_a_student_stopped_while_it_is_set_up_is_not_taken_for_a_run(runs, tmp_path, monkeypatch):
    import multitask.distill as distill_mod

    student = tmp_path / "student"
    with stopped_in(monkeypatch, distill_mod, "save_npz"):  # while it writes the teacher's targets
        distill(runs["shared"], student, epochs=1)
    assert not RunDir(student).config.exists()
    assert distill(runs["shared"], student, epochs=1)["complete"]  # a plain retry, no --force


def test_a_students_augmentation_is_checked_before_the_teacher_predicts(runs, tmp_path, monkeypatch):
    # as `mt train` checks it: a crop to the teacher's size would not fit the student's smaller cache
    import multitask.distill as distill_mod

    monkeypatch.setattr(distill_mod, "teacher_probs", lambda *a, **k: pytest.fail("the teacher predicted first"))
    student = tmp_path / "student"
    with pytest.raises(ConfigError, match="aug.train"):
        distill(runs["shared"], student, epochs=1, img_size=(24, 24),
                overrides=["aug.backend=albumentations", "aug.train=[{name: RandomResizedCrop, size: [32, 32]}]"])
    assert not student.exists()


def test_an_ensemble_of_students_has_no_fold_honest_weights(runs, tmp_path):
    # students validate on one fold: weights refitted without it would be fitted on no row at all,
    # and their even vote would pass for a fold-honest figure in `mt runs`
    a, b = tmp_path / "a", tmp_path / "b"
    distill(runs["shared"], a, epochs=1)
    distill(runs["shared"], b, epochs=1, overrides=["train.seed=1"])
    summary = make_ensemble([a, b], tmp_path / "ens")
    assert summary["oof_weights_honest"] is None and load_config(RunDir(tmp_path / "ens").config).ensemble.fold_weights is None
    assert (summary.get("decision") or {}).get("honest") is None


def test_a_student_pins_the_checkpoint_it_starts_from(runs, tmp_path):
    """As `mt train` does: the student's config.yaml holds its checkpoint's digest, so that a later
    `mt resume` of the student knows the file was overwritten."""
    import hashlib

    import timm

    ckpt = tmp_path / "start.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(), ckpt)
    student = tmp_path / "student"
    distill(runs["shared"], student, epochs=1, overrides=[f"model.checkpoint={ckpt}"])
    assert load_config(RunDir(student).config).model.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_a_student_is_a_run_that_submit_predict_and_export_accept(runs, demo_root, tmp_path):
    teacher = runs["shared"]
    student = tmp_path / "student"
    summary = distill(teacher, student, backbone="resnet10t", img_size=(32, 32), epochs=1)
    assert summary["complete"] and summary["folds_done"] == [0]
    cfg = load_config(RunDir(student).config)
    assert cfg.distill.teacher == str(teacher.resolve()) and cfg.train.folds == 1 and cfg.model.backbone == "resnet10t"
    assert all(c.aux == "none" for c in cfg.numeric.values())
    assert len(load_config(RunDir(teacher).config).aug.tta) > 1 and cfg.aug.tta == ["none"]
    # the student validates on the teacher's fold 0 and trains on the rest
    t_folds = pd.read_csv(RunDir(teacher).folds, dtype={"group": str})
    s_folds = pd.read_csv(RunDir(student).folds, dtype={"group": str})
    assert (s_folds.set_index("group")["fold"] == (t_folds.set_index("group")["fold"] != 0).astype(int)).all()
    t = load_npz(RunDir(student).teacher)
    assert np.allclose(t["train"].sum(1), 1, atol=1e-5) and len(t["test"]) == len(t["test_ids"]) > 0
    # the teacher's offsets travel with it
    offsets = read_json(RunDir(teacher).round_dir(0) / "decision.json")["decision"]["offsets"]
    assert read_json(RunDir(student).round_dir(0) / "decision.json")["decision"]["offsets"] == offsets
    make_submission(student, tmp_path / "sub.csv")
    assert len(pd.read_csv(tmp_path / "sub.csv")) == len(t["test"])
    predict_images(student, demo_root / "eval" / "images", tmp_path / "p.csv")
    assert export_run(student, tmp_path / "s.onnx")["max_abs_diff"] <= 1e-4
    make_submission_onnx(student, tmp_path / "s.onnx", tmp_path / "sub_onnx.csv")
    assert pd.read_csv(tmp_path / "sub.csv").equals(pd.read_csv(tmp_path / "sub_onnx.csv"))
    with pytest.raises(ConfigError, match="distilled student"):
        pseudo_label(student)
    # nor may it teach its teacher: it learned every training image, fold k's groups among them
    with pytest.raises(ConfigError, match="distilled student"):
        pseudo_label(teacher, labels_from=student)
    assert RunDir(teacher).rounds() == [0]
    with pytest.raises(ConfigError, match="already holds a run"):
        distill(teacher, student, epochs=1)
    # its validation figure is not passed off as OOF beside the teacher's
    from multitask.report import STUDENT, write_report
    from multitask.runs import runs_table

    notes = runs_table([teacher, student]).set_index("run")["note"]
    assert notes[str(student)].startswith("a student (mt distill): its oof figures are its validation fold's")
    assert pd.isna(notes[str(teacher)])
    assert STUDENT in write_report(student).read_text() and STUDENT not in write_report(teacher).read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the teacher's own device must be missing here")
def test_a_teacher_trained_on_a_gpu_teaches_on_the_students_device(runs, tmp_path):
    import shutil

    teacher = tmp_path / "gpu_run"
    shutil.copytree(runs["shared"], teacher)
    config = RunDir(teacher).config
    config.write_text(config.read_text().replace("device: cpu", "device: cuda"))  # per invocation: folds stay valid
    summary = distill(teacher, tmp_path / "student", epochs=1, overrides=["train.device=cpu"])
    assert summary["complete"]
    # the same targets as the teacher gives on the CPU it was really trained on
    cpu_student = distill(runs["shared"], tmp_path / "cpu_student", epochs=1)
    assert cpu_student["complete"]
    a, b = load_npz(RunDir(tmp_path / "student").teacher), load_npz(RunDir(tmp_path / "cpu_student").teacher)
    np.testing.assert_allclose(a["train"], b["train"], atol=1e-6)


def test_a_command_without_round_does_not_offer_one(demo_root, tmp_path):
    out = tmp_path / "half"
    train_run(tiny_config(demo_root, "train.fold=[0]"), out)  # fold 1 never trained: no complete round
    r = CliRunner().invoke(app, ["submit", "--run", str(out)])
    assert r.exit_code == 2 and "or pass --round 0" in r.output, r.output
    r = CliRunner().invoke(app, ["distill", "--run", str(out), "--out", str(tmp_path / "st")])
    assert r.exit_code == 2 and "lacks fold 1" in r.output and "--round" not in r.output, r.output
    # a round exported by number, unfinished as it is, is submitted with onnxruntime (no best round to compare)
    r = CliRunner().invoke(app, ["export", "--run", str(out), "--round", "0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["submit", "--run", str(out), "--onnx", str(RunDir(out).onnx)])
    assert r.exit_code == 0 and RunDir(out).submission_onnx.exists(), r.output


def test_a_student_predicts_with_one_view_unless_told_otherwise(runs):
    teacher = RunDir(runs["shared"])
    t_cfg = load_config(teacher.config)
    args = (t_cfg, teacher.root, 0, None, None, None, None, 0.5, True, 0)
    assert student_config(*args, []).aug.tta == ["none"]
    assert student_config(*args, ["aug.tta=[none, hflip]"]).aug.tta == ["none", "hflip"]


def test_a_student_of_an_ensemble_gets_a_head_per_factor(demo_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_run(tiny_config(demo_root, "aug.tta=[none]"), a)
    train_run(tiny_config(demo_root, "heads=mask,gender_age", "aug.tta=[none]"), b)
    make_ensemble([a, b], tmp_path / "ens")
    r = CliRunner().invoke(app, ["distill", "--run", str(tmp_path / "ens"), "--out", str(tmp_path / "st"),
                                 "--epochs", "1", "--no-unlabeled", "--val-fold", "1"])
    assert r.exit_code == 0, r.output
    assert "not an OOF figure" in r.output
    cfg = load_config(RunDir(tmp_path / "st").config)
    assert cfg.heads is None and cfg.ensemble is None and cfg.distill.val_fold == 1 and not cfg.distill.unlabeled
    assert len(load_npz(RunDir(tmp_path / "st").teacher)["test"]) == 0
    r = CliRunner().invoke(app, ["distill", "--run", str(tmp_path / "ens"), "--out", str(tmp_path / "st2"),
                                 "--val-fold", "7"])
    assert r.exit_code == 2 and "--val-fold 7" in r.output and not (tmp_path / "st2").exists()
    # --epochs 0 once meant "the teacher's epochs"
    r = CliRunner().invoke(app, ["distill", "--run", str(tmp_path / "ens"), "--out", str(tmp_path / "st2"),
                                 "--epochs", "0"])
    assert r.exit_code == 2 and "--epochs" in r.output and not (tmp_path / "st2").exists()


def test_a_student_finishes_from_its_directory_alone(runs, tmp_path):
    """The teacher's probabilities live in the student's teacher.npz: with the teacher gone, `mt
    resume` still finishes a student whose fold lost its outputs."""
    import shutil

    from multitask.kfold import resume_run

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(runs["shared"], teacher)
    distill(teacher, student, epochs=1)
    shutil.rmtree(teacher)
    fold = RunDir(student).fold_dir(0, 0)
    oof = load_npz(fold / "oof.npz")
    (fold / "oof.npz").unlink()
    (fold / "test.npz").unlink()
    resume_run(student)
    assert np.array_equal(load_npz(fold / "oof.npz")["p_mask"], oof["p_mask"])
    assert read_json(RunDir(student).round_dir(0) / "summary.json")["complete"]
