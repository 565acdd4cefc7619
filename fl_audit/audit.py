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

import hashlib
import math
import pickle
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
from fl_audit.config import AttackSpec, AuditConfig, ProbeSpec
from fl_audit.core import AttackResult, AttackTarget
from fl_audit.data import load_numpy, probe_inputs
from fl_audit.errors import (
    ConfigError,
    FLAuditError,
    GradientError,
    InvalidInputError,
    ShapeError,
)
from fl_audit.layers import check_input_shape
from fl_audit.metrics import match_inputs
from fl_audit.policy import apply_policy, load_policy
from fl_audit.report import (
    AttackOutcome,
    ClientAudit,
    ClientMetadata,
    FailedReply,
    GroundTruthScore,
    PrivacySettings,
    ReportWriter,
    RoundReport,
    RunSettings,
    SkippedClient,
    UpdateKind,
    dumps_scalar_config,
)
from fl_audit.runtime import (
    AttackJob,
    JobOutcome,
    JobRunner,
    limited_threads,
    make_runner,
)

__all__ = [
    "Auditor",
    "ClientJob",
    "ClientUpdate",
    "GroundTruth",
    "LazyArrays",
    "QUICK_DIGEST_BYTES",
    "fingerprint_of",
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


class LazyArrays(Mapping[str, np.ndarray]):
    """Arrays read only when looked up, e.g. from a reply's serialised record.

    The audit of a round holds the replies' own bytes, not decoded copies,
    until a client's turn comes; ``fingerprint`` identifies the content
    without decoding it.
    """

    def __init__(
        self,
        loaders: Mapping[str, Callable[[], np.ndarray]],
        fingerprint: str | Callable[[], str],
        quick: str | None = None,
    ) -> None:
        self._loaders = dict(loaders)
        self._fingerprint = fingerprint
        self.quick = quick

    @property
    def fingerprint(self) -> str:
        """Digest of the whole content, computed on first use."""
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        return self._fingerprint

    def __getitem__(self, key: str) -> np.ndarray:
        return self._loaders[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


QUICK_DIGEST_BYTES = 4096
"""Bytes per array a quick digest reads: enough to tell clients' updates apart."""


def fingerprint_of(chunks: Iterable[bytes], head: int | None = None) -> str:
    """A digest of serialised arrays, for telling identical updates apart.

    With ``head``, only each chunk's length and first ``head`` bytes are
    hashed: a cheap test that tells most different updates apart, where
    equal quick digests still need the full one.
    """
    digest = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk if head is None else chunk[:head])
    return digest.hexdigest()


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


@dataclass
class _Prepared:
    """A client's update made ready for its attacks."""

    update: ClientUpdate
    target: AttackTarget | None
    capacity: CapacityReport | None
    truth: GroundTruth | None
    notes: list[str]
    start: float
    update_norm: float | None = None
    noise_to_update: float | None = None


def _applicability(
    attack: Attack, target: AttackTarget, config: AuditConfig
) -> AttackOutcome | None:
    """An outcome when the attack does not apply (or its check fails), else None."""
    options = _options(attack, config)
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
    return None


def _unique_keys(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Give every update its own key; a repeated one says who repeated it.

    Two replies can claim the same partition id (a misconfigured or hostile
    client); their reports and files must not overwrite each other.
    """
    seen: dict[str, int] = {}
    unique = []
    for update in updates:
        count = seen.get(update.client, 0)
        seen[update.client] = count + 1
        if count:
            original = update.client
            update = replace(update, client=f"{original}~{count + 1}")
            update.notes.append(
                f"another update of this round also claims {original!r} "
                f"(node {update.node_id}); reported as {update.client!r}"
            )
        unique.append(update)
    return unique


def _update_norm(target: AttackTarget) -> float | None:
    """L2 norm of ``global - client`` (the pseudo-gradient times ``lr``)."""
    total = sum(float(g.double().pow(2).sum()) for g in target.gradients.values())
    return math.sqrt(total) * (target.lr or 1.0)


def _consistency(meta: ClientMetadata, outcomes: Sequence[AttackOutcome]) -> list[str]:
    """Notes where the gradient contradicts what the client declared.

    An update can mix no more distinct inputs than the client trained on, so
    an estimated batch size above the declared count means the metadata
    lies (or the update is not what the client says it is).
    """
    multi_step = (meta.local_steps or 1) > 1
    declared = meta.num_examples if multi_step else meta.batch_size
    if declared is None:
        return []
    return [
        f"metadata inconsistent: the client declared {declared} distinct input(s) "
        f"but the gradient {o.attack} saw mixes at least {o.batch_size_estimate}"
        for o in outcomes
        if o.batch_size_estimate is not None and o.batch_size_estimate > declared
    ]


@dataclass
class _WorkerSpec:
    """What a worker process needs to audit clients as the server would."""

    token: str
    model: nn.Module
    input_shape: tuple[int, ...]
    config: AuditConfig
    attacks: list[Attack]
    privacy: PrivacySettings | None
    offset: int
    strategy_name: str


_WORKER_CACHE: dict[str, tuple[Auditor, Mapping[str, np.ndarray]]] = {}
"""In a worker: the auditor and global arrays of the round being audited."""


@dataclass
class ClientJob:
    """One client's whole audit, run in a worker (process and Ray backends).

    ``shared`` is the pickle of the auditor's spec and the round's global
    arrays, made once per round: every job of the round carries the same
    bytes (a copy, not a fresh pickle of the model), and a worker unpickles
    them once.
    """

    shared_key: str
    shared: bytes
    server_round: int
    update: ClientUpdate
    train_config: dict[str, Any]
    timeout_s: float | None = None
    memory_mb: int | None = None
    label: str = ""
    threads: int | None = 1

    def execute(self) -> ClientAudit:
        cached = _WORKER_CACHE.get(self.shared_key)
        if cached is None:
            spec, global_state = pickle.loads(self.shared)
            _WORKER_CACHE.clear()  # one round per worker at a time
            auditor = Auditor(
                spec.model,
                spec.input_shape,
                spec.config,
                attacks=spec.attacks,
                strategy_name=spec.strategy_name,
                _worker_of=spec,
            )
            auditor.privacy = spec.privacy
            cached = _WORKER_CACHE[self.shared_key] = (auditor, global_state)
        auditor, global_state = cached
        (audit,) = auditor._audit_clients(
            self.server_round, global_state, [self.update], self.train_config, None
        )
        return audit


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
        _worker_of: _WorkerSpec | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(
                "Auditor", [f"model must be a torch.nn.Module, got {type(model)}"]
            )
        self._spec: _WorkerSpec | None = None
        self._spec_of = _worker_of
        self.model = model
        self.input_shape = check_input_shape(input_shape)
        self.config = config
        self.strategy_name = strategy_name
        self.attacks = list(attacks) if attacks is not None else _build(config.attacks)
        self.policy = load_policy(config.policy)
        self.writer = ReportWriter(config.output_dir)
        self.runner: JobRunner = make_runner(
            config.backend,
            workers=config.workers,
            ray_address=config.ray_address,
            ray_num_cpus=config.ray_num_cpus,
        )
        if _worker_of is None:  # a worker's auditor leaves the folder to the server's
            self.writer.write_policy(self.policy.model_dump_json(indent=2))
        self._bounds: dict[tuple[int, int | None, int | None], CapacityReport] = {}
        # config.probe's inputs, loaded at the first round that needs them.
        self._probe: torch.Tensor | None = None
        self._probe_problem: str | None = None
        self.privacy: PrivacySettings | None = config.privacy
        # The global model of the round being audited, shared by its clients.
        self._start: tuple[Mapping[str, np.ndarray], nn.Module] | None = None
        self._offset = self.writer.offset if _worker_of is None else _worker_of.offset
        if self._offset and _worker_of is None:
            logger.info(
                "fl-audit: %s already holds %d round(s); this run continues after them",
                config.output_dir,
                self._offset,
            )

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
            privacy=self.privacy,
            probe=(
                None
                if self.config.probe is None
                else self.config.probe.model_dump(mode="json")
            ),
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
        """Audit the selected updates of a round and write its report.

        Clients are audited a few at a time (as many as the runner has
        workers), so the audit holds the targets and results of those only.
        Once ``round_budget_s`` is spent no further attack starts; those not
        run are reported ``failed`` with the reason.
        """
        started_at = started_at or datetime.now(UTC)
        budget = self.config.round_budget_s
        deadline = None if budget is None else time.perf_counter() + budget
        train_config = dict(train_config or {})
        updates = _unique_keys(updates)
        chosen, reasons = self.config.clients.select(
            server_round, [(u.client, u.partition_id) for u in updates]
        )
        keep = set(chosen)
        audited = [u for u in updates if u.client in keep]
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

        clients: list[ClientAudit] = []
        step = max(1, getattr(self.runner, "workers", 1))
        if self.runner.name in ("process", "ray"):
            clients = self._audit_in_workers(
                server_round, global_state, audited, train_config, deadline
            )
        else:
            with limited_threads(self.config.attack_threads):
                for first in range(0, len(audited), step):
                    clients += self._audit_clients(
                        server_round,
                        global_state,
                        audited[first : first + step],
                        train_config,
                        deadline,
                    )
        index = self._offset + server_round
        if self._offset:
            notes = [
                *notes,
                f"Flower's round {server_round}: this run continues after the "
                f"{self._offset} round(s) already in this folder",
            ]
        report = RoundReport(
            round=index,
            server_round=server_round if self._offset else None,
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

    def _audit_in_workers(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        audited: Sequence[ClientUpdate],
        train_config: Mapping[str, Any],
        deadline: float | None,
    ) -> list[ClientAudit]:
        """Each client's whole audit as one job in the runner's workers.

        The server's process only sends the update (still undecoded) and
        receives the client's report entry: decoding, bounds, attacks,
        scores and files all happen in the worker, off the training thread.
        """
        if self._spec is None:
            self._spec = _WorkerSpec(
                token=uuid.uuid4().hex,
                model=self.model,
                input_shape=self.input_shape,
                config=self.config.model_copy(
                    update={"backend": "inline", "background": False}
                ),
                attacks=self.attacks,
                privacy=self.privacy,
                offset=self._offset,
                strategy_name=self.strategy_name,
            )
        caps = [self._timeout(a) for a in self.attacks]
        cap = sum(c for c in caps if c is not None) if None not in caps else None
        shared = pickle.dumps((self._spec, dict(global_state)))
        key = f"{self._spec.token}:{server_round}"
        jobs = [
            ClientJob(
                key,
                shared,
                server_round,
                update,
                dict(train_config),
                cap,
                self.config.attack_memory_mb,
                update.client,
                self.config.attack_threads,
            )
            for update in audited
        ]
        clients = []
        for update, done in zip(audited, self.runner.run(jobs, deadline), strict=True):
            audit = done.result
            if not isinstance(audit, ClientAudit):
                reason = done.error or "the worker returned no report"
                audit = self._client(
                    update,
                    None,
                    [
                        AttackOutcome(
                            attack=a.name,
                            options=_options(a, self.config),
                            status="failed",
                            reason=f"the client's audit did not finish: {reason}",
                        )
                        for a in self.attacks
                    ],
                    list(update.notes),
                    False,
                    done.elapsed_s,
                )
            _log_client(server_round, audit)
            clients.append(audit)
        return clients

    # -------------------------------------------------------------- a client

    def audit_client(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        update: ClientUpdate,
        train_config: Mapping[str, Any] | None = None,
    ) -> ClientAudit:
        """Bounds, attacks and scores for one client; never raises."""
        (audit,) = self._audit_clients(
            server_round, global_state, [update], dict(train_config or {}), None
        )
        return audit

    def _audit_clients(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        train_config: Mapping[str, Any],
        deadline: float | None,
    ) -> list[ClientAudit]:
        prepared = [
            self._prepare(server_round, global_state, u, train_config) for u in updates
        ]

        # One job per client and applicable attack; the rest are decided here.
        jobs: list[AttackJob] = []
        slots: list[list[AttackOutcome | int]] = []
        for prep in prepared:
            row: list[AttackOutcome | int] = []
            if prep.target is not None:
                for attack in self.attacks:
                    decided = _applicability(attack, prep.target, self.config)
                    if decided is not None:
                        row.append(decided)
                        continue
                    row.append(len(jobs))
                    # In a worker the worker itself is the isolation: it
                    # is killed past the client's cap, attacks run inside.
                    capped = self._spec_of is None
                    jobs.append(
                        AttackJob(
                            attack,
                            prep.target,
                            self._timeout(attack) if capped else None,
                            self.config.attack_memory_mb if capped else None,
                            f"{prep.update.client}/{attack.name}",
                            self.config.attack_threads,
                        )
                    )
            slots.append(row)

        outcomes = self.runner.run(jobs, deadline) if jobs else []

        audits = []
        for prep, row in zip(prepared, slots, strict=True):
            results = [
                slot
                if isinstance(slot, AttackOutcome)
                else self._finish(server_round, attack, prep, outcomes[slot])
                for attack, slot in zip(self.attacks, row, strict=False)
            ]
            prep.notes += _consistency(prep.update.metadata, results)
            audit = self._client(
                prep.update,
                prep.capacity,
                results,
                prep.notes,
                prep.truth is not None and prep.target is not None,
                time.perf_counter() - prep.start,
            )
            audit.update_norm = prep.update_norm
            audit.noise_to_update = prep.noise_to_update
            if audit.ground_truth_used and self.config.save_reconstructions:
                assert prep.truth is not None  # ground_truth_used says so
                audit.ground_truth_file = self._save_truth(
                    self._offset + server_round, prep.update, prep.truth
                )
            _log_client(server_round, audit)
            audits.append(audit)
        return audits

    def _prepare(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        update: ClientUpdate,
        train_config: Mapping[str, Any],
    ) -> _Prepared:
        start = time.perf_counter()
        meta = update.metadata
        notes = list(update.notes)
        lr = meta.lr or _lr_from(train_config)
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
            logger.warning("fl-audit round %d %s: %s", server_round, update.client, exc)
            notes.append(f"the update cannot be audited: {exc}")
            return _Prepared(update, None, None, truth, notes, start)
        capacity = self._capacity(server_round, target.model, meta, update.kind, notes)
        prep = _Prepared(update, target, capacity, truth, notes, start)
        prep.update_norm = _update_norm(target)
        prep.noise_to_update = self._noise(prep.update_norm, target, notes)
        return prep

    def _noise(
        self, norm: float | None, target: AttackTarget, notes: list[str]
    ) -> float | None:
        """Noise over update norm under local DP; a note under central DP."""
        dp = self.privacy
        if dp is None:
            return None
        if dp.noise_on == "aggregate":
            notes.append(
                f"differential privacy ({dp.mechanism}, noise multiplier "
                f"{dp.noise_multiplier:g}, clipping {dp.clipping_norm:g}) adds its "
                "noise to the aggregate: the audit, like the server, sees this "
                "update before any noise"
            )
            return None
        if not norm:
            return None
        size = sum(g.numel() for g in target.gradients.values())
        return float(dp.noise_std * math.sqrt(size) / norm)

    def _timeout(self, attack: Attack) -> float | None:
        for spec in self.config.attacks:
            if spec.name == attack.name and spec.timeout_s is not None:
                return spec.timeout_s
        return self.config.attack_timeout_s

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
        if self._start is None or self._start[0] is not global_state:
            self._start = (
                global_state,
                AttackTarget.start_model(self.model, global_keyed),
            )
        target = AttackTarget.from_update(
            self.model,
            global_keyed,
            client_keyed,
            self.input_shape,
            lr=lr,
            local_steps=steps,
            input_range=input_range,
            batch_size=None if update.kind == "aggregate" else meta.batch_size,
            num_classes=self.config.num_classes,
            start_model=self._start[1],
        )
        noise = self._update_noise()
        if not noise:
            return target
        # Known noise on every entry of the update (local DP, SecAgg+
        # quantisation) sets the floor below which the attacks see nothing.
        floor = noise / (lr or 1.0)
        rounding = {k: max(v, floor) for k, v in target.rounding.items()}
        return replace(target, rounding=rounding)

    def _update_noise(self) -> float:
        """Std of the noise per entry of the updates the audit sees."""
        declared = self.config.update_noise_std or 0.0
        dp = self.privacy
        local = dp.noise_std if dp is not None and dp.noise_on == "update" else 0.0
        return max(declared, local)

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
        probe = self._probe_inputs(notes)
        if key not in self._bounds:
            try:
                self._bounds[key] = analyze(
                    model,
                    self.input_shape,
                    batch_size=batch,
                    local_examples=examples,
                    probe=probe,
                )
            except FLAuditError as exc:
                notes.append(f"capacity bounds not computed: {exc}")
                return None
        return self._bounds[key]

    def _probe_inputs(self, notes: list[str]) -> torch.Tensor | None:
        """``config.probe`` as a tensor, loaded once; a problem becomes a note."""
        spec = self.config.probe
        if spec is None:
            return None
        if self._probe is None and self._probe_problem is None:
            try:
                self._probe = _load_probe(spec, self.input_shape)
            except (FLAuditError, ImportError, OSError) as exc:
                self._probe_problem = (
                    f"probe not loaded ({type(exc).__name__}: {exc}); capacity "
                    "bounds computed without it"
                )
                logger.warning("fl-audit: %s", self._probe_problem)
        if self._probe_problem is not None:
            notes.append(self._probe_problem)
        return self._probe

    def _finish(
        self,
        server_round: int,
        attack: Attack,
        prep: _Prepared,
        job: JobOutcome,
    ) -> AttackOutcome:
        options = _options(attack, self.config)
        result = job.result
        if result is None:
            logger.warning(
                "fl-audit round %d %s: attack %s %s: %s",
                server_round,
                prep.update.client,
                attack.name,
                job.status,
                job.error,
            )
            return AttackOutcome(
                attack=attack.name,
                options=options,
                status="failed",
                reason=job.error or "no result",
                elapsed_s=round(job.elapsed_s, 6),
            )

        outcome = AttackOutcome.from_result(result, options)
        if not torch.isfinite(result.inputs).all():
            outcome.notes.append("some recovered values are NaN/Inf")
        if prep.truth is not None and prep.target is not None:
            outcome.ground_truth = _score(result, prep.truth, prep.target.input_range)
        if self.config.save_reconstructions and result.num_recovered:
            try:
                outcome.reconstruction_file = self.writer.save_reconstruction(
                    self._offset + server_round, prep.update.client, result
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


def _load_probe(spec: ProbeSpec, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The probe inputs a :class:`~fl_audit.config.ProbeSpec` names.

    Raises
    ------
    ShapeError
        The inputs are not ``(P, *input_shape)`` (or, for a kind, its
        channels differ from the model's).
    InvalidInputError
        The file holds no finite floating-point inputs, or as
        :func:`fl_audit.data.probe_inputs` / :func:`fl_audit.data.load_numpy`.
    """
    if spec.kind is not None:
        return probe_inputs(spec.kind, spec.count, input_shape, seed=spec.seed)
    assert spec.path is not None
    array = load_numpy(spec.path)
    what = f"probe file {str(spec.path)!r}"
    if array.dtype.kind != "f":
        raise InvalidInputError(
            what,
            [
                f"holds {array.dtype} values; save the inputs as floats, scaled as "
                "the clients feed the model (e.g. x / 255 for 8-bit images)"
            ],
        )
    if tuple(array.shape[1:]) != tuple(input_shape) or array.shape[0] < 1:
        raise ShapeError(
            what,
            [
                f"holds shape {tuple(array.shape)}, expected (P, "
                f"{', '.join(map(str, input_shape))}) with P >= 1"
            ],
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array[: spec.count]))
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidInputError(what, ["holds NaN or infinite values"])
    return tensor.double()


def _counts(meta: ClientMetadata, kind: UpdateKind) -> tuple[int | None, int | None]:
    """Batch size B and distinct examples N of the round, as the bounds take them."""
    if kind == "aggregate":
        return None, meta.num_examples or None
    batch, n, steps = meta.batch_size, meta.num_examples, meta.local_steps
    if batch is not None and n is not None and 0 < n < batch:
        batch = n  # the only batch is smaller than the configured size
    if steps is None or steps == 1:
        return batch, None
    examples: int | None
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
