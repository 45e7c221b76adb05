"""`mt`: thin Typer commands over the library; each parses, loads the config, calls one function."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(help="mt: multi-head k-fold training, pseudo-labels and submissions for product labels. "
                       "An error is one line; MT_TRACEBACK=1 shows its traceback.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# paths and settings are printed as they are: a folder named `[v2]` would vanish as markup (and
# `[/tmp]` raise); the few styled lines ask for markup themselves
console = Console(markup=False)


@contextmanager
def progress_and_errors():
    """A rich progress display; known user errors become one red line and exit code 2 (MT_TRACEBACK=1:
    the traceback instead, for an error that looks like a bug: a ValueError may be numpy's too)."""
    from multitask.config import ConfigError
    from multitask.data.cache import ImageDecodeError
    from multitask.data.layout import LayoutError
    from multitask.model import CheckpointError
    from multitask.submit import SubmissionError

    known = (ConfigError, LayoutError, ImageDecodeError, CheckpointError, SubmissionError, FileNotFoundError,
             ValueError)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as progress:
            yield progress
    except known as e:
        if os.environ.get("MT_TRACEBACK"):
            raise
        if "multitask.dist" in sys.modules:  # under torchrun: leave without the other ranks (dist.abandon)
            sys.modules["multitask.dist"].abandon()
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, markup=True)
        raise typer.Exit(2)


def from_config(key: str, whose: str = "the --config file's") -> str:
    """Where an option's value comes from when it is not given. No square brackets: the help is
    rich markup, and `[...]` would vanish."""
    from multitask.config import Config

    node = Config().model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return f"(default: {whose} {key}; built in: {node})"


def join_torchrun(device: str = "auto") -> None:
    """Under torchrun, join the process group; every rank but 0 trains silently."""
    from multitask import dist

    dist.init_from_env(device)
    if not dist.is_main():
        console.quiet = True


def join_run_torchrun(run: Path, overrides: list[str]) -> None:
    """Under torchrun, join as `mt train` did for this run: on the device its config.yaml names, or a
    --set train.device (a CPU run must join with gloo, and never claim a GPU per rank)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    from multitask.context import load_run_config
    from multitask.run import RunDir

    device = [o for o in overrides if o.split("=", 1)[0].strip() == "train.device"]
    join_torchrun(load_run_config(RunDir(run), device).train.device)


def print_scores(title: str, scores: dict, read_off: str | None = None) -> None:
    """One row per macro F1, each saying what it measures: a head's own argmax, a factor read off
    the final class's argmax (equal to the head's own when the factor has a head of its own), or the
    final class itself. `read_off`: the scores have no heads' figures, every factor is read off this
    class (a submission's, or an ensemble's vote, whose only head is the final class)."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("macro F1", justify="right")
    table.add_column("of")
    for k, v in scores.items():
        if not k.startswith("f1"):
            continue
        if k in ("f1", "f1_18"):
            what = "the final class (what is scored)" + ("" if read_off else ", the heads' argmax")
        elif read_off:
            what = f"{k[3:]} read off {read_off}"
        elif k.endswith("_combined"):
            what = f"{k[3:-len('_combined')]} read off the final class"
        else:
            what = f"head {k[3:]}'s own argmax"
        table.add_row(k, f"{v:.4f}", what)
    console.print(table)


def print_decision(summary: dict) -> None:
    """The final class as `mt submit` decides it (subjects, the auxiliary blend, offsets), fitted on
    the OOF: fold-honest (refitted without each fold) beside the optimistic in-sample figure."""
    oof = summary.get("decision")
    if oof and oof["honest"] is None:  # one fold: nothing to refit it on without the fold it scores
        console.print(f"the decision `mt submit` applies: final-class macro F1 {oof['in_sample']['f1']:.4f} fitted "
                      f"and scored on the same rows (one fold: no fold-honest figure; decision.json)")
    elif oof:
        console.print(f"the decision `mt submit` applies: final-class macro F1 {oof['honest']['f1']:.4f} fold-honest "
                      f"({oof['in_sample']['f1']:.4f} fitted and scored on the same rows; decision.json)")


