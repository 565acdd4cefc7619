"""``AuditStrategy``: the audit as a wrapper around a Message API strategy.

The wrapper holds the inner strategy and delegates every hook to it, the way
Flower's own DP wrappers do, with two additions:

* ``configure_train`` keeps a copy of the global arrays and the train config
  the server sends (the learning rate among them);
* ``aggregate_train`` materialises the replies once, takes each client's
  arrays and audit records (:mod:`fl_audit.client`), removes the audit
  records, hands the replies to the inner strategy unchanged otherwise, and
  audits the updates (:class:`fl_audit.audit.Auditor`).

The aggregate is the inner strategy's, bit for bit: the replies it sees are
what clients without the audit mod would have sent. Nothing the audit does
can fail the round; a broken audit is logged and training goes on.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
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
from fl_audit.client import META_KEY, TRUTH_KEY
from fl_audit.config import AuditConfig
from fl_audit.errors import ConfigError
from fl_audit.report import FailedReply, RoundReport
from fl_audit.strategies._common import (
    AuditSession,
    truth_from_arrays,
)

__all__ = ["AuditStrategy"]


class AuditStrategy(Strategy):
    """Audit every client update of a Message API strategy, round by round.

    Parameters
    ----------
    strategy:
        The strategy to wrap (``FedAvg``, ``FedProx``, a DP wrapper, ...).
    model:
        The model being trained (architecture; weights are taken from each
        round's global arrays).
    input_shape:
        Shape of one input without the batch dimension, e.g. ``(1, 28, 28)``.
    attacks:
        Registry names, ``{"name": ..., "options": {...}}`` entries or
        :class:`~fl_audit.attacks.Attack` instances; overrides
        ``config.attacks``.
    config:
        An :class:`~fl_audit.AuditConfig`, a mapping of its fields, or the
        path of a YAML file.

    Raises
    ------
    ConfigError
        If the config or an attack is invalid (every problem at once).
    InvalidInputError
        If the output folder cannot be written (before the first round).

    Notes
    -----
    Inline (the default backend) the audit runs after the inner strategy has
    aggregated, so a round takes longer by the attacks' time and the report
    of round ``r`` is complete when ``aggregate_train`` returns. With the
    process or Ray backend rounds are audited in the background and
    :meth:`start` waits (bounded) for the last ones. Client arrays are matched to
    ``model.state_dict()`` by name, or by position when the keys differ.
    Secure aggregation is not available on the Message API in flwr 1.42; if
    every reply carries the same arrays, the audit treats them as one
    aggregate and says so.
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
                "AuditStrategy",
                [
                    f"strategy must be a flwr.serverapp.strategy.Strategy, got "
                    f"{type(strategy).__name__}; for flwr.server.strategy "
                    "strategies use LegacyAuditStrategy"
                ],
            )
        self.strategy = strategy
        self._session = AuditSession(strategy, model, input_shape, config, attacks)
        self.config = self._session.config
        self.auditor = self._session.auditor
        self.reports: dict[int, RoundReport] = self._session.reports
        self._global: dict[int, dict[str, np.ndarray]] = {}
        self._train_config: dict[int, dict[str, Any]] = {}

    # ----------------------------------------------------------- delegation

    def summary(self) -> None:
        """Log the inner strategy's summary and the audit's settings."""
        self.strategy.summary()
        logger.info(
            "fl-audit: attacks %s, reports in %s",
            [a.name for a in self.auditor.attacks],
            self.config.output_dir,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, keeping the global arrays and the train config."""
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        try:
            self._global = {server_round: {k: v.numpy() for k, v in arrays.items()}}
            self._train_config = {server_round: dict(config)}
        except Exception as exc:
            logger.warning(
                "fl-audit: round %d global arrays not kept: %s", server_round, exc
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Strip the audit records, let the inner strategy aggregate, audit."""
        started = datetime.now(UTC)
        replies = list(replies)
        taken = [_take_audit_records(msg) for msg in replies]

        aggregate = self.strategy.aggregate_train(server_round, replies)

        try:
            global_state = self._global.get(server_round)
            if global_state is None:
                logger.warning(
                    "fl-audit: round %d has no global arrays (configure_train was "
                    "not called through the AuditStrategy); not audited",
                    server_round,
                )
            else:
                train_config = self._train_config.get(server_round, {})
                self._session.defer(
                    server_round,
                    functools.partial(
                        self._audit,
                        server_round,
                        global_state,
                        train_config,
                        replies,
                        taken,
                        started,
                    ),
                )
        except Exception:
            logger.exception(
                "fl-audit: the audit of round %d failed; training goes on", server_round
            )
        return aggregate

    def start(
        self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any
    ) -> Result:
        """Run the rounds (Flower's loop), then wait for audits still running.

        With a background audit the wait is bounded by ``final_wait_s``;
        rounds still unfinished then are logged and their reports missing.
        """
        try:
            return super().start(grid, initial_arrays, *args, **kwargs)
        finally:
            self.wait(self.config.final_wait_s)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every round submitted so far is reported (bounded)."""
        return self._session.wait(timeout)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    # ----------------------------------------------------------------- audit

    def _audit(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        train_config: Mapping[str, Any],
        replies: list[Message],
        taken: list[tuple[Any, Any]],
        started: datetime,
    ) -> None:
        """Read the replies and audit them (on the background thread if any)."""
        updates: list[ClientUpdate] = []
        failed: list[FailedReply] = []
        for msg, (meta_raw, truth_raw) in zip(replies, taken, strict=True):
            node = _node_id(msg)
            if msg.has_error():
                failed.append(FailedReply(node_id=node, reason=str(msg.error.reason)))
                continue
            updates.append(_update(msg, node, meta_raw, truth_raw))

        self._session.submit(
            server_round,
            global_state,
            updates,
            train_config=train_config,
            failed=failed,
            started=started,
        )


def _take_audit_records(msg: Message) -> tuple[Any, Any]:
    """Remove and return this reply's audit records (metadata, ground truth)."""
    if msg.has_error():
        return None, None
    try:
        content = msg.content
        meta = content.pop(META_KEY, None)
        truth = content.pop(TRUTH_KEY, None)
    except Exception as exc:  # a malformed reply is the inner strategy's to judge
        logger.warning("fl-audit: could not read a reply's records: %s", exc)
        return None, None
    return meta, truth


def _lazy(record: ArrayRecord) -> LazyArrays:
    """The record's arrays, decoded only when the client's audit needs them."""
    arrays = dict(record.items())
    return LazyArrays(
        {k: functools.partial(_decode, a) for k, a in arrays.items()},
        functools.partial(_digest, arrays),  # a partial, not a closure: it pickles
        quick=_digest(arrays, head=QUICK_DIGEST_BYTES),
    )


def _digest(arrays: Mapping[str, Array], head: int | None = None) -> str:
    return fingerprint_of((k.encode() + a.data for k, a in arrays.items()), head)


def _decode(array: Array) -> np.ndarray:
    return array.numpy()


def _node_id(msg: Message) -> int | None:
    try:
        return int(msg.metadata.src_node_id)
    except Exception:
        return None


def _update(
    msg: Message, node: int | None, meta_raw: Any, truth_raw: Any
) -> ClientUpdate:
    notes: list[str] = []
    meta_from_client = isinstance(meta_raw, ConfigRecord)
    if meta_raw is not None and not meta_from_client:
        notes.append(f"audit metadata record of type {type(meta_raw).__name__} ignored")
    metadata, meta_notes = parse_metadata(dict(meta_raw) if meta_from_client else None)
    notes += meta_notes

    if metadata.num_examples is None:
        for record in msg.content.metric_records.values():
            value = record.get("num-examples")
            if isinstance(value, int) and value >= 0:
                metadata = metadata.model_copy(update={"num_examples": value})
                break

    records = list(msg.content.array_records.items())
    state: Mapping[str, np.ndarray] = {}
    if len(records) > 1:
        notes.append(
            f"the reply holds {len(records)} ArrayRecords {[k for k, _ in records]}; "
            f"the first, {records[0][0]!r}, is audited"
        )
    if records:
        state = _lazy(records[0][1])
    else:
        notes.append("the reply holds no ArrayRecord: there is no update to audit")

    truth: GroundTruth | None = None
    if isinstance(truth_raw, ArrayRecord):
        truth, truth_notes = truth_from_arrays(
            {k: v.numpy() for k, v in truth_raw.items()}
        )
        notes += truth_notes
    return ClientUpdate(
        client=client_key(metadata.partition_id, node),
        node_id=node,
        client_state=state,
        metadata=metadata,
        metadata_from_client=meta_from_client,
        ground_truth=truth,
        notes=notes,
    )
