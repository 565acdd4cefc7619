"""Shared fixtures: small real-data batches, each loaded once per session.

Tests must not modify the tensors these fixtures return.
"""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits

from fl_audit.data import FASHION_MNIST_DIR, Samples, load_samples

# One compute thread for the whole session: the tests run small tensor ops,
# for which several BLAS/OpenMP threads on two shared cores spin against
# each other (measured: a 0.6 s reconstruction took 98 s under load).
torch.set_num_threads(1)
_ONE_BLAS_THREAD = threadpool_limits(limits=1)

FASHION_MNIST_MISSING = not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
FASHION_MNIST_SKIP = (
    f"Fashion-MNIST is not installed under {FASHION_MNIST_DIR} "
    "(apt-get install dataset-fashion-mnist)"
)


@pytest.fixture(scope="session")
def digits() -> Samples:
    """64 scikit-learn digits, (64, 1, 8, 8) in [0, 1], with labels."""
    return load_samples("digits", 64, seed=0)


@pytest.fixture(scope="session")
def fashion_mnist() -> Samples:
    """64 Fashion-MNIST test images, (64, 1, 28, 28); skips when not installed."""
    if FASHION_MNIST_MISSING:
        pytest.skip(FASHION_MNIST_SKIP)
    return load_samples("fashion_mnist", 64, seed=0)