def print_missing(summary: dict) -> None:
    """A round that lacks folds says which and why; submit waits for them unless given --round."""
    for k, why in summary.get("folds_missing", {}).items():
        console.print(f"round {summary['round']} fold {k}: {why}")


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="run directory"),
    data: Optional[Path] = typer.Option(None, "--data", help="competition root (train/, eval/), or a table task's table"),
    heads: Optional[str] = typer.Option(None, help="comma list covering each factor once: mask,gender,age | mask,gender_age | class (default: one head per factor)"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file, or a name under configs/ (demo, competition, utkface)"),
    sharing: Optional[str] = typer.Option(None, help="shared | separate backbones " + from_config("model.sharing")),
    folds: Optional[int] = typer.Option(None, help="number of person-grouped folds " + from_config("train.folds")),
    fold: Optional[list[int]] = typer.Option(None, help="train only this fold (repeatable; default: every fold)"),
    epochs: Optional[int] = typer.Option(None, help="epochs per fold " + from_config("train.epochs")),
    jobs: Optional[int] = typer.Option(None, help="folds trained at once, each in its own process " + from_config("train.jobs")),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="dotted override, e.g. train.lr=3e-4 (repeatable)"),
    force: bool = typer.Option(False, "--force", help="start over in a run directory that already holds a run (every round is removed)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="leave out training items with a problem instead of stopping (listed in RUN/skipped.csv)"),
    time_limit: Optional[str] = typer.Option(None, "--time-limit", help="a budget for the whole command, e.g. 20m or 2h, reading and decoding the images included: the epochs are fitted to what is left of it from two measured epochs (never more than configured)"),
):
    """Train every fold (round 0); write checkpoints, OOF and test probabilities into the run directory."""
    started = time.perf_counter()  # --time-limit is the whole command's: importing torch and timm counts too
    from multitask.config import load_config, train_overrides
    from multitask.kfold import train_run

    with progress_and_errors():
        from multitask.budget import parse_duration

        limit = parse_duration(time_limit) if time_limit is not None else None
    overrides = train_overrides(heads, sharing, folds, fold, epochs, jobs, skip_bad, limit)
    with progress_and_errors() as progress:
        cfg = load_config(config, overrides + list(set_ or []), data=data)
        join_torchrun(cfg.train.device)
        summary = train_run(cfg, out, progress, force, started=started)
    print_scores(f"round 0 out-of-fold (folds {summary['folds_done']})", summary["oof"])
    print_decision(summary)
    print_missing(summary)
    if summary["skipped"]:
        console.print(f"[yellow]{summary['skipped']} training item(s) left out, each with its reason: "
                      f"{escape(str(out / 'skipped.csv'))}[/]", markup=True)
    console.print(f"run: {out}  (config.yaml, folds.csv, round0/, summary.json)")


