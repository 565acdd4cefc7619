"""The per-round report: its versioned schema and the files it is written to.

A run's output folder holds::

    round-0001.json          one RoundReport per round
    round-0001/              reconstructions of that round, one .npz per
        partition-3.analytic_fc.npz   client and attack (owner-readable only)
        partition-3.truth.npz         the client's true inputs, when ground
                                      truth was allowed (owner-readable only)
    summary.json             a RunSummary, rewritten after every round
    policy.json              the audit policy the verdicts were made with

Every file is written to a temporary name first and then renamed, so a run
killed mid-round leaves every finished round readable. :class:`RoundReport`
and :class:`RunSummary` are pydantic models: ``RoundReport.model_validate_json``
reads a round back, and ``RoundReport.model_json_schema()`` is the schema
documented in docs/reports.md. ``SCHEMA_VERSION`` changes when a field
changes meaning or is removed; a new optional field (such as the policy
verdicts of 1.0 files written after issue 5) leaves it as it is, and older
files read back with that field ``None``.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fl_audit.bounds import CapacityReport, RiskLevel
from fl_audit.core import AttackResult
from fl_audit.errors import InvalidInputError

__all__ = [
    "SCHEMA_VERSION",
    "AttackOutcome",
    "ClientAudit",
    "ClientVerdict",
    "ClientMetadata",
    "FailedReply",
    "GroundTruthScore",
    "PrivacySettings",
    "ReportWriter",
    "RoundReport",
    "RoundSummary",
    "RoundVerdict",
    "RuleFinding",
    "RuleSkip",
    "RunSettings",
    "RunSummary",
    "SkippedClient",
    "VerdictStatus",
    "round_file_name",
]

SCHEMA_VERSION = "1.0"

AttackStatus = Literal["completed", "not_applicable", "failed"]
UpdateKind = Literal["gradient", "update", "aggregate"]
VerdictStatus = Literal["pass", "warn", "fail"]
Severity = Literal["warn", "fail"]


def _now() -> datetime:
    return datetime.now(UTC)


class ClientMetadata(BaseModel):
    """What a client says about its round (sent by :func:`fl_audit.client.audit_mod`).

    Every field is optional: a client without the mod sends none, and the
    audit then does what the update alone allows.
    """

    model_config = ConfigDict(extra="forbid")

    partition_id: int | None = None
    batch_size: int | None = Field(default=None, ge=1)
    local_steps: int | None = Field(default=None, ge=1)
    num_examples: int | None = Field(default=None, ge=0)
    optimizer: str | None = None
    lr: float | None = Field(default=None, gt=0.0)
    momentum: float | None = Field(default=None, ge=0.0)
    weight_decay: float | None = Field(default=None, ge=0.0)
    input_shape: list[int] | None = None
    input_range: tuple[float, float] | None = None
    ground_truth_sent: bool = False


class GroundTruthScore(BaseModel):
    """Reconstructions scored against the inputs the client trained on.

    Only in simulations whose audit config sets ``allow_ground_truth``.
    Lists hold one entry per true input, in the client's order.
    """

    num_true: int
    data_range: float
    recovered_30db: int
    recovered_60db: int
    median_psnr: float
    max_psnr: float
    psnr: list[float]
    ssim: list[float | None]
    correlation: list[float | None]
    min_certified_psnr: float | None = Field(
        default=None, description="lowest PSNR of a certified input (a check)"
    )
    labels_correct: int | None = None


class AttackOutcome(BaseModel):
    """One attack on one client's update."""

    attack: str
    options: dict[str, Any] = Field(default_factory=dict)
    status: AttackStatus
    reason: str = ""
    recovered: int = 0
    certified: int = 0
    labels: list[int] | None = None
    certificates: list[str] = Field(default_factory=list)
    batch_size_estimate: int | None = None
    residual: float | None = None
    elapsed_s: float = 0.0
    notes: list[str] = Field(default_factory=list)
    reconstruction_file: str | None = Field(
        default=None, description="path relative to the output folder"
    )
    ground_truth: GroundTruthScore | None = None

    @classmethod
    def from_result(
        cls, result: AttackResult, options: dict[str, Any]
    ) -> AttackOutcome:
        summary = result.summary()
        residual = summary["residual"]
        return cls(
            attack=result.attack,
            options=options,
            status="completed",
            recovered=summary["recovered"],
            certified=summary["certified"],
            labels=summary["labels"],
            certificates=summary["certificates"],
            batch_size_estimate=summary["batch_size_estimate"],
            residual=None if residual is None else float(residual),
            elapsed_s=summary["elapsed_s"],
            notes=summary["notes"],
        )


