"""``LegacyAuditStrategy``: the audit around a legacy ``flwr.server.strategy``.

Legacy apps, and secure aggregation (SecAgg / SecAgg+ workflows exist only on
this path in flwr 1.42), use ``aggregate_fit(server_round, results,
failures)``. The wrapper delegates every hook; in ``configure_fit`` it keeps
the global parameters and each client's fit config, in ``aggregate_fit`` it
reads the audit fields that :func:`fl_audit.client.audit_mod` put in each
result's metrics (``fl-audit.*`` keys), removes them, lets the inner
strategy aggregate, then audits.

Parameters travel as an ordered list of arrays; they are matched to
``model.state_dict()`` by position (the order ``state_dict().values()``
gives, as the usual legacy client sends them).

Under SecAgg+ every result carries the same aggregated parameters: the
audit then attacks the aggregate once and the report says
``aggregate_only``.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from torch import nn

from fl_audit._logging import logger
from fl_audit.attacks.base import Attack
from fl_audit.audit import (
    QUICK_DIGEST_BYTES,
    ClientUpdate,
    GroundTruth,
    LazyArrays,
    client_key,
    fingerprint_of,
    parse_metadata,
)
from fl_audit.client import LEGACY_PREFIX, TRUTH_KEY
from fl_audit.config import AuditConfig
from fl_audit.errors import ConfigError
from fl_audit.report import FailedReply, RoundReport
from fl_audit.strategies._common import (
    AuditSession,
    truth_from_arrays,
)

__all__ = ["LegacyAuditStrategy"]

FitResults = list[tuple[ClientProxy, FitRes]]
FitFailures = list[tuple[ClientProxy, FitRes] | BaseException]


class LegacyAuditStrategy(Strategy):
    """Audit every client update of a legacy (``aggregate_fit``) strategy.

    Parameters are those of :class:`~fl_audit.strategies.AuditStrategy`;
    ``strategy`` is a ``flwr.server.strategy.Strategy`` (``FedAvg``, ...).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        model: nn.Module,
        input_shape: Sequence[int],
        attacks: Sequence[str | Mapping[str, Any] | Attack] | None = None,
        config: AuditConfig | Mapping[str, Any] | str | Path | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise ConfigError(
                "LegacyAuditStrategy",
                [
                    f"strategy must be a flwr.server.strategy.Strategy, got "
                    f"{type(strategy).__name__}; for Message API strategies use "
                    "AuditStrategy"
                ],
            )
        self.strategy = strategy
        self._session = AuditSession(strategy, model, input_shape, config, attacks)
        self.config = self._session.config
        self.auditor = self._session.auditor
        self.reports: dict[int, RoundReport] = self._session.reports
        self._global: dict[int, list[np.ndarray]] = {}
        self._fit_config: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"LegacyAuditStrategy({self.strategy!r})"

    # ----------------------------------------------------------- delegation

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate, keeping the global parameters and the fit config."""
        instructions = self.strategy.configure_fit(
            server_round, parameters, client_manager
        )
        try:
            self._global = {server_round: parameters_to_ndarrays(parameters)}
            configs = [dict(ins.config) for _, ins in instructions]
            self._fit_config = {server_round: configs[0] if configs else {}}
        except Exception as exc:
            logger.warning(
                "fl-audit: round %d global parameters not kept: %s", server_round, exc
            )
        return instructions

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Strip the audit metrics, let the inner strategy aggregate, audit."""
        started = datetime.now(UTC)
        taken = [_take_audit_metrics(res) for _, res in results]

        aggregate = self.strategy.aggregate_fit(server_round, results, failures)

        try:
            global_arrays = self._global.get(server_round)
            if global_arrays is None:
                logger.warning(
                    "fl-audit: round %d has no global parameters (configure_fit was "
                    "not called through the LegacyAuditStrategy); not audited",
                    server_round,
                )
            else:
                self._session.defer(
                    server_round,
                    functools.partial(
                        self._audit,
                        server_round,
                        global_arrays,
                        self._fit_config.get(server_round, {}),
                        list(results),
                        taken,
                        list(failures),
                        started,
                    ),
                )
        except Exception:
            logger.exception(
                "fl-audit: the audit of round %d failed; training goes on", server_round
            )
        return aggregate

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Delegate."""
        return self.strategy.configure_evaluate(
            server_round, parameters, client_manager
        )

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Delegate."""
        return self.strategy.evaluate(server_round, parameters)

    # ----------------------------------------------------------------- audit

    def _audit(
        self,
        server_round: int,
        global_arrays: list[np.ndarray],
        fit_config: dict[str, Any],
        results: FitResults,
        taken: list[dict[str, Any]],
        failures: FitFailures,
        started: datetime,
    ) -> None:
        """Read the results and audit them (on the background thread if any)."""
        global_state = {str(i): a for i, a in enumerate(global_arrays)}

        updates = [
            _update(proxy, res, fields)
            for (proxy, res), fields in zip(results, taken, strict=True)
        ]
        failed = [_failure(f) for f in failures]
        self._session.submit(
            server_round,
            global_state,
            updates,
            train_config=fit_config,
            failed=failed,
            started=started,
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every round submitted so far is reported (bounded).

        Call it when the legacy server loop returns; ``final_wait_s`` of the
        config is a sensible bound.
        """
        return self._session.wait(timeout)


def _take_audit_metrics(res: FitRes) -> dict[str, Any]:
    """Remove and return the ``fl-audit.*`` entries of a result's metrics."""
    try:
        keys = [k for k in res.metrics if str(k).startswith(LEGACY_PREFIX)]
        return {k: res.metrics.pop(k) for k in keys}
    except Exception as exc:
        logger.warning("fl-audit: could not read a result's metrics: %s", exc)
        return {}


def _node_id(proxy: ClientProxy) -> int | None:
    for value in (getattr(proxy, "node_id", None), getattr(proxy, "cid", None)):
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    return None


def _update(proxy: ClientProxy, res: FitRes, fields: dict[str, Any]) -> ClientUpdate:
    node = _node_id(proxy)
    notes: list[str] = []
    raw_truth = fields.pop(TRUTH_KEY, None)
    meta_raw = {k[len(LEGACY_PREFIX) :]: v for k, v in fields.items()}
    metadata, meta_notes = parse_metadata(meta_raw or None)
    notes += meta_notes
    if metadata.num_examples is None and res.num_examples:
        metadata = metadata.model_copy(update={"num_examples": int(res.num_examples)})

    tensors = list(res.parameters.tensors)
    state = LazyArrays(
        {str(i): functools.partial(bytes_to_ndarray, t) for i, t in enumerate(tensors)},
        functools.partial(_digest, tensors),  # a partial, not a closure: it pickles
        quick=_digest(tensors, head=QUICK_DIGEST_BYTES),
    )

    truth: GroundTruth | None = None
    if isinstance(raw_truth, bytes):
        try:
            with np.load(io.BytesIO(raw_truth), allow_pickle=False) as data:
                truth, truth_notes = truth_from_arrays({k: data[k] for k in data.files})
            notes += truth_notes
        except (OSError, ValueError) as exc:
            notes.append(f"ground truth bytes unreadable: {exc}")
    return ClientUpdate(
        client=client_key(metadata.partition_id, node),
        node_id=node,
        client_state=state,
        metadata=metadata,
        metadata_from_client=bool(meta_raw),
        ground_truth=truth,
        notes=notes,
    )


def _digest(tensors: list[bytes], head: int | None = None) -> str:
    return fingerprint_of((str(i).encode() + t for i, t in enumerate(tensors)), head)


def _failure(failure: tuple[ClientProxy, FitRes] | BaseException) -> FailedReply:
    if isinstance(failure, BaseException):
        return FailedReply(node_id=None, reason=f"{type(failure).__name__}: {failure}")
    proxy, res = failure
    return FailedReply(node_id=_node_id(proxy), reason=str(res.status.message))
