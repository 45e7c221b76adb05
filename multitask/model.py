"""timm backbone(s) and one linear head per task head, shared or separate.

shared:   one backbone (num_classes=0) → pooled features → a Linear per head.
separate: one backbone per head, each with its own Linear; the batch is loaded once and fed to all.
The model takes images as floats in [0, 1] and normalises them itself (mean/std buffers from the
backbone's pretrained config), so the data path stays uint8 up to the device and an exported model
needs no preprocessing beside it.
"""
from __future__ import annotations

import difflib
import hashlib
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from multitask.config import ConfigError, ModelCfg
from multitask.labels import Head


class CheckpointError(ValueError):
    pass


def check_model(cfg: ModelCfg, heads: list[Head] | None = None) -> ModelCfg:
    """What can be known about the model before a run directory is touched: the backbone is a timm
    architecture (a typo gets the closest names) and a local checkpoint file exists (the very file,
    where the settings pin one). With `heads`, the weights (a checkpoint, or the hub's) are also
    loaded into the model once, so a file that does not fit it, or hub weights that cannot be
    fetched, are refused before `mt train` writes or `--force` removes anything (timm keeps fetched
    weights in its cache, where the folds find them). Returns the settings with the checkpoint's
    digest pinned."""
    if not timm.is_model(cfg.backbone):
        close = difflib.get_close_matches(cfg.backbone, timm.list_models(), n=3, cutoff=0.6)
        raise ConfigError(f"model.backbone {cfg.backbone!r} is not a timm model"
                          + (f"; close: {', '.join(close)}" if close else "; `timm.list_models()` lists them"))
    if cfg.freeze_backbone and not (cfg.checkpoint or cfg.pretrained):
        raise ConfigError("model.freeze_backbone: the backbone has no weights to keep (neither model.checkpoint "
                          "nor model.pretrained), and its random features would never train")
    if cfg.checkpoint:
        cfg = pin_checkpoint(cfg)
    if heads is not None and cfg.checkpoint:
        MultiHeadNet(cfg, heads)  # the backbones each head gets, loaded as the first fold will load them
    elif heads is not None and cfg.pretrained:
        try:
            create_backbones(cfg)  # one is enough: the folds' others come from timm's cache
        except Exception as e:  # no network, no weights for this architecture: whatever the hub raised
            raise CheckpointError(f"model.pretrained: timm could not load {cfg.backbone}'s hub weights "
                                  f"({type(e).__name__}: {first_lines(e)}); without network, give a local file "
                                  f"as model.checkpoint") from None
    return cfg


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pin_checkpoint(cfg: ModelCfg) -> ModelCfg:
    """The model settings with the checkpoint's digest: taken from the file where none is recorded yet,
    checked against it where one is (a run's config.yaml, whose later folds must start where its first
    ones did)."""
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found (model.checkpoint)")
    digest = file_sha256(path)
    if cfg.checkpoint_sha256 and cfg.checkpoint_sha256 != digest:
        raise CheckpointError(f"{path}: not the checkpoint this run started from (sha256 {digest[:12]}…, the run "
                              f"recorded {cfg.checkpoint_sha256[:12]}…): it was overwritten since; put the old "
                              f"file back (or point model.checkpoint at it), or train a new run from this one")
    return cfg.model_copy(update={"checkpoint_sha256": digest})


