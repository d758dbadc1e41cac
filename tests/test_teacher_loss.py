"""EDM teacher loss vs a direct computation of Karras et al. (2022) Eq. 2 with λ(σ) = (σ²+σ_d²)/(σσ_d)²."""

import math

import torch

from diffdistill.diffusion.precond import EDMPrecond
from diffdistill.diffusion.losses import edm_loss, edm_loss_weight
from diffdistill.nets.mlp import MLPDenoiserNet
from diffdistill.train.ema import ema_beta


class Affine(torch.nn.Module):
    """F(x_in, c_noise) = a·x_in + b·c_noise: simple enough to write D by hand."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.2))

    def forward(self, x, c_noise, labels=None):
        return self.a * x + self.b * c_noise.reshape(-1, *([1] * (x.ndim - 1)))


def test_weight_formula():
    s = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    assert torch.allclose(edm_loss_weight(s), 1 / s ** 2 + 1 / 0.25)
    assert torch.allclose(edm_loss_weight(torch.tensor([0.5], dtype=torch.float64)), torch.tensor([8.0], dtype=torch.float64))


def test_edm_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64) * 0.5
    n = torch.randn(x.shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.3, 1.0, 5.0, 60.0])
    net = EDMPrecond(Affine(), img_channels=1, img_resolution=2)
    got = edm_loss(net, x.float(), sigma, n.float())
    want = []
    for i in range(5):
        s, sd = float(sigma[i]), 0.5
        c_skip, c_out, c_in = sd ** 2 / (s ** 2 + sd ** 2), s * sd / math.sqrt(s ** 2 + sd ** 2), 1 / math.sqrt(s ** 2 + sd ** 2)
        y = x[i] + s * n[i]
        D = c_skip * y + c_out * (0.3 * c_in * y - 0.2 * math.log(s) / 4)
        lam = (s ** 2 + sd ** 2) / (s * sd) ** 2
        want.append(lam * ((D - x[i]) ** 2).sum())
    assert torch.allclose(got.double(), torch.stack(want), rtol=1e-5)


def test_one_gradient_step_lowers_the_loss():
    torch.manual_seed(0)
    net = EDMPrecond(MLPDenoiserNet(dim=2, hidden=32, depth=2), img_channels=2)
    x = torch.randn(256, 2) * 0.5
    n = torch.randn(256, 2)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(256))
    loss0 = edm_loss(net, x, sigma, n).mean()
    loss0.backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 1e-3 * p.grad
    assert edm_loss(net, x, sigma, n).mean() < loss0


def test_ema_beta_edm_rule():
    # β = 0.5^(B / min(h, ramp·nimg)) with h in images
    assert math.isclose(ema_beta(128, 10**9, 50.0, 0.05), 0.5 ** (128 / 50_000))
    assert math.isclose(ema_beta(128, 12_800, 50.0, 0.05), 0.5 ** (128 / 640))
    assert ema_beta(128, 10, 50.0, None, constant_beta=0.999) == 0.999
