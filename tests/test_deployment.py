"""A real Flower deployment on loopback: SuperLink, three SuperNodes, flwr run.

Every process is started here and stopped by pid, with timeouts throughout,
so the test cannot hang CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_audit.report import RoundReport, RunSummary

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "federated-hospitals"
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@pytest.mark.skipif(
    not (BIN / "flower-superlink").exists(), reason="flwr CLI not installed"
)
def test_audit_runs_in_a_real_deployment(tmp_path):
    # Arrange: SuperLink and three SuperNodes on loopback, insecure, free ports
    link, *nodes = _free_ports(4)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.deploy]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    out = tmp_path / "reports"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(EXAMPLE),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> None:
        log = (logs / f"{name}.log").open("w")
        procs.append(
            subprocess.Popen(
                args,
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link),
                "--database",
                str(tmp_path / "state.db"),
            ],
        )
        _wait_for_port(link, 60)
        for i, port in enumerate(nodes):
            start(
                f"supernode-{i}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={i} num-partitions=3",
                ],
            )

        # Act: the hospitals app with the audit, one round, through flwr run
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(EXAMPLE),
                "deploy",
                "--stream",
                "--run-config",
                f'num-server-rounds=1 audit.output-dir="{out}"',
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(15)

    # Assert: the run finished and the audit reported all three hospitals
    detail = (
        run.stdout[-2000:]
        + run.stderr[-2000:]
        + (logs / "superlink.log").read_text()[-2000:]
    )
    assert run.returncode == 0, detail
    summary = RunSummary.model_validate_json((out / "summary.json").read_text())
    assert [r.round for r in summary.rounds] == [1], detail
    report = RoundReport.model_validate_json((out / "round-0001.json").read_text())
    assert sorted(c.partition_id for c in report.clients) == [0, 1, 2]
    assert all(c.attacks[0].certified == 1 for c in report.clients)
    assert all(p.poll() is not None for p in procs)
    shutil.rmtree(home, ignore_errors=True)
