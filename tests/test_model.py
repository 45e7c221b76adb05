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
