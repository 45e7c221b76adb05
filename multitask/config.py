"""The run configuration: a pydantic schema, YAML loading, dotted overrides and the resolved dump.

Every field has a default, so an empty file is a valid config; unknown keys are errors, because a
typo in a competition config silently training the wrong thing costs a day.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    # nan passes every bound (nan <= 0 is false) and would make a class no row can reach, or nan weights
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class LossCfg(_Strict):
    name: Literal["ce", "focal", "label_smoothing", "soft_f1"] = "ce"
    weight: float = Field(1.0, ge=0)
    # per-class weights from the fold's training rows: (mean count / class count) ** class_weight_power
    class_weights: bool = False
    class_weight_power: float = Field(0.5, gt=0, le=1)
    smoothing: float = Field(0.1, ge=0, lt=1)  # label_smoothing only
    gamma: float = Field(2.0, ge=0)  # focal only


# the image table's own columns (data/table.py), and those written beside the factors in pseudo.csv
# and preds.csv: a factor of that name would overwrite them (a factor `group` would make the folds
# split by its classes instead of by group)
RESERVED_NAMES = ("group", "split_group", "path", "where", "stem", "image_id", "fold", "prob", "ImageID")
# the auxiliary outputs of numeric factors are named aux_<factor> (numeric.py), and a head's name is
# its factors' joined by "_": a factor `aux` or `aux_...` would name a head that reads as one of them
AUX_PREFIX = "aux_"


class FactorCfg(_Strict):
    """One factor of a table task: categorical (`classes`, the class index is the position in the
    list) or a binned number (`bins`, increasing edges: [30, 60] gives <30, [30,60), >=60)."""
    name: str
    column: str | None = None  # the table's column (default: the name)
    classes: list[str] | None = None
    bins: list[float] | None = None
    # the numbers are whole (ages in years): the bins read 30-59, and what measures distance to an
    # edge puts the cut half a unit below it (labels.Factor.cuts); a number that is not whole is an error
    integer: bool = False
    per_group: bool = False  # every row of a group must agree on it (checked when the table is read)

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.classes is None) == (self.bins is None):
            raise ValueError(f"factor {self.name!r} needs exactly one of classes (categorical) or bins (numeric)")
        if self.classes is not None and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)):
            raise ValueError(f"factor {self.name!r}: classes must be at least two distinct names")
        if self.bins is not None and (not self.bins or any(b <= a for a, b in zip(self.bins, self.bins[1:]))):
            raise ValueError(f"factor {self.name!r}: bins must be a non-empty increasing list, e.g. [30, 60]")
        if self.integer and (self.bins is None or not all(float(b).is_integer() for b in self.bins)):
            raise ValueError(f"factor {self.name!r}: integer needs bins with whole-number edges, e.g. [30, 60]")
        if not self.name or self.name == "class" or "," in self.name:
            raise ValueError(f"factor name {self.name!r} is not allowed (empty, 'class', or with a comma)")
        taken = (f"for a column of the image table or its outputs ({', '.join(RESERVED_NAMES)})"
                 if self.name in RESERVED_NAMES else
                 f"(names starting {AUX_PREFIX!r} are the auxiliary outputs of numeric factors)"
                 if (self.name + "_").startswith(AUX_PREFIX) else None)
        if taken:
            raise ValueError(f"factor name {self.name!r} is reserved {taken}; give it another name, with "
                             f"column: {self.column or self.name} to keep reading that column")
        return self


class TableTaskCfg(_Strict):
    """A task read from a table with one row per training image. Relative paths: `table` against the
    config file's folder (or the working directory, from --data or --set); `images` and `test` against
    the table's folder; the path column against `images`."""
    table: str
    images: str | None = None  # root of the path column (default: the table's folder)
    path_col: str = "path"
    group_col: str | None = None  # rows of a group never split across folds (default: each row its own)
    factors: list[FactorCfg]
    test: str | None = None  # a table of images to predict (path column only)

    @field_validator("factors")
    @classmethod
    def _distinct(cls, v):
        if not v:
            raise ValueError("a table task needs at least one factor")
        names = [f.name for f in v]
        if len(set(names)) != len(names):
            raise ValueError(f"factor names must be distinct, got {names}")
        # a binned factor keeps its numbers in `<name>_value` (and pseudo.csv its confidence in
        # `conf_<name>`), which another factor of that name would overwrite
        for f in v:
            for other in v:
                taken = [f"conf_{other.name}"] + ([f"{other.name}_value"] if other.bins is not None else [])
                if f.name in taken:
                    raise ValueError(f"factor name {f.name!r} is taken by factor {other.name!r}'s "
                                     f"{'numbers' if f.name.endswith('_value') else 'confidence'}; "
                                     f"name it otherwise")
        return v


