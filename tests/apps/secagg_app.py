"""A legacy Flower app under SecAgg+, audited by LegacyAuditStrategy.

Used by tests/test_secagg.py through Flower's simulation engine; Ray's
workers import it from this folder.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from torch import nn

from fl_audit import AuditConfig
from fl_audit.data import load_samples
from fl_audit.strategies import LegacyAuditStrategy

CLIENTS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


class Hospital(NumPyClient):
    def __init__(self, partition: int) -> None:
        self.model = make_model()
        data = load_samples("digits", 2 * CLIENTS, seed=3)
        self.x = data.inputs[2 * partition : 2 * partition + 2]
        self.y = data.labels[2 * partition : 2 * partition + 2]

    def fit(self, parameters, config):
        state = dict(zip(self.model.state_dict(), parameters, strict=True))
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        opt.zero_grad()
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        opt.step()
        arrays = [v.detach().numpy() for v in self.model.state_dict().values()]
        return arrays, len(self.x), {}


def client_fn(context: Context):
    return Hospital(int(context.node_config["partition-id"])).to_client()


client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
server_app = ServerApp()


@server_app.main()
def main(grid, context: Context) -> None:
    model = make_model()
    initial = [v.detach().numpy() for v in model.state_dict().values()]
    strategy = LegacyAuditStrategy(
        FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=CLIENTS,
            min_available_clients=CLIENTS,
            initial_parameters=ndarrays_to_parameters(initial),
        ),
        model=model,
        input_shape=(1, 8, 8),
        config=AuditConfig(
            output_dir=os.environ["FL_AUDIT_TEST_OUT"],
            capture_dir=os.environ.get("FL_AUDIT_TEST_CAPTURE") or None,
        ),
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=1), strategy=strategy
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(num_shares=CLIENTS, reconstruction_threshold=2)
    )
    workflow(grid, legacy)


if __name__ == "__main__":
    from flwr.simulation import run_simulation

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=CLIENTS)
    np.save(os.path.join(os.environ["FL_AUDIT_TEST_OUT"], "done.npy"), np.ones(1))
