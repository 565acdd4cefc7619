"""Render time and size of the HTML report for 100 rounds x 20 clients.

Builds synthetic round reports with the pydantic models (real capacity
reports of an MLP 1024-64-4 for batch sizes 1 to 128, attack outcomes and
ground-truth scores that vary by client and round), writes them with
:class:`~fl_audit.report.ReportWriter`, then times ``load_run`` (read and
judge with the default policy) and ``render_html``. With ``--images`` every
client-round also gets a 1x32x32 reconstruction and its true input, so the
page embeds 2,000 thumbnail pairs (the run is marked as a simulation).

    python bench/report_render.py [--rounds 100] [--clients 20] [--images]

Goal (issue 5): under 10 s and under 20 MB.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fl_audit.bounds import analyze  # noqa: E402
from fl_audit.html_report import load_run, render_html  # noqa: E402
from fl_audit.report import (  # noqa: E402
    AttackOutcome,
    ClientAudit,
    ClientMetadata,
    GroundTruthScore,
    ReportWriter,
    RoundReport,
    RunSettings,
)

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def build_run(folder: Path, rounds: int, clients: int, images: bool) -> None:
    torch.set_num_threads(1)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    caps = {b: analyze(model, (1, 32, 32), batch_size=b) for b in BATCHES}
    settings = RunSettings(
        fl_audit_version="bench",
        model="Sequential",
        input_shape=[1, 32, 32],
        strategy="FedAvg",
        attacks=[{"name": "analytic_fc", "options": {}}],
        simulation=images,
        allow_ground_truth=True,
    )
    writer = ReportWriter(folder)
    rng = np.random.default_rng(0)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for r in range(1, rounds + 1):
        audits = []
        for c in range(clients):
            b = BATCHES[(c + r) % len(BATCHES)]
            certified = b if b <= 8 else int(rng.integers(0, 3))
            psnr = [float(v) for v in rng.uniform(10, 160 if b <= 8 else 40, size=b)]
            outcome = AttackOutcome(
                attack="analytic_fc",
                status="completed",
                recovered=max(certified, min(b, 64)),
                certified=certified,
                batch_size_estimate=min(b, 64),
                residual=float(rng.uniform(0, 1e-3)) if b > 1 else 0.0,
                elapsed_s=0.1,
                ground_truth=GroundTruthScore(
                    num_true=b,
                    data_range=1.0,
                    recovered_30db=sum(p >= 30 for p in psnr),
                    recovered_60db=sum(p >= 60 for p in psnr),
                    median_psnr=float(np.median(psnr)),
                    max_psnr=max(psnr),
                    psnr=psnr,
                    ssim=[None] * b,
                    correlation=[None] * b,
                ),
            )
            client = f"partition-{c}"
            truth_file = None
            if images:
                x = rng.uniform(0, 1, size=(1, 1, 32, 32))  # (1, C, H, W)
                noisy = np.clip(x + rng.normal(0, 0.05, size=x.shape), 0, 1)
                truth_file = writer.save_ground_truth(r, client, x)
                recon = folder / f"round-{r:04d}" / f"{client}.analytic_fc.npz"
                np.savez_compressed(recon, inputs=noisy, certified=np.ones(1, bool))
                outcome.reconstruction_file = f"round-{r:04d}/{recon.name}"
                outcome.ground_truth = outcome.ground_truth.model_copy(  # type: ignore[union-attr]
                    update={"num_true": 1, "psnr": psnr[:1], "ssim": [None],
                            "correlation": [None]}
                )  # fmt: skip
            audits.append(
                ClientAudit(
                    client=client,
                    node_id=1000 + c,
                    partition_id=c,
                    update_kind="update",
                    metadata=ClientMetadata(
                        partition_id=c, batch_size=b, local_steps=1, num_examples=b
                    ),
                    metadata_from_client=True,
                    capacity=caps[b],
                    risk=caps[b].risk,
                    attacks=[outcome],
                    ground_truth_used=True,
                    ground_truth_file=truth_file,
                )
            )
        t0 = start + timedelta(minutes=r)
        writer.write_round(
            RoundReport(
                round=r,
                started_at=t0,
                finished_at=t0 + timedelta(seconds=30),
                settings=settings,
                clients=audits,
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--images", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fl-audit-bench-") as tmp:
        folder = Path(tmp) / "run"
        build_run(folder, args.rounds, args.clients, args.images)
        t0 = time.perf_counter()
        run = load_run(folder)
        t1 = time.perf_counter()
        path = render_html(run, Path(tmp) / "report.html")
        t2 = time.perf_counter()
        size = path.stat().st_size
    total = t2 - t0
    print(
        f"report {args.rounds} rounds x {args.clients} clients"
        f"{' with thumbnails' if args.images else ''}: load+judge {t1 - t0:.2f} s, "
        f"render {t2 - t1:.2f} s, total {total:.2f} s ({total / 10:.2f} of the 10 s "
        f"goal), {size / 1e6:.2f} MB ({size / 20e6:.2f} of the 20 MB goal), "
        f"verdict {run.status}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