class RuleFinding(BaseModel):
    """One policy rule that fired on one client-round, with its evidence."""

    rule: str = Field(description="the rule's id in the policy")
    kind: str = Field(description="the rule's kind, e.g. max_psnr")
    severity: Severity
    message: str = Field(description="what was found, in one sentence")
    attack: str | None = Field(default=None, description="the attack, if any")
    bound: str | None = Field(
        default=None, description="the capacity bound or risk level, if any"
    )
    evidence: dict[str, Any] = Field(
        default_factory=dict, description="the numbers the rule compared"
    )


class RuleSkip(BaseModel):
    """A policy rule that could not be evaluated on a client-round, and why."""

    rule: str
    reason: str


class ClientVerdict(BaseModel):
    """The policy's verdict on one client-round.

    ``fail`` when a rule of severity ``fail`` fired, else ``warn`` when any
    rule fired, else ``pass``.
    """

    status: VerdictStatus
    fired: list[RuleFinding] = Field(default_factory=list)
    not_evaluated: list[RuleSkip] = Field(default_factory=list)


class RoundVerdict(BaseModel):
    """The policy's verdict on a round: the worst of its client-rounds."""

    status: VerdictStatus
    policy: str = Field(description="the policy's name")
    policy_sha256: str = Field(description="digest of the policy's canonical JSON")
    clients: dict[str, int] = Field(
        default_factory=dict, description="audited clients per verdict status"
    )
    rules_fired: dict[str, int] = Field(
        default_factory=dict, description="client-rounds on which each rule fired"
    )


class ClientAudit(BaseModel):
    """Everything the audit found about one client in one round."""

    client: str = Field(description="partition-<id> when known, else node-<id>")
    node_id: int | None
    partition_id: int | None
    update_kind: UpdateKind
    metadata: ClientMetadata
    metadata_from_client: bool
    capacity: CapacityReport | None
    risk: RiskLevel | None
    attacks: list[AttackOutcome]
    ground_truth_used: bool
    notes: list[str] = Field(default_factory=list)
    elapsed_s: float = 0.0
    update_norm: float | None = Field(
        default=None, description="L2 norm of global - client over all parameters"
    )
    noise_to_update: float | None = Field(
        default=None,
        description="differential privacy: std of the noise on this update over "
        "its norm, when noise reaches what the audit saw",
    )
    ground_truth_file: str | None = Field(
        default=None,
        description="the client's true inputs (.npz, owner-readable only), "
        "path relative to the output folder",
    )
    verdict: ClientVerdict | None = Field(
        default=None, description="the audit policy's verdict on this client-round"
    )


class SkippedClient(BaseModel):
    """A client of the round that was not audited, and why."""

    client: str
    node_id: int | None
    partition_id: int | None
    reason: str


class FailedReply(BaseModel):
    """A reply that carried an error instead of an update."""

    node_id: int | None
    reason: str


