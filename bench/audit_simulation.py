"""Round wall time with the audit over without, in a real Flower simulation.

Runs the federated-hospitals example (examples/federated-hospitals/run.py)
on Flower's simulation engine (Ray) with 10 hospitals, once with
``enable-audit=false`` and once with the audit (analytic FC attack, bounds,
policy, reports), same settings, one after the other. Flower logs how long
the strategy's rounds took ("Strategy execution finished in ..."), Ray's
start-up excluded; the ratio of the two is the figure. Target: <= 1.10.

Run: ``.venv/bin/python bench/audit_simulation.py [--hospitals 10]
[--rounds 3] [--set batch-size=8 ...]``
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "examples" / "federated-hospitals" / "run.py"
FINISHED = re.compile(r"Strategy execution finished in ([0-9.]+)s")


def run(audit: bool, hospitals: int, rounds: int, extra: list[str]) -> float:
    out = Path(tempfile.mkdtemp(prefix="fl-audit-sim-"))
    args = [
        sys.executable,
        str(RUN),
        "--hospitals",
        str(hospitals),
        "--rounds",
        str(rounds),
        "--output",
        str(out),
        "--set",
        f"enable-audit={'true' if audit else 'false'}",
    ]
    for item in extra:
        args += ["--set", item]
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    found = FINISHED.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    plain = run(False, args.hospitals, args.rounds, args.set)
    audited = run(True, args.hospitals, args.rounds, args.set)
    settings = " ".join(args.set) or "defaults (batch 1, one step, MRI, MLP)"
    columns = (
        "hospitals",
        "rounds",
        "settings",
        "s per round, FedAvg",
        "s per round, audited",
        "ratio",
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    per_round = (plain / args.rounds, audited / args.rounds)
    print(
        f"| {args.hospitals} | {args.rounds} | {settings} | {per_round[0]:.2f} | "
        f"{per_round[1]:.2f} | {audited / plain:.2f} |"
    )


if __name__ == "__main__":
    main()
