"""GPU-throughput options on the CPU: bf16 autocast, channels-last, torch.compile. The same code runs on CUDA;
these tests check the paths are wired and change nothing they should not (weights stay fp32, results match)."""

import pytest
import torch

from conftest import tiny_points_cfg
from diffdistill.errors import UserError
from diffdistill.train.trainer import Trainer


def _digits_cfg(out, **run):
    from diffdistill.config import resolve
    return resolve("digits", flags={"run": {"out": str(out), "steps": 3, "batch_size": 8, "log_every": 1,
                                            "ckpt_every": 0, "sample_every": 0, "progress": False, **run},
                                    "net": {"kwargs": {"model_channels": 16, "num_blocks": 1}}})


def test_bf16_autocast_runs_forward_in_bf16_and_keeps_fp32_weights(tmp_path):
    tr = Trainer(tiny_points_cfg(tmp_path, steps=5, precision="bf16"))
    seen = []
    first_linear = next(m for m in tr.method.nets["net"].modules() if type(m).__name__ == "Linear")
    first_linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    logs = tr.run()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in tr.method.nets["net"].parameters())
    assert all(torch.isfinite(torch.tensor(v)) for k, v in logs.items() if k.startswith("loss/"))


def test_fp32_default_has_no_bf16(tmp_path):
    tr = Trainer(tiny_points_cfg(tmp_path, steps=2))
    seen = []
    next(m for m in tr.method.nets["net"].modules() if type(m).__name__ == "Linear").register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    tr.run()
    assert set(seen) == {torch.float32}


def test_channels_last_gives_the_same_training(tmp_path):
    a = Trainer(_digits_cfg(tmp_path / "a"))
    b = Trainer(_digits_cfg(tmp_path / "b", channels_last=True))
    w = next(p for p in b.method.nets["net"].parameters() if p.ndim == 4 and p.shape[-1] == 3 and p.shape[1] > 1)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    a.run()
    b.run()
    for (k, p), q in zip(a.method.nets["net"].state_dict().items(), b.method.nets["net"].state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), k


def test_bad_precision_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="precision"):
        Trainer(tiny_points_cfg(tmp_path, precision="fp8"))
    with pytest.raises(UserError, match="compile"):
        Trainer(tiny_points_cfg(tmp_path, compile="yes"))


@pytest.mark.slow
def test_compile_trains_and_keeps_checkpoint_names(tmp_path):
    """torch.compile (inductor needs a C++ compiler on CPU): same parameter names, close results."""
    a = Trainer(tiny_points_cfg(tmp_path / "a", steps=3))
    b = Trainer(tiny_points_cfg(tmp_path / "b", steps=3, compile=True))
    a.run()
    b.run()
    sa, sb = a.method.nets["net"].state_dict(), b.method.nets["net"].state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-4, rtol=1e-3), k
