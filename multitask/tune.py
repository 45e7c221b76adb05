"""`mt tune`: an Optuna study over the settings that move macro F1, stored in SQLite so that a killed
study resumes where it stopped. Each trial is a run directory of its own (STUDY/trial_NNN); the best
trial's settings are written as STUDY/best.yaml, which `mt train --config` takes.

Pruning starts at the end of the first fold: every epoch's validation macro F1 is reported (step =
fold × epochs + epoch, folds trained one after another), and from fold 0's last epoch on, the median
pruner stops a trial whose best so far falls behind the median of earlier trials at the same step,
so a poor setting costs one fold, not five. Not sooner: the first epochs' F1 says little about the
last (on real faces, pruning from the first epoch stopped five trials in a row after one or two
epochs, at validation F1 0.05-0.08, where every finished trial had started just as low).
"""
from __future__ import annotations

import hashlib
import time
from functools import reduce
from pathlib import Path

from multitask.config import Config, ConfigError, dump_config, load_config
from multitask.context import differing_keys, moved_only, read_data, task_of
from multitask.data.table import value_column
from multitask.numeric import fine_step, settings_of
from multitask.lock import describe_holder, file_lock, lock_holder
from multitask.run import atomic_write_text

STUDY_NAME = "mt"


def suggest(trial, cfg: Config) -> list[str]:
    """The trial's settings as --set overrides: learning rate, weight decay, each head's loss, the
    augmentation strength, the image size, and the accuracy switches (sampler, the auxiliary head of
    numeric factors, soft edges, MixUp)."""
    task = task_of(cfg)
    heads = task.heads(cfg.heads)
    out = [f"train.lr={trial.suggest_float('lr', 3e-4, 1e-2, log=True)}",
           f"train.weight_decay={trial.suggest_float('weight_decay', 1e-5, 0.1, log=True)}",
           f"train.sampler={trial.suggest_categorical('sampler', ['none', 'class'])}"]
    for h in heads:
        loss = trial.suggest_categorical(f"loss_{h.name}", ["ce", "label_smoothing", "focal"])
        out.append(f"losses.{h.name}.name={loss}")
        out.append(f"losses.{h.name}.weight={trial.suggest_float(f'weight_{h.name}', 0.5, 2.0)}")
    strength = trial.suggest_float("aug_strength", 0.5, 1.5)
    h, w = cfg.data.img_size
    scale = trial.suggest_categorical("img_scale", [1.0, 1.25])
    size = [h, w] if scale == 1.0 else [_multiple_of_8(h * scale), _multiple_of_8(w * scale)]  # as backbones like
    if size != [h, w]:
        out.append(f"data.img_size=[{size[0]}, {size[1]}]")
    # the augmentation the backend reads, the config's own scaled: the other one would change nothing
    if cfg.aug.backend == "torch":
        out.append("aug.torch=" + _flow(scaled_torch_augmentation(cfg.aug.torch.model_dump(mode="json"), strength)))
    else:
        out.append("aug.train=" + _flow(resized_augmentation(scaled_augmentation(cfg.aug.train, strength), [h, w], size)))
    # each tuned section starts from what the base config holds: its other settings (train_bins,
    # aux_weight, mix's stop epoch, ...) stay as configured
    for f in task.factors:
        if f.numeric:
            aux = trial.suggest_categorical(f"aux_{f.name}", ["none", "regression", "ordinal"])
            # in the number's own units: up to a sixth of the span its edges set (5 years for ages 30/60)
            soft = trial.suggest_float(f"soft_edge_{f.name}", 0.0, fine_step(f))
            tuned = settings_of(cfg, f.name).model_dump(mode="json") | {"aux": aux, "soft_edge": round(soft, 2)}
            out.append(f"numeric.{f.name}=" + _flow(tuned))
    mix = trial.suggest_float("mix_prob", 0.0, 0.5)
    out.append("aug.mix=" + _flow(cfg.aug.mix.model_dump(mode="json") | {
        "mixup_alpha": 0.2 if mix > 0 else 0.0, "cutmix_alpha": 1.0 if mix > 0 else 0.0, "prob": round(mix, 3)}))
    return out


def progress_line(trial, cfg: Config) -> str:
    import optuna

    if trial.state == optuna.trial.TrialState.PRUNED and trial.last_step is not None:
        turn, epoch = divmod(trial.last_step - 1, cfg.train.epochs)
        return (f"pruned after fold {cfg.train.selected_folds()[turn]} epoch {epoch + 1}, its validation macro F1 then "
                f"{trial.intermediate_values[trial.last_step]:.4f}")
    return trial.state.name.lower() + (f", OOF macro F1 {trial.value:.4f}" if trial.value is not None else "")


