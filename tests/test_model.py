"""Shared and separate backbones, and pretrained weights from a local checkpoint file."""
import pytest
import timm
import torch

from multitask.config import ModelCfg
from multitask.labels import mask_task
from multitask.model import CheckpointError, build_model


@pytest.mark.parametrize("sharing, n_backbones", [("shared", 1), ("separate", 3)])
def test_heads_and_backbones(sharing, n_backbones):
    heads = mask_task().heads("mask,gender,age")
    model = build_model(ModelCfg(backbone="test_efficientnet", sharing=sharing), heads)
    assert len(model.backbones) == n_backbones
    out = model(torch.rand(2, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"mask": (2, 3), "gender": (2, 2), "age": (2, 3)}


def test_backbone_with_a_conv_head_after_pooling():
    # lcnet and mobilenetv3 widen the pooled features (num_features 256) to head_hidden_size (1280)
    heads = mask_task().heads("mask,gender,age")
    model = build_model(ModelCfg(backbone="lcnet_050"), heads)
    out = model(torch.rand(2, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"mask": (2, 3), "gender": (2, 2), "age": (2, 3)}


def test_separate_backbones_are_independent():
    heads = mask_task().heads("mask,gender_age")
    model = build_model(ModelCfg(backbone="test_efficientnet", sharing="separate"), heads)
    out = model(torch.rand(2, 3, 32, 32))
    out["mask"].sum().backward()
    assert all(p.grad is None for p in model.backbones[1].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbones[0].parameters())


def test_local_checkpoint_loads_into_backbone(tmp_path):
    torch.manual_seed(123)
    source = timm.create_model("resnet10t", num_classes=1000)  # a classifier the backbone must drop
    path = tmp_path / "resnet10t_weights.pth"
    torch.save(source.state_dict(), path)
    heads = mask_task().heads("mask,gender,age")
    model = build_model(ModelCfg(backbone="resnet10t", checkpoint=str(path)), heads)
    loaded = model.backbones[0].state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(loaded[name], value), name
    fresh = build_model(ModelCfg(backbone="resnet10t"), heads).backbones[0].state_dict()
    assert not torch.equal(fresh["conv1.0.weight"], source.state_dict()["conv1.0.weight"])


def test_missing_or_wrong_checkpoint_is_a_clear_error(tmp_path):
    heads = mask_task().heads("class")
    with pytest.raises(CheckpointError, match="not found"):
        build_model(ModelCfg(backbone="resnet10t", checkpoint=str(tmp_path / "nope.pth")), heads)
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), wrong)
    with pytest.raises(CheckpointError, match="wrong.pth"):
        build_model(ModelCfg(backbone="resnet10t", checkpoint=str(wrong)), heads)


def run_checkpoint(path, sharing="shared", heads="mask,gender,age", backbone="test_efficientnet"):
    """A fold checkpoint as `mt train` writes it (best.pt: the model's state dict under "model")."""
    source = build_model(ModelCfg(backbone=backbone, sharing=sharing), mask_task().heads(heads))
    torch.save({"model": source.state_dict(), "epoch": 3, "scores": {"f1": 0.5}}, path)
    return source


