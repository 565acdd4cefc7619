"""LegacyAuditStrategy (``aggregate_fit``) with results built by hand."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, FedMedian

from fl_audit import ConfigError
from fl_audit.data import load_samples
from fl_audit.strategies import LegacyAuditStrategy
from tests.flower_fakes import mlp, sgd_step


class _Proxy(ClientProxy):
    def __init__(self, node: int) -> None:
        super().__init__(str(node))
        self.node_id = node

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError


class _Manager:
    """Just enough of a ClientManager for FedAvg.configure_fit."""

    def __init__(self, proxies):
        self.proxies = proxies

    def num_available(self):
        return len(self.proxies)

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return self.proxies[:num_clients]


def _params(state) -> Parameters:
    return ndarrays_to_parameters([np.asarray(v) for v in state.values()])


def _fit_res(state, examples: int, metrics: dict) -> FitRes:
    return FitRes(Status(Code.OK, ""), _params(state), examples, dict(metrics))


def _truth_bytes(x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, inputs=x.numpy())
    return buffer.getvalue()


@pytest.mark.parametrize("inner_cls", [FedAvg, FedMedian])
def test_legacy_aggregate_is_identical_and_audit_metrics_are_removed(
    tmp_path, inner_cls
):
    # Arrange: real digits, one SGD step per client; audit fields in metrics
    samples = load_samples("digits", 3, seed=4)
    model = mlp(64, 16, 10)
    proxies = [_Proxy(n) for n in (11, 12, 13)]
    audit = LegacyAuditStrategy(
        inner_cls(min_fit_clients=3, min_available_clients=3),
        model=model,
        input_shape=(1, 8, 8),
        config={"output_dir": tmp_path, "allow_ground_truth": True},
    )
    audit.configure_fit(1, _params(model.state_dict()), _Manager(proxies))

    def results(with_audit: bool):
        out = []
        for i, proxy in enumerate(proxies):
            x, y = samples.inputs[i : i + 1], samples.labels[i : i + 1]
            metrics = {"loss": 0.1 * i}
            if with_audit:
                metrics.update(
                    {
                        "fl-audit.partition-id": i,
                        "fl-audit.batch-size": 1,
                        "fl-audit.local-steps": 1,
                        "fl-audit.lr": 0.1,
                        "fl-audit.input-shape": "1,8,8",
                        "fl-audit.truth": _truth_bytes(x),
                    }
                )
            out.append((proxy, _fit_res(sgd_step(model, x, y, 0.1), 1, metrics)))
        return out

    audited, plain = results(True), results(False)

    # Act
    params_a, metrics_a = audit.aggregate_fit(1, audited, [])
    params_b, metrics_b = inner_cls().aggregate_fit(1, plain, [])

    # Assert: same parameters; audit keys gone from what the inner strategy saw
    assert params_a is not None and params_b is not None
    for a, b in zip(
        parameters_to_ndarrays(params_a), parameters_to_ndarrays(params_b), strict=True
    ):
        assert a.tobytes() == b.tobytes()
    assert metrics_a == metrics_b
    assert all(
        not any(k.startswith("fl-audit.") for k in res.metrics) for _, res in audited
    )

    # ... and each client's digit recovered exactly, scored on ground truth
    report = audit.reports[1]
    assert not report.aggregate_only
    for client in report.clients:
        (fc,) = client.attacks
        assert client.metadata_from_client and client.metadata.input_shape == [1, 8, 8]
        assert fc.certified == 1 and fc.ground_truth.min_certified_psnr >= 60.0


def test_secure_aggregation_results_are_audited_as_the_aggregate(tmp_path):
    # Arrange: SecAgg+ hands aggregate_fit the same parameters for every client
    samples = load_samples("digits", 4, seed=5)
    model = mlp(64, 16, 10)
    proxies = [_Proxy(n) for n in (1, 2, 3, 4)]
    audit = LegacyAuditStrategy(
        FedAvg(), model=model, input_shape=(1, 8, 8), config={"output_dir": tmp_path}
    )
    audit.configure_fit(2, _params(model.state_dict()), _Manager(proxies))
    aggregate = sgd_step(model, samples.inputs, samples.labels, 0.1)
    shared = _params(aggregate)
    results = [
        (p, FitRes(Status(Code.OK, ""), shared, 1, {"fl-audit.partition-id": i}))
        for i, p in enumerate(proxies)
    ]

    # Act
    audit.aggregate_fit(2, results, [])

    # Assert: one aggregate, said so; the rank of the aggregate reveals all 4
    report = audit.reports[2]
    assert report.aggregate_only
    assert any("secure aggregation" in n for n in report.notes)
    (client,) = report.clients
    assert client.client == "aggregate" and client.metadata.num_examples == 4
    assert client.attacks[0].batch_size_estimate == 4


def test_failures_are_listed(tmp_path):
    model = mlp()
    audit = LegacyAuditStrategy(
        FedAvg(), model=model, input_shape=(1, 8, 8), config={"output_dir": tmp_path}
    )
    audit.configure_fit(1, _params(model.state_dict()), _Manager([_Proxy(1)]))
    ok = (_Proxy(1), _fit_res(model.state_dict(), 3, {}))
    audit.aggregate_fit(1, [ok], [RuntimeError("timeout")])
    assert audit.reports[1].failed_replies[0].reason == "RuntimeError: timeout"


def test_legacy_wrapper_rejects_a_message_api_strategy():
    from flwr.serverapp.strategy import FedAvg as MessageFedAvg

    with pytest.raises(ConfigError, match="use AuditStrategy"):
        LegacyAuditStrategy(MessageFedAvg(), model=mlp(), input_shape=(1, 8, 8))  # type: ignore[arg-type]