class ModelCfg(_Strict):
    backbone: str = "resnet10t"
    pretrained: bool = False  # timm hub weights (needs network)
    checkpoint: str | None = None  # local weights for the backbone(s): one timm model's, or an mt fold's best.pt
    # the checkpoint file's digest, pinned by `mt train`: folds trained later (`mt resume`, `--fold K`,
    # pseudo-label rounds) must start from the very weights the first ones did
    checkpoint_sha256: str | None = None
    sharing: Literal["shared", "separate"] = "shared"
    drop_rate: float = Field(0.0, ge=0, lt=1)
    # train the heads only, on the backbone's features as they are (for a pretrained checkpoint); its
    # BatchNorm statistics stay as loaded
    freeze_backbone: bool = False


class DataCfg(_Strict):
    img_size: tuple[PositiveInt, PositiveInt] = (64, 64)  # height, width of the cache and the network input
    age_bins: list[int] = [30, 60]  # the mask preset's age factor
    cache_dir: str | None = None  # None: $MT_CACHE_DIR or ~/.cache/mt
    decode_workers: int = Field(0, ge=0)  # 0: one per core
    num_workers: int = Field(0, ge=0)  # DataLoader workers (albumentations backend)
    # hold the uint8 caches in accelerator memory: the torch backend's training batches and every
    # evaluation and prediction are gathered there
    cache_on_device: bool = False
    # leave out training items with a problem (a bad table row, a person whose pictures or labels are
    # wrong, an undecodable image) instead of stopping; RUN/skipped.csv lists them and why
    skip_bad: bool = False

    @field_validator("age_bins")
    @classmethod
    def _increasing(cls, v):
        if not v or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("age_bins must be a non-empty increasing list, e.g. [30, 60]")
        return v


class TorchAugCfg(_Strict):
    """Batched augmentation on the training device (backend: torch)."""
    hflip: float = Field(0.5, ge=0, le=1)
    scale: tuple[float, float] = (0.9, 1.1)  # the zoom drawn per image, (low, high): 0.05 <= low <= high <= 10
    translate: float = Field(0.06, ge=0, le=0.5)
    rotate: float = Field(10.0, ge=0, le=180)  # degrees
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)

    @field_validator("scale")
    @classmethod
    def _zoom(cls, v):
        # the sampling grid is divided by the zoom: 0 is an infinite grid, a negative one a mirror
        if not 0.05 <= v[0] <= v[1] <= 10:
            raise ValueError(f"scale {list(v)} must be (low, high) with 0.05 <= low <= high <= 10")
        return v


DEFAULT_ALBUMENTATIONS = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "Affine", "scale": [0.9, 1.1], "translate_percent": [-0.06, 0.06], "rotate": [-10, 10], "p": 0.7},
    {"name": "RandomBrightnessContrast", "brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5},
]


class MixCfg(_Strict):
    """Batch MixUp and CutMix: one λ per batch mixes the images and every head's targets alike."""
    mixup_alpha: float = Field(0.0, ge=0)  # Beta(α, α) for MixUp; 0 disables it
    cutmix_alpha: float = Field(0.0, ge=0)  # Beta(α, α) for CutMix; 0 disables it
    prob: float = Field(1.0, ge=0, le=1)  # chance that a batch is mixed at all
    switch_prob: float = Field(0.5, ge=0, le=1)  # with both on: chance of CutMix rather than MixUp
    stop_epoch: int | None = Field(None, ge=0)  # mix in the first this many epochs only (None: all)


