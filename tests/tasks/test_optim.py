import torch
from torch import nn

from tasks.common.optim import build_param_groups


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1, bias=False))


def test_norms_and_biases_get_no_decay():
    model = _model()
    groups = build_param_groups(model, 0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


def test_frozen_parameters_and_empty_groups():
    model = _model()
    for p in model[1].parameters():
        p.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    groups = build_param_groups(model, 0.1)
    assert len(groups) == 1 and len(groups[0]["params"]) == 2
    all_groups = build_param_groups(model, 0.1, trainable_only=False)
    assert sum(len(g["params"]) for g in all_groups) == 5


def test_adamw_leaves_no_decay_group_untouched_by_decay():
    model = nn.Sequential(nn.BatchNorm1d(4))
    model[0].weight.data.fill_(2.0)
    opt = torch.optim.AdamW(build_param_groups(model, 0.5), lr=0.1, weight_decay=0.9)
    model[0].weight.grad = torch.zeros(4)
    model[0].bias.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(model[0].weight.data, torch.full((4,), 2.0))


def test_none_weight_decay_takes_the_optimizer_default():
    model = _model()
    opt = torch.optim.AdamW(build_param_groups(model, None), lr=0.1, weight_decay=0.3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
