"""The audit policy: rules a run must meet, and a verdict per client-round.

A policy is a YAML file validated by pydantic (:class:`Policy`); every
problem of a bad file is reported at once in one
:class:`~fl_audit.errors.ConfigError`, each with its key and line. Each rule
has an ``id``, a ``kind`` (:data:`RULE_KINDS`) and a ``severity``, ``warn``
or ``fail``. Example::

    name: hospital-board
    version: 1
    show_reconstructions: simulation   # simulation | always | never
    rules:
      - id: fc-bound-exposed
        kind: capacity_risk
        severity: fail
        levels: [exposed]
        first_layer: [linear]
      - id: psnr-30db
        kind: max_psnr
        severity: fail
        threshold_db: 30

:func:`evaluate_client` turns one :class:`~fl_audit.report.ClientAudit` into
a :class:`~fl_audit.report.ClientVerdict`: ``fail`` when a rule of severity
``fail`` fired, else ``warn`` when any rule fired, else ``pass``; each fired
rule comes with its evidence (the numbers compared, the attack, the bound).
A rule whose input is missing (a PSNR rule in a run without ground truth, a
batch-size rule for a client that declared none) is listed as not evaluated
with the reason, and does not fire. :func:`apply_policy` does it for a whole
:class:`~fl_audit.report.RoundReport`; the round's verdict is the worst of
its client-rounds.

The default policy (:func:`default_policy`, ``fl_audit/policies/default.yaml``)
is documented in docs/reports.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fl_audit.bounds import CapacityReport, RiskLevel
from fl_audit.bounds import Verdict as BoundVerdict
from fl_audit.config import _key_lines, _problems
from fl_audit.errors import ConfigError
from fl_audit.report import (
    ClientAudit,
    ClientVerdict,
    RoundReport,
    RoundVerdict,
    RuleFinding,
    RuleSkip,
    Severity,
    VerdictStatus,
)

__all__ = [
    "RULE_KINDS",
    "AttackFailedRule",
    "BatchSizeRevealedRule",
    "CapacityRiskRule",
    "CertifiedReconstructionRule",
    "MaxPsnrRule",
    "MinBatchSizeRule",
    "Policy",
    "Rule",
    "ShowReconstructions",
    "apply_policy",
    "default_policy",
    "evaluate_client",
    "governing_bound",
    "load_policy",
    "worst",
]

ShowReconstructions = Literal["simulation", "always", "never"]
FirstLayerKind = Literal["linear", "conv1d", "conv2d", "unsupported"]

_ORDER: dict[VerdictStatus, int] = {"pass": 0, "warn": 1, "fail": 2}
_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def worst(statuses: Sequence[VerdictStatus]) -> VerdictStatus:
    """The most severe of ``statuses`` (``pass`` for none)."""
    return max(statuses, key=_ORDER.__getitem__, default="pass")


class _RuleBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID_PATTERN, description="unique name of the rule")
    severity: Severity = Field(description="the verdict when the rule fires")
    description: str = ""

    summary: ClassVar[str] = ""

    def evaluate(
        self, audit: ClientAudit
    ) -> tuple[list[RuleFinding], RuleSkip | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finding(self, message: str, **extra: Any) -> RuleFinding:
        kind = self.kind  # type: ignore[attr-defined]
        return RuleFinding(
            rule=self.id, kind=kind, severity=self.severity, message=message, **extra
        )

    def _skip(self, reason: str) -> tuple[list[RuleFinding], RuleSkip]:
        return [], RuleSkip(rule=self.id, reason=reason)


class CapacityRiskRule(_RuleBase):
    """Fires when the capacity bounds put the client-round at a risk level.

    ``levels`` are the risk levels that fire (default ``exposed``);
    ``first_layer`` restricts the rule to first layers of these kinds, e.g.
    ``[linear]`` for "no client-round may be exposed by the FC bound".
    """

    kind: Literal["capacity_risk"]
    levels: list[RiskLevel] = Field(
        default_factory=lambda: cast(list[RiskLevel], ["exposed"]), min_length=1
    )
    first_layer: list[FirstLayerKind] | None = None

    summary: ClassVar[str] = "the capacity bounds put the client-round at a risk level"

    def evaluate(self, audit: ClientAudit) -> tuple[list[RuleFinding], RuleSkip | None]:
        cap = audit.capacity
        if cap is None:
            return self._skip("no capacity report (the update could not be analysed)")
        kind = cap.first_layer.kind
        if self.first_layer is not None and kind not in self.first_layer:
            return [], None
        if cap.risk not in self.levels:
            return [], None
        bound = governing_bound(cap)
        evidence: dict[str, Any] = {
            "risk": cap.risk,
            "first_layer": f"{cap.first_layer.path or '<model>'} ({kind})",
            "batch_size": cap.batch_size,
            "local_examples": cap.local_examples,
        }
        if bound is not None:
            evidence.update(
                formula=bound.formula,
                required=bound.required,
                actual=bound.actual,
                holds=bound.holds,
            )
        message = f"risk {cap.risk}: {cap.risk_reason}"
        return [
            self._finding(
                message, bound=bound.name if bound else cap.risk, evidence=evidence
            )
        ], None


class MaxPsnrRule(_RuleBase):
    """Fires when a reconstruction scores above ``threshold_db`` dB PSNR.

    Needs ground truth (simulation with ``allow_ground_truth``); without it
    the rule is not evaluated. A PSNR equal to the threshold passes.
    ``attacks`` restricts the rule to these attacks.
    """

    kind: Literal["max_psnr"]
    threshold_db: float = Field(gt=0.0, le=400.0)
    attacks: list[str] | None = None

    summary: ClassVar[str] = "a reconstruction scores above a PSNR against ground truth"

    def evaluate(self, audit: ClientAudit) -> tuple[list[RuleFinding], RuleSkip | None]:
        scored = [
            a
            for a in audit.attacks
            if a.ground_truth is not None
            and (self.attacks is None or a.attack in self.attacks)
        ]
        if not scored:
            return self._skip("no reconstruction was scored against ground truth")
        findings = []
        for a in scored:
            gt = a.ground_truth
            assert gt is not None  # filtered above
            if gt.max_psnr > self.threshold_db:
                above = sum(p > self.threshold_db for p in gt.psnr)
                findings.append(
                    self._finding(
                        f"{a.attack} rebuilt {above} of {gt.num_true} input(s) above "
                        f"{self.threshold_db:g} dB (best {gt.max_psnr:.1f} dB)",
                        attack=a.attack,
                        evidence={
                            "max_psnr": round(gt.max_psnr, 3),
                            "threshold_db": self.threshold_db,
                            "inputs_above": above,
                            "num_true": gt.num_true,
                        },
                    )
                )
        return findings, None


class CertifiedReconstructionRule(_RuleBase):
    """Fires when an attack certifies more than ``max_certified`` inputs.

    A certified input is proven exact without ground truth (see the
    attack's certificates), so this rule holds in real runs too.
    """

    kind: Literal["certified_reconstruction"]
    max_certified: int = Field(default=0, ge=0)

    summary: ClassVar[str] = "an attack certifies an exact reconstruction"

    def evaluate(self, audit: ClientAudit) -> tuple[list[RuleFinding], RuleSkip | None]:
        completed = [a for a in audit.attacks if a.status == "completed"]
        if not completed:
            return self._skip("no attack completed on this update")
        findings = [
            self._finding(
                f"{a.attack} certified {a.certified} reconstruction(s) "
                f"(allowed: {self.max_certified})",
                attack=a.attack,
                evidence={
                    "certified": a.certified,
                    "max_certified": self.max_certified,
                    "certificates": sorted(set(a.certificates) - {""}),
                },
            )
            for a in completed
            if a.certified > self.max_certified
        ]
        return findings, None


class BatchSizeRevealedRule(_RuleBase):
    """Fires when an attack estimates how many inputs the update mixes.

    With ``only_if_correct`` it fires only when the estimate equals the
    count the client declared (its batch size, or its distinct examples
    for a multi-step update); without a declared count it is then not
    evaluated.
    """

    kind: Literal["batch_size_revealed"]
    only_if_correct: bool = False

    summary: ClassVar[str] = "an attack estimates the batch size from the update"

    def evaluate(self, audit: ClientAudit) -> tuple[list[RuleFinding], RuleSkip | None]:
        estimates = [
            a
            for a in audit.attacks
            if a.status == "completed" and a.batch_size_estimate is not None
        ]
        declared = _declared_count(audit)
        if self.only_if_correct and declared is None:
            return self._skip("the client declared no batch size to compare with")
        findings = []
        for a in estimates:
            correct = declared is not None and a.batch_size_estimate == declared
            if self.only_if_correct and not correct:
                continue
            findings.append(
                self._finding(
                    f"{a.attack} estimates {a.batch_size_estimate} input(s) in the "
                    "update"
                    + (f" (declared {declared})" if declared is not None else ""),
                    attack=a.attack,
                    evidence={
                        "batch_size_estimate": a.batch_size_estimate,
                        "declared": declared,
                        "correct": correct if declared is not None else None,
                    },
                )
            )
        return findings, None


class MinBatchSizeRule(_RuleBase):
    """Fires when a client trains on batches smaller than ``min_batch_size``.

    Reads the batch size the client declared. ``if_unknown`` says what a
    client that declared none gets: ``fire`` (default: compliance cannot be
    shown) or ``ignore`` (not evaluated). Aggregates (secure aggregation)
    carry no per-client batch and are not evaluated.
    """

    kind: Literal["min_batch_size"]
    min_batch_size: int = Field(ge=1)
    if_unknown: Literal["fire", "ignore"] = "fire"

    summary: ClassVar[str] = "a client trains on batches smaller than a minimum"

    def evaluate(self, audit: ClientAudit) -> tuple[list[RuleFinding], RuleSkip | None]:
        if audit.update_kind == "aggregate":
            return self._skip("an aggregate carries no per-client batch size")
        batch = audit.metadata.batch_size
        evidence: dict[str, Any] = {
            "batch_size": batch,
            "min_batch_size": self.min_batch_size,
        }
        if batch is None:
            if self.if_unknown == "ignore":
                return self._skip("the client declared no batch size")
            message = "the client declared no batch size (audit mod missing?)"
            return [self._finding(message, evidence=evidence)], None
        if batch >= self.min_batch_size:
            return [], None
        message = f"batch size {batch} < the minimum {self.min_batch_size}"
        return [self._finding(message, evidence=evidence)], None


class AttackFailedRule(_RuleBase):
    """Fires when the audit of a client-round is incomplete.

    An attack that failed (raised) or an update that could not be analysed
    at all leaves the leakage of that client-round unmeasured.
    """

    kind: Literal["attack_failed"]

    summary: ClassVar[str] = "an attack failed or the update could not be audited"

    def evaluate(self, audit: ClientAudit) -> tuple[list[RuleFinding], RuleSkip | None]:
        findings = [
            self._finding(
                f"{a.attack} failed: {a.reason}",
                attack=a.attack,
                evidence={"status": a.status, "reason": a.reason},
            )
            for a in audit.attacks
            if a.status == "failed"
        ]
        if audit.capacity is None and not audit.attacks:
            reason = audit.notes[-1] if audit.notes else "no bound and no attack ran"
            findings.append(
                self._finding(
                    f"the update was not audited: {reason}",
                    evidence={"notes": audit.notes},
                )
            )
        return findings, None


Rule = Annotated[
    CapacityRiskRule
    | MaxPsnrRule
    | CertifiedReconstructionRule
    | BatchSizeRevealedRule
    | MinBatchSizeRule
    | AttackFailedRule,
    Field(discriminator="kind"),
]

_RULE_CLASSES: tuple[type[_RuleBase], ...] = (
    CapacityRiskRule,
    MaxPsnrRule,
    CertifiedReconstructionRule,
    BatchSizeRevealedRule,
    MinBatchSizeRule,
    AttackFailedRule,
)

RULE_KINDS: dict[str, str] = {
    cls.model_fields["kind"].annotation.__args__[0]: cls.summary  # type: ignore[union-attr]
    for cls in _RULE_CLASSES
}
"""Every rule kind, with what makes it fire."""


class Policy(BaseModel):
    """An audit policy: named rules, and whether reports show reconstructions.

    Attributes
    ----------
    name:
        Shown on the report and stored with every verdict.
    version:
        Format version of the policy file (1).
    show_reconstructions:
        ``simulation`` (default): reports show reconstruction images only
        for runs marked as a simulation; ``always``; ``never``.
    rules:
        The rules, each with a unique ``id``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    version: Literal[1] = 1
    description: str = ""
    show_reconstructions: ShowReconstructions = "simulation"
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> Policy:
        ids = [r.id for r in self.rules]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"rule ids must be unique; repeated: {dupes}")
        return self

    @property
    def sha256(self) -> str:
        """Digest of the policy's canonical JSON (stored with every verdict)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def shows_reconstructions(self, simulation: bool) -> bool:
        """Whether a report of a run may embed reconstruction images."""
        if self.show_reconstructions == "always":
            return True
        return self.show_reconstructions == "simulation" and simulation

    @classmethod
    def from_yaml(cls, path: str | Path) -> Policy:
        """Read a policy file (YAML or JSON); every problem names key and line.

        Raises
        ------
        ConfigError
            If the file cannot be read, is not YAML, or breaks the format.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"policy {str(path)!r}",
                [f"cannot read the file: {exc.strerror or exc}; give a readable path"],
            ) from None
        return cls.from_text(text, source=f"policy {str(path)!r}")

    @classmethod
    def from_text(cls, text: str, *, source: str = "policy") -> Policy:
        """Validate a policy given as YAML text."""
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
        if not isinstance(data, dict):
            got = "an empty file" if data is None else type(data).__name__
            raise ConfigError(
                source,
                [f"the top level must be a mapping with name and rules, got {got}"],
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = _key_lines(node)
            _add_tagged_lines(lines, data)
            raise ConfigError(source, _problems(exc, lines, _known_keys)) from None


def _add_tagged_lines(lines: dict[tuple[str, ...], int], data: dict[str, Any]) -> None:
    """Pydantic puts a rule's kind into its error paths: map those to lines too."""
    rules = data.get("rules")
    if not isinstance(rules, list):
        return
    for i, rule in enumerate(rules):
        if isinstance(rule, dict) and isinstance(rule.get("kind"), str):
            prefix = ("rules", str(i))
            for path, line in list(lines.items()):
                if path[:2] == prefix and len(path) > 2:
                    lines[(*prefix, rule["kind"], *path[2:])] = line


def _known_keys(loc: tuple[str, ...]) -> list[str]:
    if len(loc) >= 3 and loc[0] == "rules":
        for cls in _RULE_CLASSES:
            kind = cls.model_fields["kind"].annotation
            if kind.__args__[0] == loc[2]:  # type: ignore[union-attr]
                return list(cls.model_fields)
    return list(Policy.model_fields)


def default_policy() -> Policy:
    """The policy shipped with fl-audit (``fl_audit/policies/default.yaml``)."""
    text = (
        resources.files("fl_audit")
        .joinpath("policies/default.yaml")
        .read_text(encoding="utf-8")
    )
    return Policy.from_text(text, source="default policy")


def load_policy(path: str | Path | None) -> Policy:
    """The policy at ``path`` (YAML or JSON), or the default one for ``None``."""
    return default_policy() if path is None else Policy.from_yaml(path)


# --------------------------------------------------------------------------
# Verdicts


def governing_bound(cap: CapacityReport) -> BoundVerdict | None:
    """The bound that decides the client-round's risk.

    For a fully-connected first layer, ``h >= N`` for a multi-step update
    (``fc_fedavg``), else ``h >= B`` when the batch size is known and above
    one (``fc_batch``), else the single-input theorem; for a convolution,
    its exact rank behind the activation when computed (``analyze`` with a
    probe), else its exact rank when computed, else the seed v1 count.
    """
    by_name = {v.name: v for v in cap.verdicts}
    if cap.first_layer.kind == "linear":
        for name in ("fc_fedavg", "fc_batch"):
            v = by_name.get(name)
            if v is not None and v.required is not None and v.required > 1:
                return v
        return by_name.get("fc_single_input")
    for name in ("conv_exact_rank_relu", "conv_exact_rank"):
        rank = by_name.get(name)
        if rank is not None and rank.holds is not None:
            return rank
    rank = by_name.get("conv_exact_rank")
    return by_name.get("conv_seed_v1") or rank


def _declared_count(audit: ClientAudit) -> int | None:
    """Distinct inputs the client says its update mixes (B, or N for steps > 1)."""
    meta = audit.metadata
    if audit.capacity is not None and audit.capacity.local_examples is not None:
        return audit.capacity.local_examples
    if meta.local_steps in (None, 1):
        if meta.batch_size is not None and meta.num_examples:
            return min(meta.batch_size, meta.num_examples)
        return meta.batch_size
    return meta.num_examples or None


def evaluate_client(policy: Policy, audit: ClientAudit) -> ClientVerdict:
    """The policy's verdict on one client-round, with the evidence."""
    fired: list[RuleFinding] = []
    skipped: list[RuleSkip] = []
    for rule in policy.rules:
        findings, skip = rule.evaluate(audit)
        fired.extend(findings)
        if skip is not None:
            skipped.append(skip)
    status = worst([f.severity for f in fired])
    return ClientVerdict(status=status, fired=fired, not_evaluated=skipped)


def apply_policy(policy: Policy, report: RoundReport) -> RoundReport:
    """A copy of ``report`` with the policy's verdicts on each client and the round."""
    clients = [
        c.model_copy(update={"verdict": evaluate_client(policy, c)})
        for c in report.clients
    ]
    counts: dict[str, int] = {}
    fired: dict[str, int] = {}
    for c in clients:
        assert c.verdict is not None  # set just above
        counts[c.verdict.status] = counts.get(c.verdict.status, 0) + 1
        for rule in dict.fromkeys(f.rule for f in c.verdict.fired):
            fired[rule] = fired.get(rule, 0) + 1
    verdict = RoundVerdict(
        status=worst([c.verdict.status for c in clients if c.verdict]),
        policy=policy.name,
        policy_sha256=policy.sha256,
        clients=counts,
        rules_fired=fired,
    )
    return report.model_copy(update={"clients": clients, "verdict": verdict})
