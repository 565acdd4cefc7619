"""The audit core: one client's update in, one :class:`ClientAudit` out.

Framework-neutral (no Flower import): the Flower strategies in
:mod:`fl_audit.strategies` turn replies into :class:`ClientUpdate` objects and
hand them to an :class:`Auditor`; offline replay does the same from files.

Per client the auditor

1. forms the pseudo-gradient ``(global - client) / lr`` as an
   :class:`~fl_audit.core.AttackTarget` at the global weights;
2. checks the model's first layer against the capacity bounds
   (:func:`fl_audit.bounds.analyze`) with the client's batch size and the
   number of distinct examples of its round;
3. runs every configured attack that applies; an attack that raises is
   reported as ``failed`` with the reason, never raised;
4. scores the reconstructions against ground truth, when the client sent it
   and the config allows it (simulation only);
5. saves the reconstructions (and the ground truth, when allowed) next to
   the round report;
6. evaluates the audit policy (:mod:`fl_audit.policy`) on each client-round
   and on the round, and stores the verdicts in the round report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from fl_audit import __version__
from fl_audit._logging import logger
from fl_audit.attacks.base import Attack
from fl_audit.attacks.registry import create_attack
from fl_audit.bounds import CapacityReport, analyze
from fl_audit.config import AttackSpec, AuditConfig
from fl_audit.core import AttackResult, AttackTarget
from fl_audit.errors import ConfigError, FLAuditError, GradientError
from fl_audit.layers import check_input_shape
from fl_audit.metrics import match_inputs
from fl_audit.policy import apply_policy, load_policy
from fl_audit.report import (
    AttackOutcome,
    ClientAudit,
    ClientMetadata,
    FailedReply,
    GroundTruthScore,
    ReportWriter,
    RoundReport,
    RunSettings,
    SkippedClient,
    UpdateKind,
    dumps_scalar_config,
)

__all__ = [
    "Auditor",
    "ClientUpdate",
    "GroundTruth",
    "client_key",
    "match_state",
    "parse_metadata",
]

LR_KEYS = ("lr", "learning-rate", "learning_rate")
"""Keys of the train config read as the clients' learning rate."""


@dataclass
class GroundTruth:
    """The inputs (and labels) a client trained on; simulation only."""

    inputs: torch.Tensor  # (n, *input_shape)
    labels: torch.Tensor | None = None  # (n,)


@dataclass
class ClientUpdate:
    """One client's model after local training, with what it said about it.

    ``client_state`` holds the client's arrays keyed like
    ``model.state_dict()`` (see :func:`match_state`).
    """

    client: str
    node_id: int | None
    client_state: Mapping[str, np.ndarray]
    metadata: ClientMetadata = field(default_factory=ClientMetadata)
    metadata_from_client: bool = False
    ground_truth: GroundTruth | None = None
    kind: UpdateKind = "update"
    notes: list[str] = field(default_factory=list)

    @property
    def partition_id(self) -> int | None:
        return self.metadata.partition_id


def client_key(partition_id: int | None, node_id: int | None) -> str:
    """``partition-3`` when the partition is known, else ``node-<id>``."""
    if partition_id is not None:
        return f"partition-{partition_id}"
    return f"node-{node_id}" if node_id is not None else "client"


def parse_metadata(raw: Mapping[str, Any] | None) -> tuple[ClientMetadata, list[str]]:
    """Read a client's metadata leniently: bad fields are dropped with a note.

    Keys may use dashes or underscores (``batch-size``, ``batch_size``).
    A malformed record never stops the audit; the notes say what was ignored.
    """
    if not raw:
        return ClientMetadata(), []
    data = {str(k).replace("-", "_"): v for k, v in raw.items()}
    known = set(ClientMetadata.model_fields)
    notes = [
        f"metadata key {k!r} is not known and was ignored"
        for k in data
        if k not in known
    ]
    kept = {k: v for k, v in data.items() if k in known}
    for key in ("input_shape", "input_range"):
        if isinstance(kept.get(key), str):
            kept[key] = [s for s in str(kept[key]).replace("x", ",").split(",") if s]
    while True:
        try:
            return ClientMetadata.model_validate(kept), notes
        except ValidationError as exc:
            bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
            for err in exc.errors():
                if err["loc"]:
                    notes.append(
                        f"metadata {err['loc'][0]}={err.get('input')!r} ignored: "
                        f"{err['msg']}"
                    )
            if not bad & set(kept):
                return ClientMetadata(), [*notes, "metadata ignored as a whole"]
            kept = {k: v for k, v in kept.items() if k not in bad}


