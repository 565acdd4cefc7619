"""The coordinating server: FedAvg wrapped in fl-audit's AuditStrategy."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fl_audit import AuditConfig
from fl_audit.strategies import AuditStrategy
from hospitals import task


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The server app; ``overrides`` sit over the run config (see run.py)."""
    extra = dict(overrides or {})
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, {**context.run_config, **extra})

    return server


def main(grid: Grid, run_config: Mapping[str, Any]) -> None:
    """Train with FedAvg for the configured rounds, audited every round."""
    audit_log = logging.getLogger("fl_audit")
    if not any(isinstance(h, logging.StreamHandler) for h in audit_log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fl-audit %(levelname)s: %(message)s"))
        audit_log.addHandler(handler)
    audit_log.setLevel(logging.INFO)

    cfg = task.settings(run_config)
    model = task.make_model(cfg)
    audit_config = AuditConfig.from_run_config({**task.DEFAULTS, **run_config})
    # Reports go where the run was started from, whatever the app's folder.
    output = Path(audit_config.output_dir).resolve()
    audit_config = audit_config.model_copy(
        update={"output_dir": output, "input_range": (0.0, 1.0)}
    )

    num_nodes = len(list(grid.get_node_ids())) or 1
    fedavg = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    strategy: Strategy = fedavg
    if cfg["enable-audit"]:
        strategy = AuditStrategy(
            fedavg,
            model=model,
            input_shape=task.input_shape(cfg),
            config=audit_config,
        )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
    )


app = make_server_app()
