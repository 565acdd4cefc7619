"""Round wall time with the audit over without, 10 clients, same run.

Each round, 10 simulated hospitals train in this process (plain SGD on their
share of real Fashion-MNIST images, MLP 784-64-10) and reply with Flower
messages built as a ClientApp would, through ``fl_audit.client.audit_mod``.
One run aggregates with FedAvg alone; a second with FedAvg wrapped in
``AuditStrategy`` (analytic FC attack, capacity bounds, reports written),
inline or on the process backend (background rounds). A round's wall time
is the clients' training plus ``aggregate_train``; clients train one after
another here, on the same two cores the audit uses, so a background audit
that slows training shows in the figures. The target of the issue is a
ratio <= 1.10.

Run: ``.venv/bin/python bench/audit_overhead.py [--rounds 3] [--clients 10]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fl_audit import AuditConfig  # noqa: E402
from fl_audit.client import audit_mod, describe_training  # noqa: E402
from fl_audit.data import load_samples, partition  # noqa: E402
from fl_audit.strategies import AuditStrategy  # noqa: E402
from tests.flower_fakes import QuietFedAvg, arrays_of, context, metadata  # noqa: E402

torch.set_num_threads(1)
logging.getLogger("flwr").setLevel(logging.WARNING)


def client_round(model, x, y, ctx, batch, steps, lr):
    """One hospital's round, as its ClientApp would run it."""
    instruction = Message(
        content=RecordDict(
            {
                "arrays": arrays_of(model.state_dict()),
                "config": ConfigRecord({"lr": lr}),
            }
        ),
        metadata=metadata(0),
    )

    def train(msg, c):
        local = copy.deepcopy(model)
        opt = torch.optim.SGD(local.parameters(), lr=lr)
        for s in range(steps):
            idx = torch.arange(s * batch, (s + 1) * batch) % len(x)
            opt.zero_grad()
            nn.functional.cross_entropy(local(x[idx]), y[idx]).backward()
            opt.step()
        describe_training(
            c,
            batch_size=batch,
            local_steps=steps,
            num_examples=min(len(x), batch * steps),
            optimizer="sgd",
            lr=lr,
            input_shape=(1, 28, 28),
            input_range=(0.0, 1.0),
        )
        content = RecordDict(
            {
                "arrays": arrays_of(local.state_dict()),
                "metrics": MetricRecord({"num-examples": batch * steps}),
            }
        )
        return Message(
            content=content, metadata=metadata(1 + c.node_config["partition-id"])
        )

    return audit_mod(instruction, ctx, train)


def measure(
    backend: str,
    clients: int,
    rounds: int,
    batch: int,
    steps: int,
    workers: int = 2,
    repeats: int = 1,
) -> dict[str, float]:
    """Mean round time (training + aggregate_train) without and with the audit.

    Each repeat runs ``rounds`` plain rounds, then ``rounds`` audited ones
    (each block after one warm-up round, so a background audit that slows
    the next round's training shows in its figures), then drains the audit's
    remaining work, timed apart. The ratio is the median over repeats of the
    audited over the plain block, so a change in the machine's load during
    the run moves both sides of one repeat alike; the last repeat is
    followed by one more plain block, averaged into its plain time.
    """
    data = load_samples("fashion_mnist", max(2000, 16 * clients), seed=0)
    shares = partition(data.labels, clients, alpha=0.5, min_size=batch * steps, seed=0)
    torch.manual_seed(0)
    start = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    contexts = [context(i) for i in range(clients)]
    out = Path(tempfile.mkdtemp(prefix=f"fl-audit-{backend}-"))
    cfg = AuditConfig(
        output_dir=out, backend=backend, workers=workers, input_range=(0.0, 1.0)
    )
    audited = AuditStrategy(
        QuietFedAvg(), model=start, input_shape=(1, 28, 28), config=cfg
    )
    next_round = [1]

    def run(strategy, audit: bool) -> float:
        model = copy.deepcopy(start)
        elapsed = 0.0
        for r in range(0, rounds + 1):  # round 0 warms up
            server_round = next_round[0]
            next_round[0] += 1
            t0 = time.perf_counter()
            replies = [
                client_round(
                    model,
                    data.inputs[s],
                    data.labels[s],
                    contexts[i],
                    batch,
                    steps,
                    0.05,
                )
                for i, s in enumerate(shares)
            ]
            if audit:
                strategy.configure_train(
                    server_round,
                    arrays_of(model.state_dict()),
                    ConfigRecord({"lr": 0.05}),
                    None,
                )
            else:
                for m in replies:  # what clients without the mod would send
                    m.content.pop("fl-audit.meta", None)
            arrays, _ = strategy.aggregate_train(server_round, replies)
            model.load_state_dict(arrays.to_torch_state_dict())
            if r:
                elapsed += time.perf_counter() - t0
        return elapsed / rounds

    plains, audits, ratios, drain = [], [], [], 0.0
    for i in range(repeats):
        plain = run(FedAvg(), audit=False)
        with_audit = run(audited, audit=True)
        t0 = time.perf_counter()
        audited.wait(3600)
        drain += time.perf_counter() - t0
        if i == repeats - 1:
            plain = (plain + run(FedAvg(), audit=False)) / 2
        plains.append(plain)
        audits.append(with_audit)
        ratios.append(with_audit / plain)
    audited.auditor.runner.close()
    certified = sum(
        a.certified
        for rep in audited.reports.values()
        for c in rep.clients
        for a in c.attacks
    )
    return {
        "plain": statistics.median(plains),
        "audit": statistics.median(audits),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "drain": drain,
        "certified": certified,
        "audited": sum(len(rep.clients) for rep in audited.reports.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    columns = (
        "clients' round",
        "backend",
        "round s, FedAvg",
        "round s, with audit",
        "ratio",
        "drain s",
        "certified / audited",
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for batch, steps in ((1, 1), (8, 1), (8, 4)):
        for backend in ("inline", "process"):
            f = measure(backend, args.clients, args.rounds, batch, steps)
            ratio = f["ratio"]
            print(
                f"| B={batch}, {steps} step(s) | {backend} | {f['plain']:.3f} | "
                f"{f['audit']:.3f} | {ratio:.2f} | {f['drain']:.1f} | "
                f"{f['certified']} / {f['audited']} |"
            )


if __name__ == "__main__":
    main()