class AugCfg(_Strict):
    backend: Literal["albumentations", "torch"] = "albumentations"
    mix: MixCfg = MixCfg()
    train: list[dict[str, Any]] = Field(default_factory=lambda: [dict(t) for t in DEFAULT_ALBUMENTATIONS])
    torch: TorchAugCfg = TorchAugCfg()
    # zoom: the central 90% scaled back to full size (a small scale and shift of the face)
    tta: list[Literal["none", "hflip", "zoom", "zoom_hflip"]] = ["none", "hflip"]

    @field_validator("train")
    @classmethod
    def _named(cls, v):
        for t in v:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise ValueError(f"each transform needs a 'name' (an albumentations class), got {t!r}")
        return v

    @field_validator("tta")
    @classmethod
    def _some_view(cls, v):
        if not v:
            raise ValueError("tta needs at least one view, e.g. [none]")
        return v


class TrainCfg(_Strict):
    folds: int = Field(5, ge=1)  # 1 only for a distilled student (one model: validate on one fold, train on the rest)
    fold: list[int] | None = None  # train only these folds (None: all)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)  # BatchNorm cannot train on one picture at a time
    eval_batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    # the backbone's learning rate as a fraction of lr: below 1 to fine-tune a pretrained checkpoint gently
    backbone_lr: float = Field(1.0, gt=0, le=1)
    warmup_epochs: float = Field(1.0, ge=0)
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables
    amp: bool = True  # bf16 autocast on CUDA; the CPU always trains in fp32
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile for training and prediction alike
    # torch.compile's mode: on a GPU `reduce-overhead` replays each step as one CUDA graph, for a small
    # network whose step is bound by launching its many short kernels (docs/RESULTS.md, the H200 rows)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    device: str = "auto"
    # folds trained at once, each in its own process over the shared cache; `auto` spreads them over
    # every visible GPU (whether two on one GPU pay is for scripts/bench_kfold.py to say)
    jobs: int = Field(1, ge=1)
    # numpy seeds are non-negative; the seeds derived from it per fold and epoch must fit 64 bits
    seed: int = Field(0, ge=0, lt=2**32)
    # the split's own seed, apart from `seed`: runs that differ only in their seed share folds.csv, so
    # `mt ensemble` takes a seed ensemble, and their OOF scores compare on the same persons
    fold_seed: int = Field(0, ge=0, lt=2**32)  # scikit-learn's limit
    # every metrics.csv figure also as TensorBoard scalars under each fold's tb/ (`tensorboard --logdir RUN`)
    tensorboard: bool = False
    # fit the epochs to this many seconds from the command's start (measured on two epochs; only ever fewer)
    time_limit_s: float | None = Field(None, gt=0)
    # average the weights of the fold's k best epochs (by validation macro F1) into avg.pt, which then
    # makes the fold's OOF and test predictions; 0 keeps the single best epoch
    avg_top_k: int = Field(0, ge=0)
    # draw training rows with weights (1 / count of their class) ** sampler_power: by the final class,
    # or by one head's class (a head name); none keeps the plain shuffle
    sampler: str = "class"  # on by default: about +0.015 OOF and held-out macro F1 on real faces over two seeds (docs/RESULTS.md)
    sampler_power: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _folds_in_range(self):
        if self.fold is not None and any(not 0 <= k < self.folds for k in self.fold):
            raise ValueError(f"fold {self.fold} out of range for {self.folds} folds")
        if self.fold == []:
            raise ValueError("fold [] trains nothing: name at least one fold, or leave it out for all")
        if self.fold is not None:  # a fold named twice is trained once (older runs' config.yaml may hold [0, 0])
            self.fold = list(dict.fromkeys(self.fold))
        return self

    def selected_folds(self) -> list[int]:
        """The folds this invocation trains, in the order it trains them (`fold`, or all of them)."""
        return list(self.fold) if self.fold is not None else list(range(self.folds))


class NumericCfg(_Strict):
    """What a binned numeric factor adds (under `numeric.<factor>`): an auxiliary head on its number
    whose output is read at prediction (blended into the factor's bin probabilities, weight fitted
    on OOF), and handling of the bin edges in training."""
    # regression on the number, a logit per bin edge, or a distribution over fine bins of the number
    aux: Literal["none", "regression", "ordinal", "distribution"] = "none"
    aux_weight: float = Field(1.0, ge=0)  # its loss weight
    aux_step: float | None = Field(None, gt=0)  # distribution: fine-bin width (None: a sixth of the edges' span)
    aux_sigma: float | None = Field(None, gt=0)  # distribution: spread of its targets (None: half a fine bin)
    train_bins: list[float] | None = None  # edges the training targets use (same count as the factor's bins)
    soft_edge: float = Field(0.0, ge=0)  # within this distance of an edge, targets spread to the neighbouring bin
    drop_near_edge: float = Field(0.0, ge=0)  # training rows within this distance of an edge are left out

    @field_validator("train_bins")
    @classmethod
    def _increasing(cls, v):
        if v is not None and (not v or any(b <= a for a, b in zip(v, v[1:]))):
            raise ValueError("train_bins must be a non-empty increasing list")
        return v