def create_backbones(cfg: ModelCfg, count: int = 1, owners: list[str] | None = None) -> list[nn.Module]:
    """`count` timm backbones without classifier; weights from the hub (`pretrained`) or a local
    file: one timm model's weights, or an `mt` fold checkpoint (`best.pt`), whose backbones it takes
    and whose heads it leaves behind. `owners`: the head each backbone serves (separate backbones),
    by which an `mt` checkpoint's separate backbones are matched."""
    kwargs = dict(num_classes=0, drop_rate=cfg.drop_rate)
    if not cfg.checkpoint:
        return [timm.create_model(cfg.backbone, pretrained=cfg.pretrained, **kwargs) for _ in range(count)]
    path = Path(cfg.checkpoint)
    pin_checkpoint(cfg)
    try:
        # timm's reader: it unwraps `state_dict`/`model` and strips DDP and torch.compile prefixes
        state = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as e:  # a file torch cannot read raises whatever its unpickler met
        raise CheckpointError(f"{path}: cannot read a checkpoint from it: {e}") from None
    if any(k.startswith("backbones.") for k in state):
        backbones = []
        for i in range(count):
            backbone = timm.create_model(cfg.backbone, **kwargs)
            try:
                backbone.load_state_dict(run_backbone(state, i, count, path, owners))
            except RuntimeError as e:
                raise CheckpointError(f"{path}: its backbone does not fit {cfg.backbone}: {first_lines(e)}") from None
            backbones.append(backbone)
        return backbones
    try:
        # timm's own loader: it drops the classifier weights that num_classes=0 has no place for, and
        # applies the architecture's conversion of foreign checkpoints
        overlay = dict(file=str(path))
        backbones = [timm.create_model(cfg.backbone, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
                     for _ in range(count)]
    except (RuntimeError, KeyError, OSError) as e:
        raise CheckpointError(f"{path}: cannot load into {cfg.backbone}: {first_lines(e)}") from None
    # without the classifier, timm loads leniently and only logs what it skipped: a file of another
    # model would leave the backbone as initialised, and training "from a checkpoint" from scratch.
    # Judged by the values, not the names: timm renames a foreign layout's keys (an original
    # repository's) on the way in
    wanted = {k: t for k, t in backbones[0].state_dict().items() if t.is_floating_point() and t.numel() > 1
              and bool((t != t.flatten()[0]).any())}  # what initialisation fills with one value says nothing
    held = {fingerprint(t) for t in state.values() if torch.is_tensor(t) and t.is_floating_point()}
    found = sum(fingerprint(t) in held for t in wanted.values())
    if found < len(wanted) / 2:
        raise CheckpointError(f"{path}: holds {found} of the {len(wanted)} weights of {cfg.backbone} "
                              f"(its first: {next(iter(state), 'none')}); is it a checkpoint of that model?")
    return backbones


def fingerprint(t: torch.Tensor) -> tuple:
    """A tensor's values whatever its name and shape (a conversion may reshape one)."""
    t = t.detach().double().flatten()
    return t.numel(), round(float(t.sum()), 6), round(float(t.square().sum()), 6)


def run_backbone(state: dict, index: int, count: int, path: Path, owners: list[str] | None = None) -> dict:
    """Backbone `index` of `count` out of an `mt` model's state dict: one shared backbone serves every
    backbone wanted; separate backbones go to the head of the same name (`owners`: the head each
    wanted backbone serves; the checkpoint's own are its first heads, in the order it holds them)."""
    held = sorted({int(k.split(".")[1]) for k in state if k.startswith("backbones.")})
    if len(held) == 1:
        source = held[0]
    elif len(held) != count:
        raise CheckpointError(f"{path}: an mt checkpoint with {len(held)} separate backbones, and this model "
                              f"has {count} (model.sharing); it cannot tell which goes where")
    elif owners is None:
        source = held[index]
    else:
        # heads first, then the auxiliary outputs (MultiHeadNet): backbone i serves the i-th head
        theirs = list(dict.fromkeys(k.split(".")[1] for k in state if k.startswith("heads.")))[:len(held)]
        if sorted(theirs) != sorted(owners):
            raise CheckpointError(f"{path}: its separate backbones serve heads {theirs}, and this model's "
                                  f"serve {owners}; it cannot tell which goes where")
        source = held[theirs.index(owners[index])]
    prefix = f"backbones.{source}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def first_lines(error: Exception, chars: int = 300) -> str:
    """torch's load errors list every key; the start says what is wrong."""
    text = " ".join(str(error).split())
    return text if len(text) <= chars else text[:chars] + " ..."


def feature_size(backbone: nn.Module) -> int:
    """The width of what the classifier-less backbone returns: timm models with a conv head after the
    pooling (mobilenetv3, lcnet, ghostnet) return `head_hidden_size`, wider than `num_features`."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


class MultiHeadNet(nn.Module):
    """`aux` adds outputs beside the heads, name -> (size, head): each reads the features the named
    head reads (the auxiliary numeric outputs of `numeric.py`)."""

    def __init__(self, cfg: ModelCfg, heads: list[Head], aux: dict[str, tuple[int, str]] | None = None):
        super().__init__()
        self.sharing = cfg.sharing
        self.head_names = [h.name for h in heads]
        n_backbones = 1 if cfg.sharing == "shared" else len(heads)
        self.backbones = nn.ModuleList(create_backbones(cfg, n_backbones, None if n_backbones == 1 else self.head_names))
        dim = feature_size(self.backbones[0])
        aux = aux or {}
        self.heads = nn.ModuleDict({h.name: nn.Linear(dim, h.n) for h in heads}
                                   | {name: nn.Linear(dim, size) for name, (size, _) in aux.items()})
        self.reads = {name: name for name in self.head_names} | {name: head for name, (_, head) in aux.items()}
        self.frozen = cfg.freeze_backbone
        if self.frozen:
            self.backbones.requires_grad_(False)
        # timm drops out inside the backbone, which a frozen one keeps in eval mode: the features get
        # it here instead (the same place, the pooled features, for the convolutional backbones)
        self.feature_drop = cfg.drop_rate if self.frozen else 0.0
        pcfg = self.backbones[0].pretrained_cfg
        self.register_buffer("mean", torch.tensor(pcfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pcfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbones.eval()  # a frozen backbone keeps its BatchNorm statistics and no dropout
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.sharing == "shared":
            feats = self.dropped(self.backbones[0](x))
            return {name: self.heads[name](feats) for name in self.reads}
        feats = {name: self.dropped(bb(x)) for name, bb in zip(self.head_names, self.backbones)}
        return {name: self.heads[name](feats[head]) for name, head in self.reads.items()}

    def dropped(self, feats: torch.Tensor) -> torch.Tensor:
        return F.dropout(feats, self.feature_drop, self.training) if self.feature_drop else feats


def build_model(cfg: ModelCfg, heads: list[Head], aux: dict[str, tuple[int, str]] | None = None) -> MultiHeadNet:
    return MultiHeadNet(cfg, heads, aux)


def param_groups(model: nn.Module, weight_decay: float, lr: float, backbone_lr: float = 1.0) -> list[dict]:
    """No weight decay on biases and norm weights (1-d parameters), as timm does. With `backbone_lr`
    below 1 the backbone learns at that fraction of `lr` (a pretrained one is fine-tuned gently while
    the fresh heads learn at `lr`); its groups come after the heads', whose lr is the one logged."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scaled = backbone_lr != 1.0 and name.startswith("backbones.")
            groups.setdefault((scaled, p.ndim <= 1), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr": lr * backbone_lr if scaled else lr}
            for (scaled, no_decay), params in sorted(groups.items(), key=lambda item: item[0])]
