"""The hospitals' data, model and local training.

Each simulated hospital holds a non-IID share of one real data set that
installs offline (see fl_audit.data): brain MRI slices (``mri``), cell
microscopy tiles (``cells``), stained tissue patches (``tissue``), ECG beats
(``ecg``), or handwritten digits / Fashion-MNIST as the general case. The
shares are drawn with a Dirichlet split over labels.

Digits, Fashion-MNIST and photos carry real labels. MRI, cells, tissue and
ECG come without labels, so their task is a stand-in: the quartile of each
input's mean intensity (4 classes). The audit measures what a client's
update leaks, not how well the model learns, so any supervised task serves.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fl_audit.data import Samples, load_samples, partition

DEFAULTS: dict[str, Any] = {
    "dataset": "mri",
    "model": "mlp",
    "hidden": 64,
    "num-server-rounds": 2,
    "examples-per-hospital": 16,
    "batch-size": 1,
    "local-steps": 1,
    "lr": 0.05,
    "partition-alpha": 0.5,
    "seed": 0,
    "fraction-evaluate": 0.0,
    "enable-audit": True,
    "audit.output-dir": "runs/federated-hospitals",
    "audit.attacks": "analytic_fc",
    "audit.simulation": True,
    "audit.allow-ground-truth": True,
    "audit.send-ground-truth": True,
}
"""The run config of pyproject.toml's ``[tool.flwr.app.config]``."""

DATASETS = ("mri", "cells", "tissue", "ecg", "digits", "fashion_mnist")
MODELS = ("mlp", "cnn")


def settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config over the defaults, checked."""
    merged = {**DEFAULTS, **dict(run_config)}
    problems = []
    if merged["dataset"] not in DATASETS:
        problems.append(f"dataset {merged['dataset']!r} is not one of {DATASETS}")
    if merged["model"] not in MODELS:
        problems.append(f"model {merged['model']!r} is not one of {MODELS}")
    for key in (
        "hidden",
        "num-server-rounds",
        "examples-per-hospital",
        "batch-size",
        "local-steps",
    ):
        if not isinstance(merged[key], int) or merged[key] < 1:
            problems.append(f"{key} must be an int >= 1, got {merged[key]!r}")
    if problems:
        raise ValueError("federated-hospitals run config: " + "; ".join(problems))
    return merged


@functools.lru_cache(maxsize=4)
def _dataset(kind: str, total: int, seed: int) -> Samples:
    # Small kinds (69 MRI slices) give what they hold; hospitals then share less.
    samples = load_samples(kind, total, seed=seed, at_most=True)
    if samples.labels is None:
        # Stand-in task: quartile of the mean intensity.
        means = samples.inputs.flatten(1).mean(1).numpy()
        edges = np.quantile(means, [0.25, 0.5, 0.75])
        labels = torch.from_numpy(np.searchsorted(edges, means).astype(np.int64))
        samples = Samples(
            samples.inputs,
            labels,
            samples.kind,
            samples.description + "; labels: quartile of the mean intensity",
            class_names=("darkest", "dark", "bright", "brightest"),
        )
    return samples


def num_classes(cfg: Mapping[str, Any]) -> int:
    classes = _dataset(cfg["dataset"], *_size_seed(cfg, 1)).num_classes
    assert classes is not None  # every kind has labels here
    return classes


def _size_seed(cfg: Mapping[str, Any], num_partitions: int) -> tuple[int, int]:
    total = cfg["examples-per-hospital"] * max(num_partitions, 1)
    return max(total, 64), int(cfg["seed"])


def hospital_data(
    cfg: Mapping[str, Any], partition_id: int, num_partitions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and labels of one hospital (a non-IID share)."""
    data = _dataset(cfg["dataset"], *_size_seed(cfg, num_partitions))
    assert data.labels is not None
    shares = partition(
        data.labels,
        num_partitions,
        alpha=float(cfg["partition-alpha"]),
        min_size=1,
        seed=int(cfg["seed"]),
    )
    idx = torch.from_numpy(shares[partition_id][: cfg["examples-per-hospital"]])
    return data.inputs[idx], data.labels[idx]


def input_shape(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(_dataset(cfg["dataset"], *_size_seed(cfg, 1)).inputs.shape[1:])


def make_model(cfg: Mapping[str, Any]) -> nn.Module:
    """An MLP (fully-connected first layer) or a small CNN, seeded."""
    torch.manual_seed(int(cfg["seed"]))
    shape = input_shape(cfg)
    classes = num_classes(cfg)
    hidden = int(cfg["hidden"])
    if cfg["model"] == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(shape), hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )
    conv: nn.Module
    if len(shape) == 2:  # (C, L): 1-D signals
        conv = nn.Conv1d(shape[0], 8, kernel_size=5, padding=2)
    else:
        conv = nn.Conv2d(shape[0], 8, kernel_size=5, padding=2)
    return nn.Sequential(
        conv,
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * math.prod(shape[1:]), classes),
    )


def train(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    local_steps: int,
    lr: float,
    server_round: int,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Plain SGD for ``local_steps`` steps; returns the mean loss and the
    examples actually trained on.

    Batches are taken in order, starting where the previous round stopped,
    so every round sees new examples of the hospital's share.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    n = inputs.shape[0]
    start = ((server_round - 1) * batch_size * local_steps) % n
    order = (torch.arange(batch_size * local_steps) + start) % n
    used = torch.unique(order)
    model.train()
    losses = []
    for step in range(local_steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)), inputs[used], labels[used]


def evaluate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
        loss = float(nn.functional.cross_entropy(logits, labels))
        accuracy = float((logits.argmax(1) == labels).float().mean())
    return loss, accuracy