def test_a_run_checkpoint_gives_its_backbone_and_leaves_its_heads(tmp_path):
    """Transfer from an earlier run: its backbone(s), never its heads (another task's heads differ)."""
    torch.manual_seed(0)
    source = run_checkpoint(tmp_path / "best.pt")
    model = build_model(ModelCfg(backbone="test_efficientnet", checkpoint=str(tmp_path / "best.pt")),
                        mask_task().heads("class"))
    for name, value in source.backbones[0].state_dict().items():
        assert torch.equal(model.backbones[0].state_dict()[name], value), name
    assert model.heads["class"].weight.shape == (18, source.heads["mask"].weight.shape[1])

    # one shared backbone serves each separate one; separate ones go one to one
    separate = ModelCfg(backbone="test_efficientnet", sharing="separate")
    spread = build_model(separate.model_copy(update={"checkpoint": str(tmp_path / "best.pt")}),
                         mask_task().heads("mask,gender,age"))
    for bb in spread.backbones:
        assert torch.equal(bb.conv_stem.weight, source.backbones[0].conv_stem.weight)
    three = run_checkpoint(tmp_path / "sep.pt", sharing="separate")
    again = build_model(separate.model_copy(update={"checkpoint": str(tmp_path / "sep.pt")}),
                        mask_task().heads("mask,gender,age"))
    for i in range(3):
        assert torch.equal(again.backbones[i].conv_stem.weight, three.backbones[i].conv_stem.weight)
    assert not torch.equal(three.backbones[0].conv_stem.weight, three.backbones[1].conv_stem.weight)

    with pytest.raises(CheckpointError, match=r"sep.pt: an mt checkpoint with 3 separate backbones, "
                                              r"and this model has 1 \(model.sharing\)"):
        build_model(ModelCfg(backbone="test_efficientnet", checkpoint=str(tmp_path / "sep.pt")),
                    mask_task().heads("class"))
    run_checkpoint(tmp_path / "resnet.pt", backbone="resnet10t")
    with pytest.raises(CheckpointError, match=r"resnet.pt: its backbone does not fit test_efficientnet"):
        build_model(ModelCfg(backbone="test_efficientnet", checkpoint=str(tmp_path / "resnet.pt")),
                    mask_task().heads("class"))


def test_separate_backbones_go_to_the_heads_of_their_names(tmp_path):
    """A checkpoint of heads mask,gender,age into heads age,gender,mask: by position, the age head got
    the mask backbone, and frozen, never recovered."""
    from multitask.labels import Factor, Task

    torch.manual_seed(0)
    heads = mask_task().heads("mask,gender,age")
    source = build_model(ModelCfg(backbone="test_efficientnet", sharing="separate"), heads,
                         aux={"aux_age": (1, "age")})  # the auxiliary outputs follow the heads in the file
    torch.save({"model": source.state_dict()}, tmp_path / "sep.pt")
    cfg = ModelCfg(backbone="test_efficientnet", sharing="separate", checkpoint=str(tmp_path / "sep.pt"))
    target = build_model(cfg, mask_task().heads("age,gender,mask"))
    for name, bb in zip(target.head_names, target.backbones):
        mine = source.backbones[source.head_names.index(name)]
        assert torch.equal(bb.conv_stem.weight, mine.conv_stem.weight), name
    other = Task("t", (Factor("a", ("x", "y")), Factor("b", ("x", "y")), Factor("c", ("x", "y"))))
    with pytest.raises(CheckpointError, match=r"sep.pt: its separate backbones serve heads \['mask', 'gender', 'age'\], "
                                              r"and this model's serve \['a', 'b', 'c'\]"):
        build_model(cfg, other.heads("a,b,c"))


def test_a_frozen_backbone_still_drops_out_its_features(tmp_path):
    """timm's dropout sits inside the backbone, which a frozen one keeps in eval mode: model.drop_rate
    (configs/competition.yaml: 0.2) was silently off with model.freeze_backbone."""
    torch.manual_seed(0)
    run_checkpoint(tmp_path / "best.pt")
    x = torch.rand(4, 3, 32, 32)
    cfg = ModelCfg(backbone="test_efficientnet", drop_rate=0.5, checkpoint=str(tmp_path / "best.pt"))
    model = build_model(cfg.model_copy(update={"freeze_backbone": True}), mask_task().heads("class")).train()
    assert not model.backbones[0].training
    assert not torch.equal(model(x)["class"], model(x)["class"])  # dropout acts
    model.eval()
    assert torch.equal(model(x)["class"], model(x)["class"])
    assert build_model(cfg, mask_task().heads("class")).feature_drop == 0.0  # trained whole: timm's own, as before


