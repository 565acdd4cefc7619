"""Run the federated-hospitals simulation in-process and write its report.

This is the README's main command. It runs the same ServerApp and ClientApp
as ``flwr run examples/federated-hospitals``, on Flower's simulation engine
(Ray), with the settings of pyproject.toml's ``[tool.flwr.app.config]``
overridden from the command line. It ends by writing the HTML compliance
report (``fl-audit report``, default policy) into the report folder::

    python examples/federated-hospitals/run.py --dataset ecg --model cnn \\
        --hospitals 4 --rounds 3 --set batch-size=4 --set local-steps=2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Ray's workers import the app from here as well.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
)

from flwr.simulation import run_simulation  # noqa: E402
from hospitals import task  # noqa: E402
from hospitals.client_app import make_client_app  # noqa: E402
from hospitals.server_app import make_server_app  # noqa: E402

from fl_audit.html_report import load_run, render_html  # noqa: E402
from fl_audit.report import RunSummary  # noqa: E402


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=task.DATASETS)
    parser.add_argument("--model", choices=task.MODELS)
    parser.add_argument("--rounds", type=int, help="server rounds")
    parser.add_argument("--hospitals", type=int, default=3, help="simulated clients")
    parser.add_argument(
        "--output",
        help="report folder (audit.output-dir); default: a new folder per run "
        "under runs/federated-hospitals/",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run-config key, e.g. --set batch-size=4",
    )
    args = parser.parse_args(argv)

    overrides: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _value(value)
    for key, value in (
        ("dataset", args.dataset),
        ("model", args.model),
        ("num-server-rounds", args.rounds),
    ):
        if value is not None:
            overrides[key] = value
    if args.output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output = (Path(task.DEFAULTS["audit.output-dir"]) / stamp).resolve()
    else:
        output = Path(args.output).resolve()
    overrides["audit.output-dir"] = str(output)
    task.settings(overrides)  # fail here, not inside the simulation

    run_simulation(
        server_app=make_server_app(overrides),
        client_app=make_client_app(overrides),
        num_supernodes=args.hospitals,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )

    if not task.settings(overrides)["enable-audit"]:
        print("the audit was disabled (enable-audit=false): no report")
        return 0
    summary_file = output / "summary.json"
    if not summary_file.exists():
        print(f"no audit report was written (expected {summary_file})", file=sys.stderr)
        return 1
    summary = RunSummary.model_validate_json(summary_file.read_text())
    print()
    print(f"fl-audit: {len(summary.rounds)} round(s) audited")
    for line in summary.rounds:
        psnr = "-" if line.max_psnr is None else f"{line.max_psnr:.0f} dB"
        print(
            f"  round {line.round}: {line.clients_audited} client(s), "
            f"risk {line.risk}, recovered {line.recovered} "
            f"({line.certified} certified), best PSNR {psnr}"
        )
    print(f"reports: {output}")

    run = load_run(output)
    page = render_html(run)
    print(f"verdict: {run.status.upper()} (policy {run.policy.name!r})")
    print(f"HTML report: {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
