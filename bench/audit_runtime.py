"""100 clients a round on the process and Ray backends: do rounds wait, and
does the audit stream?

Part 1, rounds. Each round 100 simulated hospitals train in this process
(one SGD step of batch 8 on their share of real Fashion-MNIST, MLP
784-64-10) and reply through ``audit_mod``; the server aggregates with
FedAvg alone, then with FedAvg wrapped in ``AuditStrategy`` (analytic FC
attack, background audit). The round time is the clients' training plus
``aggregate_train``; the audit's remaining work is drained at the end and
reported apart. Target: round time with audit over without <= 1.10.

Part 2, memory. Peak resident memory of the process while the audit runs,
over what it held before, for 1 client and for 100 (inline backend, each in
a fresh subprocess, three times; medians). Target: 100 clients <= 2x one
client.

Run: ``.venv/bin/python bench/audit_runtime.py [--rounds 3] [--clients 100]
[--workers 1] [--repeats 3]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from flwr.app import ConfigRecord  # noqa: E402
from torch import nn  # noqa: E402

from bench.audit_overhead import client_round, measure  # noqa: E402
from fl_audit import AuditConfig  # noqa: E402
from fl_audit.data import load_samples, partition  # noqa: E402
from fl_audit.strategies import AuditStrategy  # noqa: E402
from tests.flower_fakes import QuietFedAvg, arrays_of, context  # noqa: E402

torch.set_num_threads(1)
logging.getLogger("flwr").setLevel(logging.WARNING)
BATCH, STEPS = 8, 1


def _setup(clients: int):
    data = load_samples("fashion_mnist", max(2000, clients * 16), seed=0)
    shares = partition(data.labels, clients, alpha=0.5, min_size=BATCH * STEPS, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    return data, shares, model


def _replies(model, data, shares, contexts):
    return [
        client_round(
            model, data.inputs[s], data.labels[s], contexts[i], BATCH, STEPS, 0.05
        )
        for i, s in enumerate(shares)
    ]


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(clients: int) -> dict:
    """Peak RSS increase while one round of ``clients`` is audited (inline)."""
    data, shares, model = _setup(clients)
    contexts = [context(i) for i in range(clients)]
    replies = _replies(model, data, shares, contexts)
    out = Path(tempfile.mkdtemp(prefix="fl-audit-mem-"))
    audit = AuditStrategy(
        QuietFedAvg(),
        model=model,
        input_shape=(1, 28, 28),
        config=AuditConfig(output_dir=out, input_range=(0.0, 1.0)),
    )
    audit.configure_train(
        1, arrays_of(model.state_dict()), ConfigRecord({"lr": 0.05}), None
    )
    # Warm up torch, scipy and the bounds on one client first.
    AuditStrategy(
        QuietFedAvg(),
        model=model,
        input_shape=(1, 28, 28),
        config=AuditConfig(output_dir=out / "warm"),
    ).auditor.audit_client(
        1,
        {k: v.numpy() for k, v in model.state_dict().items()},
        audit_update_of(replies[0]),
    )
    base, peak = _rss_mib(), [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    audit.aggregate_train(1, replies)
    stop.set()
    sampler.join()
    return {
        "clients": clients,
        "base_mib": base,
        "peak_increase_mib": max(0.0, peak[0] - base),
    }


def audit_update_of(reply):
    from fl_audit.strategies.message import _update

    return _update(reply, 1, None, None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="audit workers")
    parser.add_argument(
        "--repeats", type=int, default=3, help="plain/audited block pairs"
    )
    parser.add_argument("--memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(memory(args.memory)))
        return

    columns = (
        "backend",
        "clients",
        "rounds",
        "round s, FedAvg",
        "round s, with audit",
        "ratio: median (each repeat)",
        "drain s",
        "clients audited",
    )
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in ("process", "ray"):
        f = measure(
            backend,
            args.clients,
            args.rounds,
            BATCH,
            STEPS,
            args.workers,
            repeats=args.repeats,
        )
        each = ", ".join(f"{r:.2f}" for r in f["ratios"])
        print(
            f"| {backend} | {args.clients} | {args.rounds} | {f['plain']:.2f} | "
            f"{f['audit']:.2f} | {f['ratio']:.2f} ({each}) | {f['drain']:.1f} | "
            f"{f['audited']} |",
            flush=True,
        )

    print()
    print("| clients | peak RSS increase MiB: median (each run) |")
    print("|---|---|")
    figures = {}
    for n in (1, args.clients):
        # Three fresh processes each: the one-client figure is ~10 MiB and
        # moves by a few MiB from run to run; the median is reported.
        runs = []
        for _ in range(3):
            proc = subprocess.run(
                [sys.executable, __file__, "--memory", str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            last = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.append(last["peak_increase_mib"])
        figures[n] = statistics.median(runs)
        each = ", ".join(f"{r:.1f}" for r in runs)
        print(f"| {n} | {figures[n]:.1f} ({each}) |")
    one, many = (figures[n] for n in (1, args.clients))
    print(f"\nratio {args.clients} clients / 1 client: {many / max(one, 1e-9):.2f}")


if __name__ == "__main__":
    main()
