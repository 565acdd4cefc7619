"""Round wall time with the audit over without, 10 clients, same run.

Each round, 10 simulated hospitals train in this process (plain SGD on their
share of real Fashion-MNIST images, MLP 784-64-10) and reply with Flower
messages built as a ClientApp would, through ``fl_audit.client.audit_mod``.
The server aggregates with FedAvg alone, then with FedAvg wrapped in
``AuditStrategy`` (analytic FC attack, capacity bounds, reports written);
both see the same replies. A round's wall time is the clients' training plus
the server's aggregation (clients train one after another here, as on one
machine; on a real deployment they train in parallel, which makes the
audit's share larger). The target of the issue is a ratio <= 1.10.

Run: ``.venv/bin/python bench/audit_overhead.py [--rounds 3]``
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


def scenario(batch: int, steps: int, rounds: int, clients: int = 10) -> None:
    data = load_samples("fashion_mnist", 2000, seed=0)
    shares = partition(data.labels, clients, alpha=0.5, min_size=batch * steps, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    contexts = [context(i) for i in range(clients)]
    out = Path(tempfile.mkdtemp(prefix="fl-audit-bench-"))
    audit = AuditStrategy(
        QuietFedAvg(),
        model=model,
        input_shape=(1, 28, 28),
        config=AuditConfig(output_dir=out, input_range=(0.0, 1.0)),
    )
    plain = FedAvg()

    train_s, plain_s, audit_s = [], [], []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        replies = [
            client_round(
                model,
                data.inputs[shares[i]],
                data.labels[shares[i]],
                contexts[i],
                batch,
                steps,
                0.05,
            )
            for i in range(clients)
        ]
        train_s.append(time.perf_counter() - t0)
        twins = copy.deepcopy(replies)
        for m in twins:  # what clients without the mod would send
            m.content.pop("fl-audit.meta", None)

        t0 = time.perf_counter()
        plain.aggregate_train(r, twins)
        plain_s.append(time.perf_counter() - t0)

        audit.configure_train(
            r, arrays_of(model.state_dict()), ConfigRecord({"lr": 0.05}), None
        )
        t0 = time.perf_counter()
        arrays, _ = audit.aggregate_train(r, replies)
        audit_s.append(time.perf_counter() - t0)
        model.load_state_dict(arrays.to_torch_state_dict())

    tr, pl, au = (statistics.median(v) for v in (train_s, plain_s, audit_s))
    certified = sum(
        a.certified
        for rep in audit.reports.values()
        for c in rep.clients
        for a in c.attacks
    )
    print(
        f"| B={batch}, {steps} step(s) | {clients} | {tr:.3f} | {pl:.4f} | {au:.3f} | "
        f"{(tr + au) / (tr + pl):.2f} | {certified} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    columns = (
        "clients' round",
        "clients",
        "training s",
        "FedAvg s",
        "FedAvg+audit s",
        "round ratio",
        "certified",
    )
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    for batch, steps in ((1, 1), (8, 1), (8, 4), (32, 4)):
        scenario(batch, steps, args.rounds)


if __name__ == "__main__":
    main()
