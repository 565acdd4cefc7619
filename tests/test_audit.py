"""The Auditor on its own: capacity bounds with a probe of real inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fl_audit.audit import Auditor, ClientUpdate
from fl_audit.config import AuditConfig
from fl_audit.data import Samples
from fl_audit.report import ClientMetadata


def _cnn() -> nn.Module:
    """Conv 5x5 stride 2 with 6 filters behind a ReLU, then a classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 14 * 14, 10),
    )


def _round(auditor: Auditor, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Audit one client's single SGD step on (x, y)."""
    client = copy.deepcopy(model)
    nn.functional.cross_entropy(client(x), y).backward()
    with torch.no_grad():
        for p in client.parameters():
            p -= 0.1 * p.grad
    state = {k: v.detach().numpy().copy() for k, v in client.state_dict().items()}
    update = ClientUpdate(
        client="partition-0",
        node_id=1,
        client_state=state,
        metadata=ClientMetadata(partition_id=0, batch_size=1, local_steps=1, lr=0.1),
        metadata_from_client=True,
    )
    start = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return auditor.audit_round(1, start, [update]).clients[0]


def _relu_verdict(client):
    assert client.capacity is not None
    return client.capacity.verdict("conv_exact_rank_relu")


def test_a_probe_kind_gives_the_relu_rank_in_the_round_report(
    tmp_path, fashion_mnist: Samples
):
    # Arrange
    model = _cnn()
    config = AuditConfig(
        output_dir=tmp_path,
        attacks=["conv_inversion"],
        probe={"kind": "fashion_mnist", "count": 3},
    )
    auditor = Auditor(model, (1, 28, 28), config)

    # Act
    client = _round(auditor, model, fashion_mnist.inputs[:1], fashion_mnist.labels[:1])

    # Assert: the bounds took three real garments; the risk follows them
    relu = _relu_verdict(client)
    assert relu.quantities["probes"] == 3
    assert len(relu.quantities["probe_ranks"]) == 3
    assert relu.holds is not None
    assert client.risk == client.capacity.risk
    assert "probe" in client.capacity.risk_reason
    probe = auditor.settings().probe
    assert probe is not None and (probe["kind"], probe["count"]) == ("fashion_mnist", 3)


def test_a_probe_file_is_read_and_its_first_count_inputs_used(
    tmp_path, fashion_mnist: Samples
):
    # Arrange: five garments saved as the clients feed them, two used
    path = tmp_path / "probe.npy"
    np.save(path, fashion_mnist.inputs[:5].numpy())
    model = _cnn()
    config = AuditConfig(
        output_dir=tmp_path / "run",
        attacks=["conv_inversion"],
        probe={"path": str(path), "count": 2},
    )

    # Act
    client = _round(
        Auditor(model, (1, 28, 28), config),
        model,
        fashion_mnist.inputs[5:6],
        fashion_mnist.labels[5:6],
    )

    # Assert
    assert _relu_verdict(client).quantities["probes"] == 2


def test_a_probe_that_does_not_fit_is_a_note_and_the_bounds_go_on(
    tmp_path, fashion_mnist: Samples
):
    # Arrange: 3-channel photos for a 1-channel model
    model = _cnn()
    config = AuditConfig(
        output_dir=tmp_path, attacks=["conv_inversion"], probe={"kind": "photos"}
    )
    auditor = Auditor(model, (1, 28, 28), config)

    # Act
    client = _round(auditor, model, fashion_mnist.inputs[:1], fashion_mnist.labels[:1])

    # Assert: bounds without the probe, and the note says why
    assert client.capacity is not None
    assert "conv_exact_rank" in [v.name for v in client.capacity.verdicts]
    assert "conv_exact_rank_relu" not in [v.name for v in client.capacity.verdicts]
    (note,) = [n for n in client.notes if "probe not loaded" in n]
    assert "3 channel(s), the model takes 1" in note


@pytest.mark.parametrize(
    ("probe", "fragment"),
    [
        ({"kind": "mnist"}, "no sample kind 'mnist'"),
        ({"kind": "ecg", "path": "x.npy"}, "exactly one"),
        ({}, "exactly one"),
        ({"kind": "ecg", "count": 0}, "greater than or equal to 1"),
        ({"kind": "ecg", "size": 3}, "unknown key"),
    ],
)
def test_bad_probe_settings_are_refused_with_their_key(probe: dict, fragment: str):
    from fl_audit.errors import ConfigError

    with pytest.raises(ConfigError, match="probe") as info:
        AuditConfig.from_mapping({"probe": probe})
    assert fragment in str(info.value)
