"""Round reports built by hand from the pydantic models, for policy and page tests.

Capacity reports are real (:func:`fl_audit.bounds.analyze` on small models);
attack outcomes and scores are set to the numbers a test needs.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from torch import nn

from fl_audit.bounds import CapacityReport, analyze
from fl_audit.report import (
    AttackOutcome,
    ClientAudit,
    ClientMetadata,
    GroundTruthScore,
    ReportWriter,
    RoundReport,
    RunSettings,
)

START = datetime(2026, 1, 1, tzinfo=UTC)


@functools.lru_cache(maxsize=32)
def mlp_capacity(
    h: int = 64, batch_size: int | None = 1, d: int = 64
) -> CapacityReport:
    """A real capacity report of an MLP ``d -> h -> 4``."""
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 4))
    return analyze(model, (d,), batch_size=batch_size)


@functools.lru_cache(maxsize=8)
def conv_capacity(filters: int = 8) -> CapacityReport:
    """A real capacity report of a small CNN on 1x8x8 inputs."""
    model = nn.Sequential(
        nn.Conv2d(1, filters, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(filters * 64, 4),
    )  # fmt: skip
    return analyze(model, (1, 8, 8), batch_size=1)


def score(max_psnr: float, n: int = 1) -> GroundTruthScore:
    psnr = [max_psnr] + [10.0] * (n - 1)
    return GroundTruthScore(
        num_true=n,
        data_range=1.0,
        recovered_30db=sum(p >= 30 for p in psnr),
        recovered_60db=sum(p >= 60 for p in psnr),
        median_psnr=sorted(psnr)[n // 2],
        max_psnr=max_psnr,
        psnr=psnr,
        ssim=[None] * n,
        correlation=[None] * n,
    )


def outcome(**kw: Any) -> AttackOutcome:
    base: dict[str, Any] = {
        "attack": "analytic_fc",
        "status": "completed",
        "recovered": 0,
        "certified": 0,
    }
    return AttackOutcome(**{**base, **kw})


def client(
    name: str = "partition-0",
    *,
    capacity: CapacityReport | None = None,
    attacks: list[AttackOutcome] | None = None,
    batch_size: int | None = 1,
    local_steps: int | None = 1,
    num_examples: int | None = None,
    kind: str = "update",
    **kw: Any,
) -> ClientAudit:
    cap = mlp_capacity(64, batch_size) if capacity is None else capacity
    part = int(name.rsplit("-", 1)[-1]) if name[-1].isdigit() else None
    return ClientAudit(
        client=name,
        node_id=1,
        partition_id=part,
        update_kind=kind,  # type: ignore[arg-type]
        metadata=ClientMetadata(
            partition_id=part,
            batch_size=batch_size,
            local_steps=local_steps,
            num_examples=num_examples if num_examples is not None else batch_size,
        ),
        metadata_from_client=True,
        capacity=cap,
        risk=cap.risk,
        attacks=attacks if attacks is not None else [outcome()],
        ground_truth_used=False,
        **kw,
    )


def settings(simulation: bool = True, shape: list[int] | None = None) -> RunSettings:
    return RunSettings(
        fl_audit_version="test",
        model="Sequential",
        input_shape=shape or [64],
        strategy="FedAvg",
        attacks=[{"name": "analytic_fc", "options": {}}],
        simulation=simulation,
        allow_ground_truth=simulation,
    )


def round_report(
    server_round: int, clients: list[ClientAudit], *, simulation: bool = True,
    shape: list[int] | None = None,
) -> RoundReport:  # fmt: skip
    t0 = START + timedelta(minutes=server_round)
    return RoundReport(
        round=server_round,
        started_at=t0,
        finished_at=t0 + timedelta(seconds=2),
        settings=settings(simulation, shape),
        clients=clients,
    )


def write_run(folder: Path, rounds: list[RoundReport]) -> Path:
    writer = ReportWriter(folder)
    for r in rounds:
        writer.write_round(r)
    return folder