def match_state(
    model: nn.Module, arrays: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Key ``arrays`` like ``model.state_dict()``.

    Arrays keyed by the state dict's names are used as they are. Arrays with
    other keys (e.g. ``"0"``, ``"1"``, ... from a list of NumPy arrays, the
    legacy API's order) are matched by position when their number and shapes
    agree with the state dict. Anything else raises
    :class:`~fl_audit.errors.GradientError` listing the mismatches.
    """
    state = model.state_dict()
    params = [n for n, _ in model.named_parameters()]
    if all(n in arrays for n in params):
        return dict(arrays), []
    values = list(arrays.values())
    shapes_agree = len(values) == len(state) and all(
        tuple(np.shape(v)) == tuple(t.shape)
        for v, t in zip(values, state.values(), strict=True)
    )
    if shapes_agree:
        note = "arrays matched to the model's state dict by position (keys differ)"
        return dict(zip(state, values, strict=True)), [note]
    missing = [n for n in params if n not in arrays][:8]
    raise GradientError(
        "client arrays",
        [
            f"{len(values)} arrays with keys {list(arrays)[:6]} match neither the "
            f"model's parameter names (missing {missing}) nor its state dict "
            f"({len(state)} entries) by position; send "
            "ArrayRecord(model.state_dict())"
        ],
    )


class Auditor:
    """Audits client updates against one model architecture.

    Parameters
    ----------
    model:
        The architecture being trained; its weights are replaced by each
        round's global weights (on a private copy).
    input_shape:
        Shape of one input without the batch dimension.
    config:
        The audit configuration.
    attacks:
        Attack instances to use instead of building ``config.attacks`` from
        the registry.

    Raises
    ------
    ConfigError
        If an attack cannot be built from its options, or the policy file
        is unreadable or invalid.
    InvalidInputError
        If ``config.output_dir`` cannot be written.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        config: AuditConfig,
        *,
        attacks: Sequence[Attack] | None = None,
        strategy_name: str = "",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(
                "Auditor", [f"model must be a torch.nn.Module, got {type(model)}"]
            )
        self.model = model
        self.input_shape = check_input_shape(input_shape)
        self.config = config
        self.strategy_name = strategy_name
        self.attacks = list(attacks) if attacks is not None else _build(config.attacks)
        self.policy = load_policy(config.policy)
        self.writer = ReportWriter(config.output_dir)
        self.writer.write_policy(self.policy.model_dump_json(indent=2))
        self._bounds: dict[tuple[int, int | None, int | None], CapacityReport] = {}

    def settings(self, train_config: Mapping[str, Any] | None = None) -> RunSettings:
        return RunSettings(
            fl_audit_version=__version__,
            model=type(self.model).__name__,
            input_shape=list(self.input_shape),
            strategy=self.strategy_name,
            attacks=[
                {"name": a.name, "options": _options(a, self.config)}
                for a in self.attacks
            ],
            simulation=self.config.simulation,
            allow_ground_truth=self.config.allow_ground_truth,
            train_config=dumps_scalar_config(dict(train_config or {})),
        )

    # --------------------------------------------------------------- a round

    def audit_round(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        *,
        train_config: Mapping[str, Any] | None = None,
        failed: Sequence[FailedReply] = (),
        aggregate_only: bool = False,
        started_at: datetime | None = None,
        notes: Sequence[str] = (),
    ) -> RoundReport:
        """Audit the selected updates of a round and write its report."""
        started_at = started_at or datetime.now(UTC)
        train_config = dict(train_config or {})
        chosen, reasons = self.config.clients.select(
            server_round, [(u.client, u.partition_id) for u in updates]
        )
        audited = [u for u in updates if u.client in set(chosen)]
        skipped = [
            SkippedClient(
                client=u.client,
                node_id=u.node_id,
                partition_id=u.partition_id,
                reason=reasons[u.client],
            )
            for u in updates
            if u.client in reasons
        ]
        logger.info(
            "fl-audit round %d: auditing %d of %d client(s)%s",
            server_round,
            len(audited),
            len(updates),
            " (aggregate only: secure aggregation)" if aggregate_only else "",
        )

        clients = [
            self.audit_client(server_round, global_state, u, train_config)
            for u in audited
        ]
        report = RoundReport(
            round=server_round,
            started_at=started_at,
            finished_at=datetime.now(UTC),
            settings=self.settings(train_config),
            aggregate_only=aggregate_only,
            clients=clients,
            skipped=skipped,
            failed_replies=list(failed),
            notes=list(notes),
        )
        report = self._judge(report)
        path = self.writer.write_round(report)
        logger.debug("fl-audit round %d: report %s", server_round, path)
        return report

    def _judge(self, report: RoundReport) -> RoundReport:
        """The report with the policy's verdicts; unchanged if that fails."""
        try:
            judged = apply_policy(self.policy, report)
        except Exception as exc:  # a verdict must never stop the round
            logger.warning(
                "fl-audit round %d: policy not evaluated: %s: %s",
                report.round,
                type(exc).__name__,
                exc,
            )
            return report
        assert judged.verdict is not None
        logger.info(
            "fl-audit round %d: policy %r verdict %s",
            report.round,
            self.policy.name,
            judged.verdict.status.upper(),
        )
        return judged

    # -------------------------------------------------------------- a client

    def audit_client(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        update: ClientUpdate,
        train_config: Mapping[str, Any] | None = None,
    ) -> ClientAudit:
        """Bounds, attacks and scores for one client; never raises."""
        start = time.perf_counter()
        meta = update.metadata
        notes = list(update.notes)
        lr = meta.lr or _lr_from(train_config or {})
        if meta.lr is None and lr is not None:
            notes.append(f"learning rate {lr:g} taken from the server's train config")
        if meta.weight_decay:
            notes.append(
                f"weight decay {meta.weight_decay:g}: the update holds a term outside "
                "the span of the inputs, so ratios are not exact"
            )
        if meta.input_shape and tuple(meta.input_shape) != self.input_shape:
            notes.append(
                f"the client reports input shape {tuple(meta.input_shape)}, the "
                f"audit uses {self.input_shape}"
            )
        truth = update.ground_truth if self.config.allow_ground_truth else None
        if update.ground_truth is not None and truth is None:
            notes.append(
                "the client sent ground truth; allow_ground_truth is off, so it "
                "was discarded unused"
            )

        try:
            target = self._target(global_state, update, lr)
        except (FLAuditError, RuntimeError, ValueError, TypeError) as exc:
            reason = f"the update cannot be audited: {exc}"
            logger.warning("fl-audit round %d %s: %s", server_round, update.client, exc)
            return self._client(
                update, None, [], notes + [reason], False, time.perf_counter() - start
            )

        capacity = self._capacity(server_round, target.model, meta, update.kind, notes)
        outcomes = [
            self._attack(server_round, attack, target, update.client, truth)
            for attack in self.attacks
        ]
        audit = self._client(
            update,
            capacity,
            outcomes,
            notes,
            truth is not None,
            time.perf_counter() - start,
        )
        if truth is not None and self.config.save_reconstructions:
            audit.ground_truth_file = self._save_truth(server_round, update, truth)
        _log_client(server_round, audit)
        return audit

    def _target(
        self,
        global_state: Mapping[str, np.ndarray],
        update: ClientUpdate,
        lr: float | None,
    ) -> AttackTarget:
        meta = update.metadata
        global_keyed, _ = match_state(self.model, global_state)
        client_keyed, state_notes = match_state(self.model, update.client_state)
        update.notes.extend(state_notes)
        input_range = meta.input_range or self.config.input_range
        steps = None if update.kind == "aggregate" else meta.local_steps
        return AttackTarget.from_update(
            self.model,
            global_keyed,
            client_keyed,
            self.input_shape,
            lr=lr,
            local_steps=steps,
            input_range=input_range,
            batch_size=None if update.kind == "aggregate" else meta.batch_size,
            num_classes=self.config.num_classes,
        )

    def _capacity(
        self,
        server_round: int,
        model: nn.Module,
        meta: ClientMetadata,
        kind: UpdateKind,
        notes: list[str],
    ) -> CapacityReport | None:
        batch, examples = _counts(meta, kind)
        # Every client of a round starts from the same global weights.
        key = (server_round, batch, examples)
        if any(k[0] != server_round for k in self._bounds):
            self._bounds.clear()
        if key not in self._bounds:
            try:
                self._bounds[key] = analyze(
                    model, self.input_shape, batch_size=batch, local_examples=examples
                )
            except FLAuditError as exc:
                notes.append(f"capacity bounds not computed: {exc}")
                return None
        return self._bounds[key]

    def _attack(
        self,
        server_round: int,
        attack: Attack,
        target: AttackTarget,
        client: str,
        truth: GroundTruth | None,
    ) -> AttackOutcome:
        options = _options(attack, self.config)
        try:
            verdict = attack.applicability(target)
        except Exception as exc:  # a plugin's bug must not stop the audit
            return AttackOutcome(
                attack=attack.name,
                options=options,
                status="failed",
                reason=f"applicability check raised {type(exc).__name__}: {exc}",
            )
        if not verdict:
            return AttackOutcome(
                attack=attack.name,
                options=options,
                status="not_applicable",
                reason=verdict.reason,
            )

        start = time.perf_counter()
        try:
            result = attack.run(target)
        except Exception as exc:
            logger.warning(
                "fl-audit round %d %s: attack %s failed: %s: %s",
                server_round,
                client,
                attack.name,
                type(exc).__name__,
                exc,
            )
            return AttackOutcome(
                attack=attack.name,
                options=options,
                status="failed",
                reason=f"{type(exc).__name__}: {exc}",
                elapsed_s=time.perf_counter() - start,
            )

        outcome = AttackOutcome.from_result(result, options)
        if not torch.isfinite(result.inputs).all():
            outcome.notes.append("some recovered values are NaN/Inf")
        if truth is not None:
            outcome.ground_truth = _score(result, truth, target.input_range)
        if self.config.save_reconstructions and result.num_recovered:
            try:
                outcome.reconstruction_file = self.writer.save_reconstruction(
                    server_round, client, result
                )
            except OSError as exc:
                outcome.notes.append(f"reconstructions not saved: {exc}")
        return outcome

    def _save_truth(
        self, server_round: int, update: ClientUpdate, truth: GroundTruth
    ) -> str | None:
        labels = None if truth.labels is None else truth.labels.detach().cpu().numpy()
        try:
            return self.writer.save_ground_truth(
                server_round,
                update.client,
                truth.inputs.detach().cpu().numpy(),
                labels,
            )
        except OSError as exc:
            logger.warning(
                "fl-audit round %d %s: ground truth not saved: %s",
                server_round,
                update.client,
                exc,
            )
            return None

    @staticmethod
    def _client(
        update: ClientUpdate,
        capacity: CapacityReport | None,
        outcomes: list[AttackOutcome],
        notes: list[str],
        truth_used: bool,
        elapsed: float,
    ) -> ClientAudit:
        if not update.metadata_from_client:
            notes.append(
                "no audit metadata from this client (fl_audit.client.audit_mod "
                "not installed?): batch size, steps and learning rate unknown"
            )
        return ClientAudit(
            client=update.client,
            node_id=update.node_id,
            partition_id=update.partition_id,
            update_kind=update.kind,
            metadata=update.metadata,
            metadata_from_client=update.metadata_from_client,
            capacity=capacity,
            risk=None if capacity is None else capacity.risk,
            attacks=outcomes,
            ground_truth_used=truth_used,
            notes=_unique(notes + update.notes),
            elapsed_s=round(elapsed, 6),
        )


def _build(specs: Sequence[AttackSpec]) -> list[Attack]:
    attacks, problems = [], []
    for i, spec in enumerate(specs):
        try:
            attacks.append(create_attack(spec.name, **spec.options))
        except (FLAuditError, TypeError, ValueError) as exc:
            problems.append(f"attacks.{i} ({spec.name}): {exc}")
    if problems:
        raise ConfigError("audit attacks", problems)
    return attacks


def _options(attack: Attack, config: AuditConfig) -> dict[str, Any]:
    for spec in config.attacks:
        if spec.name == attack.name:
            return dict(spec.options)
    return {}


def _lr_from(train_config: Mapping[str, Any]) -> float | None:
    for key in LR_KEYS:
        value = train_config.get(key)
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        ):
            return float(value)
    return None


def _counts(meta: ClientMetadata, kind: UpdateKind) -> tuple[int | None, int | None]:
    """Batch size B and distinct examples N of the round, as the bounds take them."""
    if kind == "aggregate":
        return None, meta.num_examples or None
    batch, n, steps = meta.batch_size, meta.num_examples, meta.local_steps
    if batch is not None and n is not None and 0 < n < batch:
        batch = n  # the only batch is smaller than the configured size
    if steps is None or steps == 1:
        return batch, None
    if batch is not None:
        examples = batch * steps if not n else min(n, batch * steps)
    else:
        examples = n or None
    if examples is not None and batch is not None and examples < batch:
        examples = batch
    return batch, examples


def _score(
    result: AttackResult,
    truth: GroundTruth,
    input_range: tuple[float, float] | None,
) -> GroundTruthScore | None:
    x = truth.inputs
    try:
        x = x.reshape(x.shape[0], *result.inputs.shape[1:])
        span = input_range[1] - input_range[0] if input_range else None
        report = match_inputs(result.inputs, x, data_range=span)
    except (FLAuditError, RuntimeError, ValueError) as exc:
        logger.warning("fl-audit: ground truth could not be scored: %s", exc)
        return None
    psnrs = [s.psnr for s in report.scores]
    certified = [
        s.psnr
        for s in report.scores
        if s.recon_index is not None and bool(result.certified[s.recon_index])
    ]
    labels_correct = None
    if truth.labels is not None and result.labels is not None:
        labels_correct = sum(
            s.recon_index is not None
            and s.psnr >= 30.0
            and int(result.labels[s.recon_index]) == int(truth.labels[s.truth_index])
            for s in report.scores
        )
    return GroundTruthScore(
        num_true=len(report.scores),
        data_range=report.data_range,
        recovered_30db=report.recovered(30.0),
        recovered_60db=report.recovered(60.0),
        median_psnr=_finite(report.median_psnr),
        max_psnr=_finite(max(psnrs)) if psnrs else 0.0,
        psnr=[_finite(p) for p in psnrs],
        ssim=[s.ssim for s in report.scores],
        correlation=[s.correlation for s in report.scores],
        min_certified_psnr=_finite(min(certified)) if certified else None,
        labels_correct=labels_correct,
    )


PSNR_CAP = 400.0
"""PSNR reported for an exact match (JSON has no infinity)."""


def _finite(value: float) -> float:
    return PSNR_CAP if not math.isfinite(value) else min(float(value), PSNR_CAP)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _log_client(server_round: int, audit: ClientAudit) -> None:
    parts = []
    for a in audit.attacks:
        if a.status == "completed":
            text = f"{a.attack} recovered {a.recovered} ({a.certified} certified)"
            if a.ground_truth is not None:
                text += f", best {a.ground_truth.max_psnr:.0f} dB"
        else:
            text = f"{a.attack} {a.status.replace('_', ' ')}"
        parts.append(text)
    logger.info(
        "fl-audit round %d %s: risk %s; %s",
        server_round,
        audit.client,
        audit.risk or "unknown",
        "; ".join(parts) or "no attack configured",
    )