class SubjectsCfg(_Strict):
    """Pictures come in subjects (one person's pictures, no id given): the factors a subject keeps
    are read from its clearest picture, found by likeness (subjects.py)."""
    anchor: str  # "factor=class": the predicted class that marks a subject's clearest picture
    factors: list[str] = Field(min_length=1)  # what a subject keeps in every picture

    @field_validator("anchor")
    @classmethod
    def _factor_equals_class(cls, v):
        name, eq, value = v.partition("=")
        if not (eq and name.strip() and value.strip()):
            raise ValueError(f"anchor {v!r} must read factor=class, e.g. mask=not_worn")
        return v


MASK_SUBJECTS = SubjectsCfg(anchor="mask=not_worn", factors=["gender", "age"])


class DecideCfg(_Strict):
    """How the final class is chosen from the voted probabilities; everything here is fitted on the
    round's OOF probabilities, stored in roundN/decision.json, and applied by submit and predict."""
    offsets: Literal["none", "factor", "class"] = "none"  # additive log-prior offsets per factor class or per final class
    vote: Literal["soft", "hard"] = "soft"  # folds' head probabilities averaged, or their argmaxes counted
    blend_aux: bool = True  # blend each auxiliary numeric head into its factor (weight fitted on OOF)
    # read what a subject keeps from its clearest picture (weight fitted on OOF; `mt submit` applies
    # it to the test set as a whole, `mt predict` reads each picture on its own)
    subjects: SubjectsCfg | None = None


class EnsembleCfg(_Strict):
    """Written by `mt ensemble`: the member runs (their rounds) and their vote weights, and each
    member round's fold training ids (fold -> id), so a member retrained since is refused."""
    runs: list[str]
    rounds: list[int]
    weights: list[float]
    train_ids: list[dict[str, str | None]] | None = None  # None: an ensemble made before members were pinned
    # fitted weights only: per fold, the weights refitted without it, which vote the fold's pseudo labels
    # (`--labels-from`) so that no fold learns from a vote weighted on its own persons
    fold_weights: dict[int, list[float]] | None = None


class DistillCfg(_Strict):
    """Written by `mt distill`: the teacher run (its round) whose probabilities the student learns,
    and the weight of the true labels mixed into them."""
    teacher: str
    round: int
    true_weight: float = Field(0.5, ge=0, le=1)
    unlabeled: bool = True  # the teacher's test images join the student's training set
    val_fold: int = 0  # the teacher's fold whose persons the student keeps out, to validate on


class PseudoCfg(_Strict):
    # each factor's confidence threshold is the lowest at which the previous round's OOF predictions
    # of that factor are right this often; 0 takes every test image with every factor
    precision: float = Field(0.95, ge=0, le=1)
    # 0.5 to 1: the precision must hold as a one-sided lower bound at this level (Wilson), counting
    # the persons (groups) above the threshold rather than the pictures, since a person's pictures
    # are read alike and are no independent evidence; thresholds are tested from the most confident
    # down and the first that fails ends the search; 0 asks only that the OOF rows reach it
    bound: float = Field(0.0, ge=0, lt=1)
    rounds: int = Field(1, ge=1)
    # every test image joins, with its fold's previous-round final-class probabilities as soft
    # targets, instead of the confident factors as hard labels (precision then does not apply)
    soft: bool = False

    @field_validator("bound")
    @classmethod
    def _a_lower_bound(cls, v):
        if 0 < v < 0.5:  # below 0.5 the one-sided bound lies above the precision: it would loosen the cut
            raise ValueError(f"bound {v} must be 0 (none) or a level from 0.5 up to 1, such as 0.9")
        return v


