"""Shared test setup: deterministic seeds, one thread per worker (tests run two at a time), tiny configs."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_ops():
    """torch.ops.lmforge_cpu, built for this machine; the test is skipped where the kernels cannot be built."""
    from lmforge.cpu.kernels import cpu_kernels
    ops = cpu_kernels()
    if ops is None:
        pytest.skip("lmforge's CPU kernels cannot be built here (no C++ compiler or ninja)")
    return ops
