"""First-layer discovery on real torch modules."""

from __future__ import annotations

import torch
from torch import nn

from fl_audit.layers import find_first_layer


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) / 255.0)


def test_linear_after_flatten():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))
    layer = find_first_layer(model, (1, 4, 4))
    assert (layer.kind, layer.path, layer.in_shape) == ("linear", "1", (16,))
    assert (layer.weight_name, layer.bias_name) == ("1.weight", "1.bias")


def test_conv_layers_and_no_bias():
    conv2 = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Flatten())
    conv1 = nn.Sequential(nn.Conv1d(1, 4, 5), nn.Flatten())
    assert find_first_layer(conv2, (3, 8, 8)).kind == "conv2d"
    assert not find_first_layer(conv2, (3, 8, 8)).has_bias
    assert find_first_layer(conv1, (1, 32)).kind == "conv1d"


def test_unsupported_first_layers_name_the_module():
    bn_first = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3))
    layer = find_first_layer(bn_first, (1, 8, 8))
    assert layer.kind == "unsupported" and "BatchNorm2d" in layer.reason

    emb = nn.Sequential(nn.Embedding(10, 4))
    assert "Embedding" in find_first_layer(emb, (5,)).reason


def test_transformed_input_is_reported():
    layer = find_first_layer(Scaled(), (16,))
    assert layer.kind == "unsupported" and "transformed" in layer.reason


def test_model_state_is_left_as_it_was():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4))
    model.train()
    before = model[2].running_mean.clone()
    find_first_layer(model, (16,))
    assert model.training and torch.equal(model[2].running_mean, before)


def test_find_first_layer_keeps_each_submodule_mode():
    # Arrange: a model in train mode with a frozen (eval-mode) BatchNorm inside
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2).eval(), nn.ReLU())

    # Act
    find_first_layer(model, (1, 8, 8))

    # Assert
    assert model.training and model[0].training
    assert not model[1].training