class Config(_Strict):
    task: Literal["mask"] | TableTaskCfg = "mask"  # the competition preset, or a table task
    data_root: str | None = None  # the competition root (task: mask)
    heads: str | None = None  # None: one head per factor
    losses: dict[str, LossCfg] = Field(default_factory=dict)  # by head name; missing heads use ce
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    aug: AugCfg = AugCfg()
    train: TrainCfg = TrainCfg()
    # by numeric factor name, or "*" for every one (a factor's own settings are laid over "*"'s, so
    # `numeric.age.soft_edge: 3` keeps the auxiliary head "*" gives); by default every binned factor
    # gets an auxiliary regression head (docs/RESULTS.md measures it)
    numeric: dict[str, NumericCfg] = Field(default_factory=lambda: {"*": NumericCfg(aux="regression")})
    decide: DecideCfg = DecideCfg()
    pseudo: PseudoCfg = PseudoCfg()
    ensemble: EnsembleCfg | None = None  # set by `mt ensemble` only
    distill: DistillCfg | None = None  # set by `mt distill` only

    def loss_for(self, head: str) -> LossCfg:
        return self.losses.get(head, LossCfg())

    @model_validator(mode="after")
    def _mask_subjects(self):
        # the competition's pictures come seven to a person: gender and age read from the unmasked
        # one (+0.014 held-out macro F1 over 11 runs on real faces, docs/RESULTS.md); `subjects:
        # null` under decide turns it off
        if self.task == "mask" and "subjects" not in self.decide.model_fields_set:
            self.decide = self.decide.model_copy(update={"subjects": MASK_SUBJECTS})
        return self

    @model_validator(mode="after")
    def _factors_over_every(self):
        # a factor's settings name what differs from "*"'s; written out whole, so config.yaml (and a
        # run read back from it) holds what the run did
        every = self.numeric.get("*")
        if every is not None:
            self.numeric = {name: c if name == "*" else NumericCfg.model_validate(
                every.model_dump() | c.model_dump(include=c.model_fields_set)) for name, c in self.numeric.items()}
        return self

    @model_validator(mode="after")
    def _folds(self):
        if self.train.folds < 2 and self.distill is None:
            raise ValueError("train.folds must be at least 2 (k-fold training)")
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    if re.fullmatch(r"[-+]?0[0-7_]+", raw.strip()):  # YAML 1.1: 010 is 8, where 09 stays 9
        raise ConfigError(f"override {item!r}: YAML reads a number with a leading 0 as octal "
                          f"({yaml.safe_load(raw)}); write it without the 0, or quote it for a string")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())}); "
                          f"quote lists and mappings whole, e.g. --set \"data.img_size=[64, 64]\"") from None
    return key.strip().split("."), value


# Mappings whose built-in default is not empty: an override of one of their keys changes that key
# of the default, instead of making a mapping with that key alone (`--set numeric.age.soft_edge=3`
# keeps numeric."*"), where the config file does not set the mapping itself.
DEFAULT_MAPPINGS = ("numeric",)


class OptionOverride(str):
    """A dotted override that a command's option made (`--epochs 3` is train.epochs=3): an error it
    causes names the option, which the user typed, not a --set they did not."""

    def __new__(cls, item: str, option: str):
        made = super().__new__(cls, item)
        made.option = option
        return made

    def __reduce__(self):  # copies and pickles keep the option
        return OptionOverride, (str(self), self.option)


