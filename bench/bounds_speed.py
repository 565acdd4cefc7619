"""How long ``fl_audit.bounds.analyze`` takes on a ResNet-18-sized model.

The model is ResNet-18 built by hand with torch.nn (11.7 M parameters,
3x224x224 input, 7x7 stride-2 first convolution with 64 filters). The
first-layer operator is 802816 x 150528, so the exact rank declines and the
counts are reported. The issue's target is under one second. For scale, the
script also times one full forward pass of a single image.

Second, the exact ranks behind a ReLU on real inputs: ``analyze`` with 8
photos as the probe on Conv2d(3, 16, 5) -> ReLU -> Linear (3x32x32, 3072
unknowns; ``conv_exact_rank_relu`` with its kernel-gradient rows), per probe
input, against NumPy's SVD rank of one probe's restricted operator (the
textbook route, same tolerance).

Run: ``.venv/bin/python bench/bounds_speed.py``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fl_audit.attacks._chain import conv_operator  # noqa: E402
from fl_audit.bounds import RANK_RTOL, analyze  # noqa: E402
from fl_audit.data import load_samples  # noqa: E402

torch.set_num_threads(1)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def main(repeats: int = 7) -> None:
    model = resnet18()
    params = sum(p.numel() for p in model.parameters())
    shape = (3, 224, 224)

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        report = analyze(model, shape, batch_size=32, local_examples=500)
        times.append(time.perf_counter() - start)

    with torch.no_grad():
        start = time.perf_counter()
        model.eval()(torch.zeros(1, *shape))
        forward = time.perf_counter() - start

    rank = report.verdict("conv_exact_rank")
    print(f"model: ResNet-18 by hand, {params / 1e6:.1f} M parameters, input {shape}")
    print(
        f"first layer: {report.first_layer.path} {report.first_layer.module_type} "
        f"out {tuple(report.first_layer.out_shape or ())}"
    )
    for v in report.verdicts:
        print(
            f"  {v.name:<16} required {v.required!s:>7} actual {v.actual!s:>7} "
            f"holds {v.holds}"
        )
    print(f"  exact rank: {rank.note}")
    print(f"risk: {report.risk}")
    print(
        f"analyze(): median {statistics.median(times):.3f} s, "
        f"max {max(times):.3f} s over {repeats} runs (1 thread); "
        f"first call {times[0]:.3f} s"
    )
    print(
        f"one forward pass of one image: {forward:.3f} s; analyze/forward = "
        f"{statistics.median(times) / forward:.2f}"
    )
    print(f"under one second: {max(times) < 1.0}")
    relu_probe_ranks()


def relu_probe_ranks(count: int = 8) -> None:
    """Per-probe cost of ``conv_exact_rank_relu`` against an SVD rank."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 5)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(16 * 28 * 28, 10))
    model = model.double()
    probe = load_samples("photos", count, seed=1).inputs.double()

    start = time.perf_counter()
    report = analyze(model, (3, 32, 32), batch_size=1, probe=probe)
    elapsed = time.perf_counter() - start
    v = report.verdict("conv_exact_rank_relu")

    with torch.no_grad():
        out = conv(probe[:1]).reshape(-1).numpy()
    kept = conv_operator(conv, (3, 32, 32)).A[np.flatnonzero(out > 0)].toarray()
    start = time.perf_counter()
    svd_rank = int(np.linalg.matrix_rank(kept, tol=None, rtol=RANK_RTOL))
    svd = time.perf_counter() - start

    print(
        f"conv_exact_rank_relu, Conv2d(3, 16, 5) on {count} photos: ranks "
        f"{v.quantities['probe_ranks']}, with kernel rows "
        f"{v.quantities['probe_ranks_kernel']}, holds {v.holds}"
    )
    print(
        f"analyze() with the probe: {elapsed:.2f} s, {elapsed / count:.2f} s per "
        f"probe input; SVD rank of one probe's {kept.shape[0]} x {kept.shape[1]} "
        f"restricted operator: {svd:.2f} s (rank {svd_rank}); per probe / SVD = "
        f"{elapsed / count / svd:.2f}"
    )


if __name__ == "__main__":
    main()