@app.command("pseudo-label")
def pseudo_label_cmd(
    run: Path = typer.Option(..., "--run", help="run directory made by `mt train`"),
    precision: Optional[float] = typer.Option(None, help="precision each factor's pseudo labels must reach on OOF " + from_config("pseudo.precision", "the run's")),
    bound: Optional[float] = typer.Option(None, help="0, or a level from 0.5 up to 1 at which the precision must hold as a lower bound, counting persons, not pictures " + from_config("pseudo.bound", "the run's")),
    rounds: Optional[int] = typer.Option(None, help="pseudo-label rounds to add " + from_config("pseudo.rounds", "the run's")),
    jobs: Optional[int] = typer.Option(None, help="folds trained at once, each in its own process " + from_config("train.jobs", "the run's")),
    soft: bool = typer.Option(False, "--soft", help="every test image, with its fold's previous probabilities as soft targets (no threshold)"),
    labels_from: Optional[Path] = typer.Option(None, "--labels-from", help="the first new round learns this run's labels: a run under the same split, e.g. an `mt ensemble` of this run and others"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="dotted override (repeatable)"),
):
    """Add rounds trained on train + pseudo-labelled test images: each fold's from its own previous model
    (or --labels-from another run's fold-k models), each factor where it clears a threshold fitted on
    OOF to the target precision (or, --soft, every test image with that model's probabilities)."""
    from multitask.pseudo import pseudo_label

    with progress_and_errors() as progress:
        extra = [f"train.jobs={jobs}"] if jobs is not None else []
        extra += ["pseudo.soft=true"] if soft else []
        join_run_torchrun(run, list(set_ or []))
        reports = pseudo_label(run, precision, rounds, extra + list(set_ or []), progress, labels_from, bound)
    table = Table(title="pseudo-label rounds (images per fold)")
    for col in ("round", "precision", "added", "labelled per factor", "OOF macro F1 (argmax)", "decided, fold-honest"):
        table.add_column(col, justify="right")
    for rep in reports:
        labelled = ", ".join(f"{f} {n}" for f, n in rep["labelled"].items())
        decided = rep.get("decided_f1")
        bounded = f" (bound {rep['bound']:.2f})" if rep.get("bound") else ""
        table.add_row(str(rep["round"]), "soft" if rep.get("soft") else f"{rep['precision']:.2f}{bounded}",
                      f"{rep['added']}/{rep['of']}", labelled,
                      f"{rep['oof_f1']:.4f}" if rep["trained"] else "not trained",
                      f"{decided:.4f}" if rep["trained"] and decided is not None else "")
    console.print(table)
    for rep in reports:
        if not rep["trained"]:
            bounded = f" (as a lower bound at {rep['bound']:.2f}, over persons)" if rep.get("bound") else ""
            console.print(f"round {rep['round']}: no test image reaches precision {rep['precision']:.2f}{bounded} on "
                          f"any factor, so it was not trained; a lower --precision{' or --bound' if bounded else ''} "
                          f"selects more")


@app.command()
def resume(
    run: Path = typer.Option(..., "--run", help="run directory of a killed `mt train` or `mt pseudo-label`"),
    jobs: Optional[int] = typer.Option(None, help="folds trained at once, each in its own process " + from_config("train.jobs", "the run's")),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="dotted override of a per-invocation key, e.g. train.device=cuda:1"),
):
    """Finish the latest round: finished folds are kept, interrupted ones carry on from their last.pt."""
    from multitask.kfold import resume_run

    extra = [f"train.jobs={jobs}"] if jobs is not None else []
    with progress_and_errors() as progress:
        join_run_torchrun(run, list(set_ or []))
        summary = resume_run(run, extra + list(set_ or []), progress)
    print_scores(f"round {summary['round']} out-of-fold (folds {summary['folds_done']})", summary["oof"])
    print_decision(summary)
    print_missing(summary)


@app.command()
def submit(
    run: Path = typer.Option(..., "--run", help="run directory"),
    out: Optional[Path] = typer.Option(None, help="submission file (default: RUN/submission.csv; with --onnx, RUN/submission_onnx.csv)"),
    round_: Optional[int] = typer.Option(None, "--round", help="round to submit (default: the finished round with the best OOF macro F1)"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="predict the run's test images with this file from `mt export` (onnxruntime, CPU)"),
):
    """Write a round's voted test predictions (the best round by OOF macro F1 unless --round): ImageID,ans in info.csv order for the
    competition, the predictions file of `mt predict` for a table task. Beside it, FILE.json says what made it (run, round, its
    folds' trainings, sha256) and how many predictions each class got."""
    from multitask.run import provenance_file
    from multitask.submit import make_submission, make_submission_onnx

    with progress_and_errors() as progress:
        if onnx is not None:
            if round_ is not None:
                raise ValueError("--round and --onnx: the exported file holds one round already; export another to change it")
            path = make_submission_onnx(run, onnx, out, log=console.print)
        else:
            path = make_submission(run, out, progress, round_, log=console.print)
    console.print(f"submission: {path}  (what made it: {provenance_file(path).name})")


