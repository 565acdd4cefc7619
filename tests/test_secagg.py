"""Secure aggregation (SecAgg+) on the legacy API: only the aggregate is audited."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fl_audit.report import RoundReport

APP = Path(__file__).resolve().parent / "apps" / "secagg_app.py"
ROOT = Path(__file__).resolve().parent.parent


def test_secagg_plus_run_is_audited_as_one_aggregate(tmp_path):
    # Arrange: 3 legacy clients, 2 real digits each, SecAgg+ workflow
    env = {
        **os.environ,
        "FL_AUDIT_TEST_OUT": str(tmp_path),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONPATH": os.pathsep.join([str(APP.parent), str(ROOT)]),
    }

    # Act
    proc = subprocess.run(
        [sys.executable, str(APP)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    # Assert: the report says aggregate-only. SecAgg+ quantises each
    # client's weighted update (weight num_examples / max_weight = 0.002
    # here), so the aggregate carries noise of about 3e-4 per entry: it fills
    # every direction of the first-layer gradient, and the rank reads as the
    # layer width, not the 6 inputs behind it
    assert proc.returncode == 0 and (tmp_path / "done.npy").exists(), proc.stderr[
        -3000:
    ]
    report = RoundReport.model_validate_json((tmp_path / "round-0001.json").read_text())
    assert report.aggregate_only
    assert any("secure aggregation" in n for n in report.notes)
    (client,) = report.clients
    assert client.client == "aggregate" and client.update_kind == "aggregate"
    (fc,) = client.attacks
    assert fc.status == "completed" and fc.certified == 0
    assert fc.batch_size_estimate == 16
