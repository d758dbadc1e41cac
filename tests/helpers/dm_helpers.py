"""Small teachers and contexts for the distribution-matching tests (DMD, DMD2, Diff-Instruct)."""

from __future__ import annotations

import torch
from torch import nn

from diffdistill.methods.base import MethodContext
from diffdistill.nets.factory import build_denoiser

MLP_CFG = {"arch": "mlp", "img_channels": 2, "img_resolution": 0, "label_dim": 0, "sigma_data": 0.5,
           "kwargs": {"hidden": 32, "depth": 2, "emb_dim": 16}}
UNET_CFG = {"arch": "songunet", "img_channels": 1, "img_resolution": 8, "label_dim": 0, "sigma_data": 0.5,
            "kwargs": {"model_channels": 16, "channel_mult": [1, 1], "num_blocks": 1, "attn_resolutions": [],
                       "dropout": 0.0}}


def tiny_teacher(cfg=MLP_CFG, label_dim=0, seed=0, **kwargs):
    """A frozen random Denoiser whose output layer is not zero (so D is not the trivial Gaussian denoiser)."""
    torch.manual_seed(seed)
    cfg = dict(cfg, label_dim=label_dim, kwargs=dict(cfg["kwargs"], **kwargs))
    net = build_denoiser(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("out.weight", "aux_conv.weight")):
                p.normal_(0, 0.1)
    return net.eval().requires_grad_(False), cfg


def make_ctx(teacher, cfg, batch_size=16, seed=0):
    return MethodContext(device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                         batch_size=batch_size, net_config=cfg, teacher=teacher, teacher_path="mem",
                         num_classes=cfg.get("label_dim", 0))


def grads(module):
    return [p.grad for p in module.parameters()]


def all_none(module):
    return all(g is None for g in grads(module))


def any_nonzero(module):
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads(module))


class Recorder(nn.Module):
    """Wraps a Denoiser and records (sigma, labels, kwargs) of each call."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []
        for k in ("img_channels", "img_resolution", "label_dim", "sigma_min", "sigma_max", "sigma_data"):
            setattr(self, k, getattr(net, k))

    @property
    def sample_shape(self):
        return self.net.sample_shape

    def forward(self, x, sigma, labels=None, **kw):
        self.calls.append({"x": x.detach().clone(), "sigma": torch.as_tensor(sigma).detach().clone(),
                           "labels": labels, "kw": kw, "grad": torch.is_grad_enabled()})
        return self.net(x, sigma, labels, **kw)


class GaussianDenoiser(nn.Module):
    """Exact denoiser of N(mean, c²I): D(x; σ) = mean + c²/(c²+σ²)·(x − mean). ``mean`` is a parameter."""

    def __init__(self, mean, c: float, dim: int = 2):
        super().__init__()
        self.mean = nn.Parameter(torch.as_tensor(mean, dtype=torch.float32).expand(dim).clone())
        self.c = c
        self.img_channels, self.img_resolution, self.label_dim = dim, 0, 0
        self.sigma_min, self.sigma_max, self.sigma_data = 0.002, 80.0, 0.5

    @property
    def sample_shape(self):
        return (self.img_channels,)

    def forward(self, x, sigma, labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1)
        return self.mean + self.c ** 2 / (self.c ** 2 + s ** 2) * (x - self.mean)


def ema_states(state: dict) -> dict:
    """The EMA weights of a method state: the trainer-owned ``emas`` (one per key), or a method's own
    ``extra.ema`` (methods that still update their EMA themselves)."""
    return state["emas"] if state.get("emas") else {"ema": state["extra"]["ema"]}


def assert_same_ema_method_state(a: dict, b: dict) -> None:
    """Bitwise equality of two EMA-generator methods' states (EMA, generator and fake-score weights)."""
    ea, eb = ema_states(a), ema_states(b)
    assert ea.keys() == eb.keys()
    for key in ea:
        for k, v in ea[key].items():
            assert torch.equal(v, eb[key][k]), (key, k)
    for net in ("generator", "fake_score"):
        for k, v in a["nets"][net].items():
            assert torch.equal(v, b["nets"][net][k]), (net, k)


def run_full_and_resumed(make_trainer, tmp_path, steps: int = 10, split: int = 5):
    """Train ``steps`` in one go, and ``split`` then resume (``resume='auto'``) to ``steps`` in another run
    directory; asserts the resumed run really continued (one log line per 5 steps: [split, steps]). Returns
    (full, resumed) trainers. ``make_trainer(out, steps, resume=None)`` builds a Trainer logging every 5 steps."""
    import json
    full = make_trainer(tmp_path / "full", steps)
    full.run()
    make_trainer(tmp_path / "split", split).run()
    resumed = make_trainer(tmp_path / "split", steps, resume="auto")
    resumed.run()
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert logged == [split, steps], logged
    return full, resumed


def flat_tensors(obj, prefix: str = "", numbers: bool = False) -> dict:
    """{dotted path: tensor} of every tensor in a nested state (dicts, lists, tuples); ``numbers`` also takes ints
    and floats, as float64 scalars."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}.{k}", numbers))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}[{i}]", numbers))
    elif numbers and isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = torch.tensor(float(obj), dtype=torch.float64)
    return out