def test_a_checkpoint_that_holds_other_weights_is_refused(tmp_path):
    """timm loads a classifier-less backbone leniently and only logs what it skipped: a file whose
    names do not match would leave the backbone as initialised, trained from scratch unawares."""
    weights = timm.create_model("test_efficientnet", num_classes=10).state_dict()
    path = tmp_path / "renamed.pth"
    torch.save({f"encoder.{k}": v for k, v in weights.items()}, path)
    with pytest.raises(CheckpointError, match=r"renamed.pth: holds 0 of the \d+ weights of test_efficientnet "
                                              r"\(its first: encoder\.conv_stem\.weight\)"):
        build_model(ModelCfg(backbone="test_efficientnet", checkpoint=str(path)), mask_task().heads("class"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: cannot read a checkpoint from it"):
        build_model(ModelCfg(backbone="test_efficientnet", checkpoint=str(tmp_path / "junk.pth")),
                    mask_task().heads("class"))


def test_a_checkpoint_in_its_original_repositorys_layout_loads_as_timm_converts_it(tmp_path):
    """ConvNeXt weights as Facebook's repository saves them (downsample_layers, dwconv, pwconv): timm
    renames them on the way in, and the check that the file was loaded judged the names before that."""
    import re

    def facebook_layout(k):  # the inverse of timm's convnext.checkpoint_filter_fn
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.([0-9]+)\.downsample\.([0-9]+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.([0-9]+)\.blocks\.([0-9]+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        return k.replace("head.norm.", "norm.").replace("head.fc.", "head.")

    torch.manual_seed(3)
    original = timm.create_model("test_convnext", num_classes=10).state_dict()
    torch.save({"model": {facebook_layout(k): v for k, v in original.items()}}, tmp_path / "convnext_fb.pth")
    torch.manual_seed(4)
    model = build_model(ModelCfg(backbone="test_convnext", checkpoint=str(tmp_path / "convnext_fb.pth")),
                        mask_task().heads("class"))
    loaded = model.backbones[0].state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in loaded)  # every backbone weight, the head's dropped


def test_hub_weights_that_cannot_be_fetched_are_refused_up_front(monkeypatch):
    """`model.pretrained: true` without network used to fail at the first fold, after the run
    directory was written; check_model fetches them once first."""
    from multitask.model import check_model

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    cfg = ModelCfg(backbone="test_efficientnet", pretrained=True)
    with pytest.raises(CheckpointError, match=r"model.pretrained: timm could not load test_efficientnet's hub "
                                              r"weights \(OSError: We couldn't connect"):
        check_model(cfg, mask_task().heads("class"))
    assert check_model(cfg) == cfg  # without heads: the settings alone, nothing fetched


def test_the_backbone_can_learn_at_a_fraction_of_the_heads_lr():
    from multitask.model import param_groups

    model = build_model(ModelCfg(backbone="test_efficientnet"), mask_task().heads("mask,gender,age"))
    backbone = {id(p) for p in model.backbones.parameters()}
    groups = param_groups(model, 0.05, lr=1e-3, backbone_lr=0.25)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each parameter once
    for g in groups:
        in_backbone = {id(p) in backbone for p in g["params"]}
        assert len(in_backbone) == 1
        assert g["lr"] == (2.5e-4 if in_backbone == {True} else 1e-3)
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"]) else 0.05)
    assert groups[0]["lr"] == 1e-3  # the heads' lr comes first: it is the one metrics.csv logs

    # at 1, the two groups of earlier versions, so that their last.pt still resumes
    plain = param_groups(model, 0.05, lr=1e-3)
    n_matrices = sum(p.ndim > 1 for p in model.parameters())
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in plain] == [
        (n_matrices, 0.05, 1e-3), (len(list(model.parameters())) - n_matrices, 0.0, 1e-3)]

    torch.optim.AdamW(groups, lr=1e-3)  # an optimizer takes them as they are
