import os
import sys
from pathlib import Path

import pytest
import torch

# One thread each: results are reproducible and the suite does not oversubscribe CI's two cores.
torch.set_num_threads(1)
os.environ.setdefault("DIFFDISTILL_CACHE", str(Path(__file__).resolve().parent.parent / ".cache-test"))


def tiny_points_cfg(out, steps=40, **run):
    """A small ring8 teacher config (MLP 64×2) for fast trainer tests."""
    from diffdistill.config import resolve
    cfg = resolve("ring8", flags={"run": {"out": str(out), "steps": steps, "batch_size": 64, "log_every": 10,
                                          "ckpt_every": 0, "sample_every": 0, "progress": False, **run},
                                  "net": {"kwargs": {"hidden": 64, "depth": 2}},
                                  "data": {"n": 2000}})
    return cfg


@pytest.fixture
def python_exe():
    return sys.executable