# The magnitude arguments of the albumentations transforms whose strength is tuned, each with the
# value that means "no change" (a scale factor is 1; a shift, angle or limit is 0). Other transforms
# and arguments (probabilities, flips, sizes) stay as configured; an argument left out of the
# config keeps albumentations' default, unscaled.
ALBUMENTATIONS_MAGNITUDES = {
    "Affine": {"scale": 1.0, "translate_percent": 0.0, "rotate": 0.0, "shear": 0.0},
    "ShiftScaleRotate": {"shift_limit": 0.0, "scale_limit": 0.0, "rotate_limit": 0.0},
    "Rotate": {"limit": 0.0},
    "RandomBrightnessContrast": {"brightness_limit": 0.0, "contrast_limit": 0.0},
    "HueSaturationValue": {"hue_shift_limit": 0.0, "sat_shift_limit": 0.0, "val_shift_limit": 0.0},
}


def _scaled(value, neutral: float, strength: float):
    """A number, a [low, high] range or a per-axis dict, moved away from `neutral` by `strength`."""
    if isinstance(value, dict):
        return {k: _scaled(v, neutral, strength) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scaled(v, neutral, strength) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return round(neutral + (value - neutral) * strength, 4)
    return value


def scaled_augmentation(train: list[dict], strength: float) -> list[dict]:
    """The albumentations list `train` (aug.train) with each transform's magnitudes scaled by
    `strength` (1: as they are), see ALBUMENTATIONS_MAGNITUDES."""
    out = []
    for t in train:
        magnitudes = ALBUMENTATIONS_MAGNITUDES.get(t.get("name"), {})
        out.append({k: _scaled(v, magnitudes[k], strength) if k in magnitudes else v for k, v in t.items()})
    return out


def resized_augmentation(train: list[dict], size: list[int], new: list[int]) -> list[dict]:
    """`train` for pictures of `new` size where it names the configured `size` (a crop back to the
    picture's size: size: [H, W], or height and width): at the old size every trial of the larger
    picture would fail the check that a transform keeps the picture's size."""
    out = []
    for t in train:
        t = dict(t)
        if list(t.get("size") or []) == size:
            t["size"] = list(new)
        if [t.get("height"), t.get("width")] == size:
            t["height"], t["width"] = new
        out.append(t)
    return out


def scaled_torch_augmentation(aug: dict, strength: float) -> dict:
    """The torch backend's settings (aug.torch) with their magnitudes scaled by `strength`, within
    the bounds the config accepts; the flip's probability is not a strength and stays."""
    lo, hi = aug["scale"]
    out = dict(aug)
    out["scale"] = [round(max(1 - (1 - lo) * strength, 0.05), 4), round(min(1 + (hi - 1) * strength, 10.0), 4)]
    for key, bound in (("translate", 0.5), ("rotate", 180.0), ("brightness", 1.0), ("contrast", 1.0)):
        out[key] = round(min(aug[key] * strength, bound), 4)
    return out


def _multiple_of_8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


def _flow(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, default_flow_style=True, width=10**6).strip()


BASE_KEY = "base"  # the study's user attribute holding the settings its trials start from
DATA_KEY = "data"  # and the one holding what its data is (data_digest)


def data_digest(cfg: Config) -> str:
    """What a study's trials train on, wherever it lies: each training image's place below their
    folder (its name, not its pixels), its group, its labels and numbers, in the table's order (which
    the folds follow). A data folder that moved keeps it; one that lists other images, or other
    labels, does not."""
    task = task_of(cfg)
    table = read_data(cfg, task)
    columns = ["group", *task.factor_names, *(value_column(f.name) for f in task.numeric_factors)]
    frame = table.train[columns].assign(image=table.train_ids())
    return hashlib.sha1(frame.to_csv(index=False).encode()).hexdigest()


def check_same_base(study, base: Config, data: str, out: Path) -> dict[str, str]:
    """A study continued under other base settings (config, --set) or on other data would compare
    trials that trained differently, and best.yaml would join the best trial's suggestions to
    settings it never trained with: refused. A place that moved (the data folder, a checkpoint) is
    followed, and returned with its new place; the first call records the base and the data."""
    now = base.model_dump(mode="json")
    then, known = study.user_attrs.get(BASE_KEY), study.user_attrs.get(DATA_KEY)
    if then is None:
        study.set_user_attr(BASE_KEY, now)
        study.set_user_attr(DATA_KEY, data)
        return {}
    changed = differing_keys(then, now)
    # which folds a trial trains is a run's choice per invocation, but a study's trials are compared
    # by their OOF over those folds' rows
    if then.get("train", {}).get("fold") != now["train"]["fold"]:
        changed.append("train.fold")
    moved = [k for k in changed if moved_only(then, now, [k])]
    others = [k for k in changed if k not in moved]
    if others:
        raise ConfigError(f"{out}: the study's trials started from other settings ({', '.join(others)} differ); "
                          f"continue it with the settings it was started with, or start another study (--out)")
    if known is not None and known != data:
        raise ConfigError(f"{out}: the data now holds other images, groups or labels than the study's trials "
                          f"trained on; continue it on the data it was started on, or start another study (--out)")
    data_moved = [k for k in moved if not k.startswith("model.")]  # a checkpoint's digest is a setting already
    if data_moved and known is None:
        raise ConfigError(f"{out}: {', '.join(data_moved)} moved, and the study was started by an earlier mt, which "
                          f"did not record what its data is; continue it from the old place, or start another "
                          f"study (--out)")
    if moved:
        study.set_user_attr(BASE_KEY, now)
    if known is None:
        study.set_user_attr(DATA_KEY, data)
    return {key: reduce(lambda node, part: node[part], key.split("."), now) for key in moved}


def trial_lock(out: Path, number: int) -> Path:
    """Held while a process runs the trial: beside its folder, which `mt train` wants a run's alone."""
    return out / f"trial_{number:03d}.lock"


def tune(config: str | None, out: str | Path, trials: int, data: str | Path | None = None,
         overrides: list[str] = (), time_limit_s: float | None = None, say=print) -> dict:
    """Run trials until the study holds `trials` finished ones (complete or pruned), or until the
    next trial would not fit `time_limit_s`; return the best trial's value, settings and run."""
    try:
        import optuna
    except ImportError as e:
        raise ConfigError(f"mt tune needs optuna ({e}): pip install optuna "
                          f"(or, in mt's checkout, pip install -e '.[tune]')") from None
    from multitask.kfold import train_run

    out = Path(out)
    base = load_config(config, list(overrides), data=data)  # a bad config stops here, before any trial
    if base.train.time_limit_s:
        raise ConfigError("train.time_limit_s in a study: each trial would train as many epochs as its own time "
                          "allows, and the pruner compares trials epoch by epoch; give the study's budget to "
                          "`mt tune --time-limit` instead")
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}", direction="maximize",
                                load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2,
                                                                   n_warmup_steps=base.train.epochs))
    # seeded past the trials the study already holds: the sampler's random start is drawn from its
    # seed alone, so a resumed study seeded as at its start would repeat trial 0's settings; still
    # deterministic, as the count is the study's own
    study.sampler = optuna.samplers.TPESampler(seed=base.train.seed + len(study.trials))
    for key, place in check_same_base(study, base, data_digest(base), out).items():
        say(f"{key} moved: the study goes on with it at {place}")
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        holder = lock_holder(trial_lock(out, t.number))
        if holder is not None:  # another `mt tune` on this study (Optuna's way to spread trials) runs it
            say(f"trial {t.number} is {describe_holder(holder, 'run', trial_lock(out, t.number))}: left to it")
            continue
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # a trial the killed study left running
        say(f"trial {t.number} was interrupted: counted as failed, its folder kept")
    ran = []

    def objective(trial) -> float:
        ran.append(trial.number)
        with file_lock(trial_lock(out, trial.number)) as holder:
            if holder is not None:  # Optuna gives each trial its own number: not seen, but never trained twice
                raise RuntimeError(f"trial {trial.number} is {holder}")
            return train_trial(trial)

    def train_trial(trial) -> float:
        sets = suggest(trial, base)
        trial.set_user_attr("overrides", sets)
        run = out / f"trial_{trial.number:03d}"
        cfg = load_config(config, [*overrides, *sets, "train.jobs=1"], data=data)

        in_turn = cfg.train.selected_folds()

        def report(fold: int, epoch: int, row: dict) -> None:
            # steps count the epochs trained so far (the pruner waits one fold's): with train.fold, fold 2 may be the first
            trial.report(row["val_f1"], step=in_turn.index(fold) * cfg.train.epochs + epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        return train_run(cfg, run, on_epoch=report)["oof"]["f1"]

    finished = lambda: [t for t in study.get_trials(deepcopy=False)  # noqa: E731
                        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    # what the study's trials took, this invocation's and its earlier ones': a continued study knows
    # from its first step whether a trial fits what is left
    t0, failed = time.perf_counter(), 0
    took = [t.duration.total_seconds() for t in finished() if t.duration is not None]
    while len(finished()) < trials and failed < trials:
        # the longest trial so far: a pruned one stops after a fold, and the next may not be pruned
        if time_limit_s is not None and took and time.perf_counter() - t0 + max(took) > time_limit_s:
            say(f"time limit: {time.perf_counter() - t0:.0f} s spent, a trial takes up to {max(took):.0f} s; "
                f"no new trial started ({len(finished())} of {trials} finished)")
            break
        start = time.perf_counter()
        study.optimize(objective, n_trials=1, catch=(ValueError, RuntimeError))
        took.append(time.perf_counter() - start)
        last = study.trials[ran[-1]]  # this process's trial: another on the study may have begun one since
        failed += last.state == optuna.trial.TrialState.FAIL
        say(f"trial {last.number}: " + progress_line(last, base))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ConfigError(f"{out}: no trial completed yet")
    best = study.best_trial
    best_cfg = load_config(config, [*overrides, *best.user_attrs["overrides"]], data=data)
    atomic_write_text(out / "best.yaml", f"# mt tune: trial {best.number}, OOF macro F1 {best.value:.4f}\n"
                      + dump_config(best_cfg))
    return {"best_trial": best.number, "best_value": best.value, "best_run": str(out / f"trial_{best.number:03d}"),
            "best_config": str(out / "best.yaml"), "finished": len(finished()), "complete": len(done)}