def train_overrides(heads: str | None = None, sharing: str | None = None, folds: int | None = None,
                    fold: list[int] | None = None, epochs: int | None = None, jobs: int | None = None,
                    skip_bad: bool = False, time_limit_s: float | None = None) -> list[str]:
    """`mt train`'s options as dotted overrides (each given one; `--set` comes after them and wins)."""
    given = {("heads", "--heads"): heads, ("model.sharing", "--sharing"): sharing, ("train.folds", "--folds"): folds,
             ("train.epochs", "--epochs"): epochs, ("train.jobs", "--jobs"): jobs,
             ("train.time_limit_s", "--time-limit"): time_limit_s}
    out = [OptionOverride(f"{key}={value}", option) for (key, option), value in given.items() if value is not None]
    if fold:
        out.append(OptionOverride(f"train.fold={json.dumps(list(fold))}", "--fold"))
    if skip_bad:
        out.append(OptionOverride("data.skip_bad=true", "--skip-bad"))
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain types
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for depth, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None and depth == 0 and k in DEFAULT_MAPPINGS:
                child = node[k] = Config().model_dump(mode="json")[k]
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or a name under the project's configs/ (`demo` or `demo.yaml`)."""
    p = Path(path)
    if p.is_file():  # a folder named like a preset (`mt demo --out demo`) is not a config
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file {path} not found (nor under {CONFIG_DIR})")


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, but a key given twice in one mapping is an error: PyYAML keeps the last one
    without a word, so a second `train:` section would drop every setting of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: the base loader merges it
                key = "<<"  # and the keys after it override; but one mapping takes one merge key
            else:
                key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # a list or mapping as a key: the base loader refuses it with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: str | Path | None = None) -> Config:
    """Defaults < the YAML file < dotted overrides < `data` (the competition root, or a table task's
    table). A table task's relative paths and a local checkpoint's come out absolute, so the resolved
    config works anywhere."""
    source = "defaults"
    raw: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        raw, source = read_yaml(p), str(p)
        _anchor_paths(raw, p.parent)
        _losses_of_heads_kept(raw, apply_overrides(raw, list(overrides)).get("heads"))
    raw = apply_overrides(raw, list(overrides))
    _migrate(raw)
    if data is not None:
        if isinstance(raw.get("task"), dict):
            raw["task"]["table"] = str(home(data).resolve())
        elif home(data).is_file():
            raise ConfigError(f"--data {data}: a file, and the task is the competition's, whose data is a folder "
                              f"(train/, eval/); a table needs a --config that names its factors (task: table, "
                              f"factors; configs/utkface.yaml is one)")
        else:
            raw["data_root"] = str(home(data).resolve())
    cfg = validate(raw, source, list(overrides))
    if isinstance(cfg.task, TableTaskCfg):
        cfg.task = absolute_paths(cfg.task)
    # config.yaml keeps paths absolute: later commands (submit, resume) may run from anywhere
    if cfg.model.checkpoint:
        cfg.model.checkpoint = str(home(cfg.model.checkpoint).resolve())
    if cfg.data_root:
        cfg.data_root = str(home(cfg.data_root).resolve())
    if cfg.data.cache_dir:
        cfg.data.cache_dir = str(home(cfg.data.cache_dir).resolve())
    return cfg


def _losses_of_heads_kept(raw: dict, heads) -> None:
    """A config file's losses are for its own heads: where the command names other heads (`--heads
    class` with configs/demo.yaml), those of heads it no longer has are left out, as `mt distill`
    does. Losses the command itself sets are still checked against the heads."""
    losses = raw.get("losses")
    if heads is None or heads == raw.get("heads") or not isinstance(losses, dict):
        return
    names = {name.strip() for name in str(heads).split(",")}
    raw["losses"] = {head: loss for head, loss in losses.items() if head in names}


def _migrate(raw: dict) -> None:
    """Keys of earlier versions that a saved run may hold: pseudo.threshold (one threshold on the
    final class) gave way to pseudo.precision, a per-invocation setting, so it is dropped."""
    pseudo = raw.get("pseudo")
    if isinstance(pseudo, dict):
        pseudo.pop("threshold", None)


def home(p: str | Path) -> Path:
    """`~` and `~/...` as the user's home; `~name/...` stays a name (a folder may be called so, and
    another user's home is no place for mt's files)."""
    p = Path(p)
    return p.expanduser() if p.parts and p.parts[0] == "~" else p


def _anchor_paths(raw: dict, folder: Path) -> None:
    """A YAML file's relative paths (the data root, a table task's table, a local checkpoint, the
    cache, an ensemble's members, a student's teacher) are relative to its folder."""
    if isinstance(raw.get("data_root"), str):
        raw["data_root"] = str(folder / home(raw["data_root"]))  # an absolute path stays itself
    for section, key in (("task", "table"), ("model", "checkpoint"), ("data", "cache_dir"), ("distill", "teacher")):
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = str(folder / home(node[key]))
    node = raw.get("ensemble")
    if isinstance(node, dict) and isinstance(node.get("runs"), list):
        node["runs"] = [str(folder / home(r)) if isinstance(r, str) else r for r in node["runs"]]


