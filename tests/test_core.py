"""AttackTarget / AttackResult: construction, checks, serialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_audit import AttackResult, AttackTarget, GradientError, InvalidInputError
from fl_audit.errors import ShapeError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3))


def test_from_update_forms_the_pseudo_gradient_by_name():
    # Arrange
    model = _model()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    client_state = {k: v - 0.5 * torch.ones_like(v) for k, v in global_state.items()}

    # Act
    target = AttackTarget.from_update(
        model, global_state, client_state, (1, 4, 4), lr=0.25, local_steps=3
    )

    # Assert: (global - client) / lr = 0.5 / 0.25 = 2 everywhere
    assert set(target.gradients) == {n for n, _ in model.named_parameters()}
    assert all(
        torch.allclose(g, torch.full_like(g, 2.0)) for g in target.gradients.values()
    )
    assert target.source == "update" and target.local_steps == 3
    assert target.model is not model  # a copy loaded with the global weights


def test_single_step_update_counts_as_a_gradient():
    model = _model()
    state = model.state_dict()
    target = AttackTarget.from_update(model, state, state, (16,), lr=0.1, local_steps=1)
    assert target.source == "gradient"


def test_update_with_missing_parameters_names_them():
    model = _model()
    state = dict(model.state_dict())
    partial = {k: v for k, v in state.items() if k != "3.bias"}

    with pytest.raises(
        GradientError, match=r"client_state lacks parameters \['3.bias'\]"
    ):
        AttackTarget.from_update(model, state, partial, (16,))


def test_unknown_gradient_names_are_listed():
    model = _model()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    grads["fc.weight"] = torch.zeros(2)

    with pytest.raises(GradientError, match="fc.weight"):
        AttackTarget.from_gradients(model, grads, (16,))


def test_metadata_problems_are_reported_together():
    model = _model()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}

    with pytest.raises(InvalidInputError) as err:
        AttackTarget.from_gradients(
            model, grads, (16,), batch_size=0, num_classes=1, input_range=(1.0, 0.0)
        )

    assert len(err.value.problems) == 3


@pytest.mark.parametrize("shape", [(), (0, 4), ("a",), None])
def test_bad_input_shapes_raise_shape_error(shape):
    model = _model()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ShapeError):
        AttackTarget.from_gradients(model, grads, shape)


def test_numpy_gradients_are_accepted():
    model = _model()
    grads = {n: p.detach().numpy() * 0 for n, p in model.named_parameters()}
    target = AttackTarget.from_gradients(model, grads, (16,))
    assert isinstance(target.gradients["1.weight"], torch.Tensor)


def test_result_round_trips_through_npz(tmp_path):
    # Arrange
    result = AttackResult(
        attack="analytic_fc",
        inputs=torch.rand(2, 1, 4, 4, dtype=torch.float64),
        certified=torch.tensor([True, False]),
        labels=torch.tensor([3, -1]),
        batch_size_estimate=2,
        residual=0.5,
        elapsed_s=0.1,
        notes=["one note"],
        certificates=["model", ""],
    )

    # Act
    loaded = AttackResult.load(result.save(tmp_path / "r.npz"))

    # Assert
    assert torch.equal(loaded.inputs, result.inputs)
    assert loaded.summary() == result.summary()
    assert loaded.num_certified == 1
