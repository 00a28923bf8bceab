"""What the Cellpose 3 and Cellpose-SAM (cellpose 4) adapters share: seeding, the torch device, the probability of
cellpose's cell probability output. torch is imported only when called (both adapters' envs have it)."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's random number generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def torch_device():
    """The GPU when torch sees one, the CPU otherwise."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function of cellpose's cell probability logits, float32, without overflow warnings."""
    x = np.asarray(x, np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)