class PrivacySettings(BaseModel):
    """Differential privacy of the run, read off Flower's DP wrappers or declared.

    ``noise_on`` says where the Gaussian noise is added: ``"aggregate"``
    (Flower's server- and client-side fixed-clipping wrappers add it to the
    aggregate, after the audit has seen each update) or ``"update"`` (local
    DP: each client adds it before sending).
    """

    model_config = ConfigDict(extra="forbid")

    mechanism: str = "declared"
    noise_multiplier: float = Field(ge=0.0)
    clipping_norm: float = Field(gt=0.0)
    num_sampled_clients: int | None = Field(default=None, ge=1)
    noise_on: Literal["aggregate", "update"] = "aggregate"

    @property
    def noise_std(self) -> float:
        """Std of the noise per coordinate where it is added."""
        std = self.noise_multiplier * self.clipping_norm
        if self.noise_on == "aggregate" and self.num_sampled_clients:
            return std / self.num_sampled_clients
        return std


class RunSettings(BaseModel):
    """What the audit was run with (repeated in every round report)."""

    fl_audit_version: str
    model: str
    input_shape: list[int]
    strategy: str
    attacks: list[dict[str, Any]]
    simulation: bool
    allow_ground_truth: bool
    train_config: dict[str, Any] = Field(
        default_factory=dict, description="scalars the server sent with the round"
    )
    privacy: PrivacySettings | None = None
    probe: dict[str, Any] | None = Field(
        default=None,
        description="the real inputs the capacity bounds were given (the audit "
        "config's probe: kind or path, count, seed), if any",
    )


class RoundReport(BaseModel):
    """The audit of one round: one entry per audited client."""

    schema_version: str = SCHEMA_VERSION
    round: int = Field(description="the run's round: continues across restarts")
    server_round: int | None = Field(
        default=None, description="Flower's round number, when it differs"
    )
    started_at: datetime
    finished_at: datetime
    settings: RunSettings
    aggregate_only: bool = Field(
        default=False,
        description="secure aggregation: only the aggregate was visible and audited",
    )
    clients: list[ClientAudit]
    skipped: list[SkippedClient] = Field(default_factory=list)
    failed_replies: list[FailedReply] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    verdict: RoundVerdict | None = Field(
        default=None, description="the audit policy's verdict on the round"
    )


class RoundSummary(BaseModel):
    """One line of the run summary."""

    round: int
    file: str
    finished_at: datetime
    clients_audited: int
    clients_skipped: int
    aggregate_only: bool
    risk: dict[str, int] = Field(description="audited clients per risk level")
    recovered: int
    certified: int
    max_psnr: float | None = None
    attack_failures: int
    verdict: VerdictStatus | None = None


class RunSummary(BaseModel):
    """The run so far; rewritten after every round."""

    schema_version: str = SCHEMA_VERSION
    updated_at: datetime
    settings: RunSettings
    rounds: list[RoundSummary]

    @classmethod
    def line(cls, report: RoundReport) -> RoundSummary:
        risk: dict[str, int] = {}
        for c in report.clients:
            key = c.risk or "unknown"
            risk[key] = risk.get(key, 0) + 1
        outcomes = [a for c in report.clients for a in c.attacks]
        psnrs = [a.ground_truth.max_psnr for a in outcomes if a.ground_truth]
        return RoundSummary(
            round=report.round,
            file=round_file_name(report.round),
            finished_at=report.finished_at,
            clients_audited=len(report.clients),
            clients_skipped=len(report.skipped),
            aggregate_only=report.aggregate_only,
            risk=risk,
            recovered=sum(a.recovered for a in outcomes),
            certified=sum(a.certified for a in outcomes),
            max_psnr=max(psnrs) if psnrs else None,
            attack_failures=sum(a.status == "failed" for a in outcomes),
            verdict=report.verdict.status if report.verdict else None,
        )


def round_file_name(server_round: int) -> str:
    """``round-0007.json`` for round 7."""
    return f"round-{server_round:04d}.json"


class ReportWriter:
    """Writes a run's reports into one folder, atomically.

    The folder is created and checked for writing when the writer is made,
    so a bad ``output_dir`` fails before the first round, not at round 7.
    Reconstructions and any file holding client data are created readable
    by the owner only (mode 0600).

    Raises
    ------
    InvalidInputError
        If the folder cannot be created or written.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.output_dir, prefix=".probe-"):
                pass
        except OSError as exc:
            raise InvalidInputError(
                "output_dir",
                [
                    f"{str(self.output_dir)!r} cannot be written "
                    f"({exc.strerror or exc}); choose a folder you can write to"
                ],
            ) from None
        summary = self.read_summary()
        self.offset = (
            max((r.round for r in summary.rounds), default=0) if summary else 0
        )
        """Rounds already in the folder: a restarted run continues after them."""

    def round_path(self, server_round: int) -> Path:
        return self.output_dir / round_file_name(server_round)

    def save_reconstruction(
        self, server_round: int, client: str, result: AttackResult
    ) -> str:
        """Write one attack's recovered inputs; return their path in the folder."""
        folder = self.output_dir / f"round-{server_round:04d}"
        folder.mkdir(exist_ok=True)
        name = f"{_safe(client)}.{_safe(result.attack)}.npz"
        tmp = folder / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        result.save(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, folder / name)
        return f"{folder.name}/{name}"

    def save_ground_truth(
        self,
        server_round: int,
        client: str,
        inputs: np.ndarray,
        labels: np.ndarray | None = None,
    ) -> str:
        """Write a client's true inputs (owner-readable only); return the path.

        Kept only when the audit config allows ground truth, so a report can
        show reconstructions beside the inputs they came from.
        """
        folder = self.output_dir / f"round-{server_round:04d}"
        folder.mkdir(exist_ok=True)
        name = f"{_safe(client)}.truth.npz"
        arrays = {"inputs": np.asarray(inputs)}
        if labels is not None:
            arrays["labels"] = np.asarray(labels)
        tmp = folder / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        os.chmod(tmp, 0o600)
        os.replace(tmp, folder / name)
        return f"{folder.name}/{name}"

    def write_policy(self, policy_json: str) -> Path:
        """Write ``policy.json``: the policy the rounds' verdicts were made with."""
        path = self.output_dir / "policy.json"
        _atomic_write(path, policy_json)
        return path

    def write_round(self, report: RoundReport) -> Path:
        """Write ``round-NNNN.json`` and refresh ``summary.json``."""
        path = self.round_path(report.round)
        _atomic_write(path, report.model_dump_json(indent=2))

        summary = self.read_summary()
        lines = {r.round: r for r in summary.rounds} if summary else {}
        lines[report.round] = RunSummary.line(report)
        new = RunSummary(
            updated_at=_now(),
            settings=report.settings,
            rounds=[lines[r] for r in sorted(lines)],
        )
        _atomic_write(self.output_dir / "summary.json", new.model_dump_json(indent=2))
        return path

    def read_summary(self) -> RunSummary | None:
        """The summary written so far, or ``None`` for a new folder."""
        path = self.output_dir / "summary.json"
        if not path.exists():
            return None
        try:
            return RunSummary.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError:
            # A summary from another schema version: rebuilt from the rounds.
            return self._rebuild_summary()

    def _rebuild_summary(self) -> RunSummary | None:
        reports = []
        for file in sorted(self.output_dir.glob("round-*.json")):
            try:
                reports.append(
                    RoundReport.model_validate_json(file.read_text(encoding="utf-8"))
                )
            except ValueError:
                continue
        if not reports:
            return None
        return RunSummary(
            updated_at=_now(),
            settings=reports[-1].settings,
            rounds=[RunSummary.line(r) for r in reports],
        )


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps_scalar_config(config: dict[str, Any]) -> dict[str, Any]:
    """Keep the JSON-able scalars of a config (bytes and arrays are dropped)."""
    kept: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, bool | int | float | str) or value is None:
            kept[str(key)] = value
        elif isinstance(value, list) and all(
            isinstance(v, bool | int | float | str) for v in value
        ):
            kept[str(key)] = list(value)
    return kept
