"""Suite-wide fixtures: offline hub, seeded RNGs (STYLE G8). Tests never set library globals."""

from __future__ import annotations

import os
import random

import pytest
import torch

# No test may reach a model hub: weights cannot be downloaded on these machines or in CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield
