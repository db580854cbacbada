"""Shared test setup: deterministic seeds, one thread per worker (tests run two at a time), tiny configs."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