@app.command()
def predict(
    run: Optional[Path] = typer.Option(None, "--run", help="run directory (or --onnx)"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="a file from `mt export` instead of a run: onnxruntime on the CPU, without torch"),
    images: Path = typer.Option(..., "--images", help="a folder (recursive), a CSV with a path column, or one image"),
    out: Path = typer.Option(..., "--out", help="predictions CSV to write"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="images per forward pass " + from_config("train.eval_batch_size", "the run's")),
    probs: bool = typer.Option(False, "--probs", help="add every factor's probabilities (p_<factor>_<class>)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="leave out undecodable images and list them beside --out (preds.csv: preds.skipped.csv)"),
    round_: Optional[int] = typer.Option(None, "--round", help="round to use (default: the one submit uses, the best OOF macro F1)"),
    chunk: int = typer.Option(2048, "--chunk", min=1, help="images decoded and predicted at a time: memory stays bounded for any number of images"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N " + from_config("train.device", "the run's")),
):
    """The run's fold ensemble with its TTA views (what submit uses), or an exported file, on any
    images: path, each factor's class, class, prob."""
    if (run is None) == (onnx is None):
        console.print("[bold red]error:[/] give --run or --onnx (one of them)", markup=True)
        raise typer.Exit(2)
    if onnx is not None:
        from multitask import serve

        with progress_and_errors():
            if round_ is not None:
                raise ValueError("--round and --onnx: the exported file holds one round already")
            if device is not None:
                raise ValueError("--device and --onnx: an exported file runs on the CPU, with onnxruntime")
            result = serve.predict_images(onnx, images, out, batch_size or 256, probs, skip_bad, chunk)
        result |= {"why": f"{onnx} (exported from run {result['run']}, round {result['round']})"}
    else:
        from multitask.predict import predict_images

        with progress_and_errors() as progress:
            result = predict_images(run, images, out, batch_size, probs, skip_bad, progress, round_, chunk, device)
    skipped = f", {result['skipped']} skipped (listed in {result['skipped_file']})" if result["skipped"] else ""
    console.print(f"using {result['why']}")
    if result.get("note"):
        console.print(result["note"])
    console.print(f"predictions: {result['out']}  ({result['predicted']} images, round {result['round']}{skipped})")


@app.command()
def distill(
    run: Path = typer.Option(..., "--run", help="the teacher: a finished run (its round that submit uses) or an ensemble run"),
    out: Path = typer.Option(..., "--out", help="the student's run directory"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="the student's timm backbone (default: the teacher's)"),
    img_size: Optional[tuple[int, int]] = typer.Option(None, "--img-size", help="H W (default: the teacher's)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="default: the teacher's"),
    heads: Optional[str] = typer.Option(None, "--heads", help="the student's heads (default: the teacher's)"),
    true_weight: float = typer.Option(0.5, "--true-weight", min=0.0, max=1.0, help="weight of the true label mixed into the teacher's probabilities"),
    unlabeled: bool = typer.Option(True, "--unlabeled/--no-unlabeled", help="the teacher's test images join the training set"),
    val_fold: int = typer.Option(0, "--val-fold", help="teacher fold whose groups the student keeps out to validate on"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="dotted override of the student's settings (repeatable)"),
    force: bool = typer.Option(False, "--force", help="start --out over if it holds a run"),
):
    """One student model trained on the teacher's TTA-voted probabilities (training and test images),
    with the true labels mixed in: a run that submit, predict and export accept."""
    from multitask.distill import distill as distill_run

    with progress_and_errors() as progress:
        summary = distill_run(run, out, backbone, img_size, epochs, heads, true_weight, unlabeled, val_fold,
                              set_ or [], progress, force)
    console.print(f"teacher: {summary['teacher_why']}")
    console.print(f"student validation: the groups of the teacher's fold {val_fold}, kept out of the student's training "
                  f"(not an OOF figure: the teacher models that labelled its images were trained on them)", soft_wrap=True)
    print_scores("student validation", summary["oof"])
    console.print(f"student run: {out}")


@app.command("export")
def export_cmd(
    run: Path = typer.Option(..., "--run", help="run directory (a k-fold run, a student, or an ensemble)"),
    out: Optional[Path] = typer.Option(None, "--out", help="ONNX file (default: RUN/model.onnx, RUN/model.int8.onnx)"),
    int8: bool = typer.Option(False, "--int8", help="static int8 quantisation, calibrated on training images"),
    round_: Optional[int] = typer.Option(None, "--round", help="round to export (default: the one submit uses)"),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="largest difference from PyTorch allowed (fp32)"),
):
    """The run's whole inference (fold models, TTA views, vote, head product, auxiliary blend) as one
    ONNX file on uint8 images, checked against PyTorch with onnxruntime."""
    from multitask.export import export_run

    with progress_and_errors():
        check = export_run(run, out, int8, round_, tolerance, log=console.print)
    console.print(f"checked on {check['images']} training images: largest difference from PyTorch {check['max_abs_diff']:.2g} "
                  f"(tolerance {check['tolerance']:g})")
    if int8:
        console.print(f"int8: argmax agrees with fp32 on {check['int8_agreement']:.1%}; "
                      f"{check['fp32_mb']:.2f} MB fp32 -> {check['int8_mb']:.2f} MB")
    console.print(f"onnx: {check['out']}  ({check['mb']:.2f} MB, round {check['round']})")


@app.command()
def ensemble(
    runs: list[Path] = typer.Option(..., "--runs", help="finished runs that share folds.csv (repeat --runs, or list them after it)"),
    more: Optional[list[Path]] = typer.Argument(None, metavar="RUN...", show_default=False,
                                                help="more runs: `--runs A B C` as well as `--runs A --runs B`"),
    out: Path = typer.Option(..., "--out", help="run directory to write"),
    weights: Optional[str] = typer.Option(None, help="comma list of weights, one per run (default: fitted on OOF)"),
):
    """A weighted soft vote of finished runs, written as a run that submit and predict accept."""
    from multitask.ensemble import make_ensemble

    with progress_and_errors():
        try:
            w = [float(x) for x in weights.split(",")] if weights else None
        except ValueError:
            raise ValueError(f"--weights {weights!r}: a comma list of numbers, one per run") from None
        summary = make_ensemble(list(runs) + list(more or []), out, w)
    for m in summary["members"]:
        console.print(f"  {m['run']}: weight {m['weight']:.2f}, OOF macro F1 {m['oof']['f1']:.4f}")
    print_scores("ensemble out-of-fold", summary["oof"], read_off="the voted final class")
    if summary["oof_weights_honest"]:
        console.print(f"with the weights refitted without each fold: OOF macro F1 {summary['oof_weights_honest']['f1']:.4f}")
    console.print(f"run: {out}")


@app.command()
def eda(
    data: Optional[Path] = typer.Option(None, "--data", help="competition root (train/, eval/), or a table task's table"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file, or a name under configs/ (a table task's config names its table)"),
    out: Path = typer.Option(Path("eda"), "--out", help="folder for eda.json and the plots"),
):
    """Look at the data: counts per factor, class and group, numeric histograms with their bin edges,
    image sizes and types, sample pictures per class, and anomalies with their file names."""
    from multitask.config import load_config
    from multitask.eda import run_eda

    with progress_and_errors():
        result = run_eda(load_config(config, [], data=data), out)
    c = result["counts"]
    console.print(f"[bold]{escape(result['task'])}[/]: {c['images']} training images in {c['groups']} groups, "
                  f"{c['test_images']} test images; pictures per group: "
                  + ", ".join(f"{n} ({groups} groups)" for n, groups in c["pictures_per_group"].items()), markup=True)
    for factor, per in c["per_factor"].items():
        console.print(f"  {factor}: " + ", ".join(f"{k} {v}" for k, v in per.items()))
    per_class = c["per_class"]
    rare = sorted(per_class.items(), key=lambda kv: kv[1])[:3]
    console.print(f"  final classes: {len(per_class)}, from {min(per_class.values())} to {max(per_class.values())} images; "
                  "rarest: " + ", ".join(f"{k} ({v})" for k, v in rare))
    console.print(f"  image types: {result['images']['formats']}; most common sizes: "
                  + ", ".join(list(result["images"]["sizes"])[:3]))
    for kind, found in result["anomalies"].items():
        if found:
            console.print(f"[yellow]  {kind.replace('_', ' ')}: {len(found)}[/]  e.g. {escape(json.dumps(found[0]))}",
                          soft_wrap=True, markup=True)
    console.print(f"plots and eda.json: {out}  ({', '.join(result['plots'])})")


@app.command()
def report(run: Path = typer.Option(..., "--run", help="run directory")):
    """One self-contained HTML page of the run (RUN/report.html): scores per round, curves, confusion
    matrices, per-class figures, the most confident OOF mistakes with their pictures, pseudo-label
    statistics and the resolved config."""
    from multitask.report import write_report

    with progress_and_errors():
        path = write_report(run)
    console.print(f"report: {path}")


@app.command()
def tune(
    out: Path = typer.Option(..., "--out", help="study directory: study.db, a run per trial, best.yaml"),
    trials: int = typer.Option(20, "--trials", min=1, help="finished trials (complete or pruned) the study should hold"),
    config: Optional[str] = typer.Option(None, "--config", help="the base config (YAML file, or a name under configs/)"),
    data: Optional[Path] = typer.Option(None, "--data", help="competition root, or a table task's table"),
    time_limit: Optional[str] = typer.Option(None, "--time-limit", help="e.g. 2h: no trial is started that would not fit"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="dotted override of the base config (repeatable)"),
):
    """An Optuna study (lr, weight decay, per-head losses and weights, augmentation strength, image
    size, sampler, numeric auxiliary heads, soft edges, MixUp), pruned from the end of the first fold,
    resumable; the best trial's settings become best.yaml for `mt train --config`."""
    from multitask.budget import parse_duration
    from multitask.tune import tune as run_tune

    with progress_and_errors():
        limit = parse_duration(time_limit) if time_limit is not None else None
        result = run_tune(config, out, trials, data, list(set_ or []), limit, say=console.print)
    console.print(f"best: trial {result['best_trial']}, OOF macro F1 {result['best_value']:.4f}  "
                  f"({result['complete']} complete of {result['finished']} finished)  run: {result['best_run']}")
    console.print(f"settings: {result['best_config']}  (mt train --config {result['best_config']} --out RUN)")


@app.command()
def runs(
    dirs: Optional[list[Path]] = typer.Argument(None, help="run directories, or folders holding them (default: the current folder)"),
    answers: Optional[Path] = typer.Option(None, "--answers", help="an answer key (ImageID,ans, or a table task's answers): adds each submission's held-out macro F1"),
    csv: bool = typer.Option(False, "--csv", help="print CSV instead of a table"),
):
    """The leaderboard of your runs: what each is and how it scores, best first."""
    import pandas as pd

    from multitask.runs import runs_table

    with progress_and_errors():
        table = runs_table(list(dirs or [Path(".")]), answers)
    if csv:
        print(table.to_csv(index=False), end="")
        return
    title = f"{len(table)} run(s), best first (folds: those done of the round shown)"
    view = Table(title=title)
    for col in table.columns:
        view.add_column(col, justify="right" if table[col].dtype.kind in "if" else "left")

    def cell(column: str, v) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and v != v):
            return ""
        if isinstance(v, float):
            return f"{v:.0f}" if column == "train_s" else f"{v:.4f}"
        return str(v)

    if console.width < 120:  # a column each would cut every cell to "ru…", "0.…": a block per run
        console.print(title)
        for i, rec in enumerate(table.to_dict("records"), 1):
            console.print(f"{i}. {rec['run']}\n   " + "  ".join(
                f"{k}={cell(k, v)}" for k, v in rec.items() if k != "run" and cell(k, v)))
        return
    for rec in table.itertuples(index=False):
        view.add_row(*[cell(k, v) for k, v in zip(table.columns, rec)])
    console.print(view)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="folder for the data set, run and submission"),
    train_persons: int = typer.Option(80, help="synthetic train persons (7 images each)"),
    eval_persons: int = typer.Option(16, help="synthetic test persons"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="dotted override (repeatable)"),
):
    """Generate a synthetic data set, then train → pseudo-label → submit with configs/demo.yaml."""
    import time

    from multitask.demo import run_demo

    t0 = time.perf_counter()
    with progress_and_errors() as progress:
        result = run_demo(out, train_persons, eval_persons, list(set_ or []), progress, log=progress.console.print)
    print_scores("submission vs the generated answer key", result["score"], read_off="the submitted class")
    console.print(f"submission: {result['submission']}  run: {result['run']}  "
                  f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    app()