def absolute_paths(t: TableTaskCfg) -> TableTaskCfg:
    table = home(t.table).resolve()
    under = lambda p: str((table.parent / home(p)).resolve())  # noqa: E731  an absolute p stays itself
    return t.model_copy(update={"table": str(table), "images": under(t.images or "."),
                                "test": under(t.test) if t.test else None})


def dotted_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every settable dotted key of the schema (train.lr, aug.mix.prob, ...)."""
    model = model or Config
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += dotted_keys(sub, f"{key}.")
    return keys


def _schema_types(annotation) -> list:
    """The types an annotation may hold, unions and Optional unfolded."""
    if get_origin(annotation) in (Union, UnionType):
        return [t for a in get_args(annotation) for t in _schema_types(a)]
    return [annotation]


def _types_at(loc: tuple) -> list:
    """The schema types a location may hold, through models, unions, lists and dicts (a dict's key
    and a list's index stand for any)."""
    types: list = [Config]
    for part in loc:
        inner = []
        for t in types:
            if isinstance(t, type) and issubclass(t, BaseModel):
                field = t.model_fields.get(str(part))
                inner += _schema_types(field.annotation) if field else []
            elif get_origin(t) in (list, tuple) and get_args(t):
                inner += _schema_types(get_args(t)[0])
            elif get_origin(t) is dict and get_args(t):
                inner += _schema_types(get_args(t)[1])
        types = inner
    return types


def _is_section(loc: tuple) -> bool:
    """Whether a location names a whole section (a model, judged by its own validators over all of its
    fields at once) rather than one field; the root () is a section."""
    return any(isinstance(t, type) and issubclass(t, BaseModel) for t in _types_at(loc))


def closest_key(loc: tuple) -> str | None:
    """The known key an unknown one was probably meant to be: a field of its own section first
    (`numeric.age.soft_edg`, `decide.subjects.anchr`), else any dotted key (`train.img_size`)."""
    *section, name = [str(x) for x in loc]
    fields = [f for t in _types_at(tuple(section)) if isinstance(t, type) and issubclass(t, BaseModel)
              for f in t.model_fields]
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return ".".join([*section, close[0]])
    close = difflib.get_close_matches(".".join([*section, name]), dotted_keys(), n=1, cutoff=0.6)
    return close[0] if close else None


def override_for(loc: tuple, overrides: list[str]) -> str | None:
    """The last --set (the one that won) whose key is the error's location or a section holding it,
    or lies under a field in error (a dict or list set piecewise). An error of a whole section (a
    model validator weighing several fields) names none: any override inside it may be innocent
    (`train.fold=[7]` is out of range, not `train.lr=0.01` beside it)."""
    where = [str(x) for x in loc]
    section = _is_section(loc)
    found = None
    for item in overrides:
        keys = item.split("=", 1)[0].strip().split(".")
        if where[:len(keys)] == keys or (not section and keys[:len(where)] == where):
            found = item
    return found


def validate(raw: dict, source: str, overrides: list[str] = ()) -> Config:
    """The schema's verdict, one line per problem, each naming the --set that caused it (if one did)
    and, for an unknown key, the closest known one."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = []
        table_task = isinstance(raw.get("task"), dict)
        for err in e.errors():
            if table_task and "literal['mask']" in err["loc"]:
                continue  # a mapping is meant for the table member: that it is not 'mask' says nothing
            # a union (task: mask | table) puts the member's type name in the location
            loc = tuple(x for x in err["loc"] if x not in ("TableTaskCfg", "literal['mask']"))
            # a check over several keys has no location, and pydantic's "Value error, " says nothing
            msg = err["msg"].removeprefix("Value error, ")
            line = f"  {'.'.join(str(x) for x in loc)}: {msg}" if loc else f"  {msg}"
            if err["type"] == "extra_forbidden":
                close = closest_key(loc)
                line += f" (did you mean {close}?)" if close else ""
            cause = override_for(loc, list(overrides))
            if cause:
                line += f"  [from {cause.option if isinstance(cause, OptionOverride) else f'--set {cause}'}]"
            lines.append(line)
        given = " and ".join(dict.fromkeys("options" if isinstance(o, OptionOverride) else "--set overrides"
                                           for o in overrides))
        raise ConfigError(f"invalid config ({source}{f' with {given}' if given else ''}):\n"
                          + "\n".join(lines)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
