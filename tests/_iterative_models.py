"""Small models shared by the iterative-attack tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn


class SmallSigmoidCNN(nn.Module):
    """DLG's LeNet shrunk for 8x8 / 1-D inputs: conv-sigmoid twice, then FC."""

    def __init__(self, channels: int, side: int, classes: int = 10, dims: int = 2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.body = nn.Sequential(
            conv(channels, 6, 3, padding=1),
            nn.Sigmoid(),
            conv(6, 6, 3, padding=1, stride=2),
            nn.Sigmoid(),
        )
        out = (side + 1) // 2
        self.fc = nn.Linear(6 * out**dims, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def dlg_init(model: nn.Module, seed: int) -> nn.Module:
    """DLG's U(-0.5, 0.5) weight initialisation, seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    return model


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out  # TupleOut below
    loss = nn.functional.cross_entropy(logits, y)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return dict(zip(names, grads, strict=True))


class SmallReLUCNN(nn.Module):
    """A small ReLU CNN as users train them (PyTorch's default init)."""

    def __init__(self, channels: int, side: int, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8 * ((side + 1) // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class TupleOut(nn.Module):
    """An MLP that returns (logits, features), as many models do."""

    def __init__(self, d: int, h: int, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(d, h), nn.Linear(h, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.relu(self.body(x.flatten(1)))
        return self.head(z), z
