"""EL — Embedding Loss (Ying, Chen, Li, Xu & Xiao, "Efficient Diffusion Distillation via Embedding Loss", arXiv
2604.22379, 2026), a supplement that composes with every method that trains a generator from noise.

**What is from the paper** (its abstract; no further details or code are public): EL is a Maximum Mean Discrepancy
between generator samples and *real data*, computed in the feature embeddings of *a diverse set of randomly
initialised networks*, added to the loss of an existing distillation method (DMD, Diff-Instruct, consistency
models); the paper reports CIFAR-10 FID 1.475 (unconditional) / 1.380 (conditional) and up to 80 % fewer iterations.

**What is this project's proposal** (every choice is an option of ``ELOptions``):

    L_G = L_base + λ_EL · (1/|S|)·Σ_{(k,l)∈S} MMD²_u(φ_{k,l}(x_g), φ_{k,l}(x_r)),

* φ_{k,l}: layer l of random network k; K = 4 frozen networks seeded once (``seed``), no BatchNorm, activations
  ReLU / LeakyReLU(0.2) / GELU / tanh (points: ReLU / tanh / sin / LeakyReLU), Kaiming (or orthogonal) weights.
  Images: blocks of [conv3×3 → activation → avg-pool 2] (2 blocks of width 64 for 8×8 images, 3 blocks of widths
  64/128/128 from 16 px up), features = the global average pool of every block's output. Points: MLPs 2→64→64,
  features = both hidden layers. Option ``resample_every`` R redraws the networks every R steps (DM style).
  Option ``arch`` (the ablation of the network family): ``conv`` (images' default), ``mlp`` (images flattened into
  MLPs of widths 256, 256 — no spatial prior; points' default) or ``pixels`` (no network: the MMD of the raw
  flattened samples, the control that asks whether random features matter at all; ``count`` is then 1).
* MMD²_u is the unbiased estimator (``unbiased=False``: the biased one) with the 5-bandwidth RBF mixture
  k(a, b) = Σ_{s∈{¼,½,1,2,4}} exp(−‖a − b‖²/(2·s·h)), h = sg(median pairwise squared distance of the pooled
  real ∪ generated features of that layer; above 128 + 128 samples, the median of 128 of each); kernels 'linear'
  (aᵀb) and 'poly' ((aᵀb/d + 1)³) are options.
* Real features are computed without grad; the real batch is the trainer's batch (m = n); conditional generators
  get the real batch's labels. x_g is the generator phase's sample (CD: an extra one-step sample f_θ(T·z, T)).
* EL runs only in the method's ``generator_phase``. **It makes data-free methods (SiD, DMD, Diff-Instruct) read
  real data**: the trainer then builds a data loader (``needs_data``).
* Weight (the default, ``mode='relative'`` with weight 3, is this project's calibration; the design proposal was a
  fixed 1.0): ``mode='fixed'`` uses λ_EL = ``weight``; ``mode='relative'`` uses λ_eff = weight·‖∇L_base‖/‖∇L_EL‖ (so
  the EL gradient is ``weight`` times the base gradient in norm), refreshed every ``ratio_every`` steps (λ_eff = 0
  until the base gradient is first non-zero: DMD2's first step has a fake score equal to the teacher). The
  gradient-norm ratio ‖∇λL_EL‖/‖∇L_base‖ is logged as ``el/grad_ratio`` in both modes. Deviation from that proposal,
  which measures the ratio on x_g: it is measured on the generator's parameters, where it is defined for every
  method (CD's base loss does not pass through its one-step sample x_g).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import UserError
from ..options import option, Options
from ..train import distributed as dist
from .registry import _load_all, METHODS


SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
IMAGE_ACTIVATIONS = ("relu", "leaky_relu", "gelu", "tanh")
POINT_ACTIVATIONS = ("relu", "tanh", "sin", "leaky_relu")
KERNELS = ("rbf", "linear", "poly")
ARCHS = ("conv", "mlp", "pixels")
MODES = ("fixed", "relative")
# Calibrated on the digits teacher (benchmarks/el_efficiency.py, README "Embedding loss"): in relative mode an EL
# gradient 3× the base gradient's norm helped DMD2 (no GAN) and Diff-Instruct most; 10 was worse for DMD2. The proposal's
# fixed weight 1.0 is ≈ 100× the base gradient for DMD2 on digits (the reference trial: worse).
DEFAULT_WEIGHT = 3.0


# ------------------------------------------------------------------------------------------------ MMD
def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_i − b_j‖² for a [n, d] and b [m, d] (the Gram expansion, clamped at 0), shape [n, m]."""
    d = a.square().sum(1, keepdim=True) + b.square().sum(1)[None, :] - 2 * a @ b.T
    return d.clamp_min(0)


def rbf_bandwidth(d2: torch.Tensor, max_points: int = 256) -> torch.Tensor:
    """sg(median of the off-diagonal squared distances) of a pooled set, from its first ``max_points`` rows and
    columns (exact when the pooled set is no larger; the pooled set is ordered [generated; real], so callers pass
    interleaved halves — see ``kernel_matrix``). The lower median for an even count; ≥ 1e-12."""
    n = min(d2.shape[0], max_points)
    sub = d2.detach()[:n, :n]
    off = ~torch.eye(n, dtype=torch.bool, device=d2.device)
    return sub[off].median().clamp_min(1e-12) if n > 1 else torch.ones((), device=d2.device)


def rbf_mixture(d2: torch.Tensor, h: torch.Tensor, scales=SCALES) -> torch.Tensor:
    """Σ_s exp(−d²/(2·s·h)). When the scales are a doubling sequence (the default ¼ … 4) one exp at the largest scale
    and repeated squaring give all terms: exp(−d²/(2·s/2·h)) = exp(−d²/(2·s·h))²."""
    s = sorted((float(v) for v in scales), reverse=True)
    if len(s) > 1 and all(a == 2 * b for a, b in zip(s, s[1:])):
        u = torch.exp(-d2 / (2 * s[0] * h))
        total = u
        for _ in s[1:]:
            u = u * u
            total = total + u
        return total
    return sum(torch.exp(-d2 / (2 * v * h)) for v in s)


def kernel_matrix(z: torch.Tensor, kernel: str = "rbf", scales=SCALES, bandwidth: float | None = None,
                  n_first: int | None = None) -> torch.Tensor:
    """k(z_i, z_j) for all pairs of the pooled set z [N, d]:

    * 'rbf': Σ_s exp(−‖a − b‖²/(2·s·h)) with h = ``bandwidth`` or sg(median of the off-diagonal squared distances)
      (the diagonal is set to exactly Σ_s 1). With more than 256 points the median is taken over 128 points of
      each set (``n_first`` = size of the first set), which keeps its cost flat in the batch size;
    * 'linear': aᵀb;  * 'poly': (aᵀb/d + 1)³ (KID's kernel)."""
    if kernel == "linear":
        return z @ z.T
    if kernel == "poly":
        return (z @ z.T / z.shape[1] + 1) ** 3
    if kernel != "rbf":
        raise UserError(f"unknown EL kernel {kernel!r}; choose one of: {', '.join(KERNELS)}")
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    d2 = pairwise_sq_dists(z, z).masked_fill(eye, 0.0)
    if bandwidth is not None:
        h = torch.as_tensor(float(bandwidth), device=z.device)
    elif n <= 256 or n_first is None:
        h = rbf_bandwidth(d2, n)
    else:
        k1, k2 = min(n_first, 128), min(n - n_first, 128)
        idx = torch.cat([torch.arange(k1), n_first + torch.arange(k2)]).to(z.device)
        h = rbf_bandwidth(d2.detach()[idx][:, idx], len(idx))
    return rbf_mixture(d2, h, scales)


def mmd2(x: torch.Tensor, y: torch.Tensor, kernel: str = "rbf", scales=SCALES, unbiased: bool = True,
         bandwidth: float | None = None) -> torch.Tensor:
    """Squared MMD between samples x [n, d] and y [m, d] (Gretton et al. 2012):

        unbiased: Σ_{i≠i'} k(x_i, x_i')/(n(n−1)) + Σ_{j≠j'} k(y_j, y_j')/(m(m−1)) − 2·Σ_{i,j} k(x_i, y_j)/(nm)
        biased:   the same with the diagonals kept and divided by n², m², nm.

    The unbiased value can be negative (it is ≈ 0 on average for samples of one distribution). The kernel's
    bandwidth comes from the pooled x ∪ y."""
    n, m = x.shape[0], y.shape[0]
    K = kernel_matrix(torch.cat([x, y]), kernel, scales, bandwidth, n_first=n)
    kxx, kyy, kxy = K[:n, :n], K[n:, n:], K[:n, n:]
    if unbiased:
        if n < 2 or m < 2:
            raise UserError("the unbiased MMD estimator needs at least 2 samples per set")
        xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        xx, yy = kxx.mean(), kyy.mean()
    return xx + yy - 2 * kxy.mean()


# ------------------------------------------------------------------------------------------------ random nets
class Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


_ACT = {"relu": (nn.ReLU, "relu", 0.0), "leaky_relu": (lambda: nn.LeakyReLU(0.2), "leaky_relu", 0.2),
        "gelu": (nn.GELU, "relu", 0.0), "tanh": (nn.Tanh, "tanh", 0.0), "sin": (Sin, "linear", 0.0)}


def _init_layer(layer: nn.Module, activation: str, init: str, generator: torch.Generator) -> None:
    """Kaiming-normal (fan-in, the activation's gain) or orthogonal weights; biases U(±1/√fan_in) (PyTorch's
    default range). All draws come from ``generator``, never from the global RNG."""
    _, nonlin, slope = _ACT[activation]
    w = layer.weight
    fan_in = w[0].numel()
    if init == "kaiming":
        nn.init.kaiming_normal_(w, a=slope, mode="fan_in", nonlinearity=nonlin, generator=generator)
    elif init == "orthogonal":
        nn.init.orthogonal_(w, gain=nn.init.calculate_gain(nonlin, slope if nonlin == "leaky_relu" else None),
                            generator=generator)
    else:
        raise UserError(f"unknown EL init {init!r}; choose 'kaiming' or 'orthogonal'")
    nn.init.uniform_(layer.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)


class RandomConvNet(nn.Module):
    """[conv3×3 → activation → avg-pool 2] blocks, no normalisation; returns the global-average-pooled output of
    every block, a list of [B, width_l]."""

    def __init__(self, in_channels: int, widths, activation: str, init: str, generator: torch.Generator):
        super().__init__()
        self.blocks = nn.ModuleList()
        c = in_channels
        for w in widths:
            conv = nn.Conv2d(c, int(w), 3, padding=1)
            _init_layer(conv, activation, init, generator)
            self.blocks.append(nn.Sequential(conv, _ACT[activation][0](), nn.AvgPool2d(2)))
            c = int(w)

    def forward(self, x):
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x.mean(dim=(2, 3)))
        return feats


class RandomMLP(nn.Module):
    """Linear → activation layers, no normalisation; returns every hidden layer, a list of [B, width_l]."""

    def __init__(self, in_features: int, widths, activation: str, init: str, generator: torch.Generator):
        super().__init__()
        self.layers = nn.ModuleList()
        c = in_features
        for w in widths:
            fc = nn.Linear(c, int(w))
            _init_layer(fc, activation, init, generator)
            self.layers.append(nn.Sequential(fc, _ACT[activation][0]()))
            c = int(w)

    def forward(self, x):
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class Pixels(nn.Module):
    """The identity "feature network" of ``arch='pixels'``: one feature map, the flattened sample."""

    def forward(self, x):
        return [x.flatten(1)]


class FlatMLP(RandomMLP):
    """A random MLP on the flattened sample (``arch='mlp'`` for images)."""

    def forward(self, x):
        return super().forward(x.flatten(1))


def default_widths(sample_shape: tuple, arch: str = "conv") -> list[int]:
    """Images: 2 conv blocks of 64 below 16 px (8×8: 8 → 4 → 2), else 64/128/128, or an MLP of 256, 256 on the
    flattened image; points: 64, 64."""
    if len(sample_shape) == 3:
        if arch == "mlp":
            return [256, 256]
        return [64, 64] if sample_shape[-1] < 16 else [64, 128, 128]
    return [64, 64]


def build_feature_nets(sample_shape: tuple, count: int = 4, seed: int = 0, widths=None, activations=None,
                       init: str = "kaiming", arch: str | None = None) -> list[nn.Module]:
    """``count`` frozen random feature networks for samples of ``sample_shape`` ((C, H, W): ConvNets by default,
    (d,): MLPs; ``arch`` picks the family, see the module docstring). Network k uses activation k mod
    len(activations) and a generator seeded with (seed, k), so the set is a pure function of its arguments.
    Returned in eval mode with requires_grad off."""
    if int(count) < 1:
        raise UserError(f"EL needs at least one feature network (el.count), got {count}")
    images = len(sample_shape) == 3
    arch = arch or ("conv" if images else "mlp")
    if arch not in ARCHS:
        raise UserError(f"unknown EL arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if arch == "conv" and not images:
        raise UserError(f"el.arch=conv needs image samples (C, H, W), these have shape {tuple(sample_shape)}; "
                        f"use el.arch=mlp or pixels")
    if arch == "pixels":
        return [Pixels().eval()]
    widths = list(widths) if widths is not None else default_widths(sample_shape, arch)
    acts = list(activations) if activations is not None else list(IMAGE_ACTIVATIONS if images else POINT_ACTIVATIONS)
    bad = [a for a in acts if a not in _ACT]
    if bad or not acts:
        raise UserError(f"unknown EL activation(s) {bad}; choose from: {', '.join(_ACT)}")
    if arch == "conv" and sample_shape[-1] < 2 ** len(widths):
        raise UserError(f"{len(widths)} pooling blocks need images of at least {2 ** len(widths)} px; "
                        f"set el.widths to a shorter list")
    nets = []
    with torch.random.fork_rng(devices=[]):   # the layers' default init draws from the global RNG: keep it intact
        for k in range(int(count)):
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
            act = acts[k % len(acts)]
            net = (RandomConvNet(sample_shape[0], widths, act, init, g) if arch == "conv"
                   else FlatMLP(math.prod(sample_shape), widths, act, init, g))
            nets.append(net.eval().requires_grad_(False))
    return nets


def embed(nets, x: torch.Tensor) -> list[torch.Tensor]:
    """All feature maps φ_{k,l}(x), flattened into one list over (network, layer)."""
    return [f for net in nets for f in net(x)]


def embedding_mmd(nets, x_fake: torch.Tensor, x_real: torch.Tensor, kernel: str = "rbf", scales=SCALES,
                  unbiased: bool = True) -> torch.Tensor:
    """EL's distance: the mean over (network k, layer l) of MMD²(φ_{k,l}(x_fake), φ_{k,l}(x_real)); the real
    features carry no graph, the generated ones keep it."""
    with torch.no_grad():
        real = embed(nets, x_real)
    fake = embed(nets, x_fake)
    return torch.stack([mmd2(f, r, kernel, scales, unbiased) for f, r in zip(fake, real)]).mean()


# ------------------------------------------------------------------------------------------------ supplement
@dataclass
class ELOptions(Options):
    """The ``el`` section (this project's proposal; the paper publishes no code or settings beyond its abstract)."""

    section = "el"
    weight: float = option(DEFAULT_WEIGHT, "EL weight (relative mode: EL gradient = weight × base gradient in norm)",
                           ge=0)
    mode: str = option("relative", "fixed: λ = weight; relative: λ = weight·‖∇L_base‖/‖∇L_EL‖", choices=MODES)
    count: int = option(4, "number of random feature networks", ge=1)
    seed: int = option(0, "seed of the random feature networks", ge=0)
    widths: Optional[list[int]] = option(None, "channel widths per block (null: by data shape)", ge=1)
    activations: Optional[list[str]] = option(None, "one activation per network, cycled (null: by data kind)")
    init: str = option("kaiming", "weight initialisation of the feature networks", choices=("kaiming", "orthogonal"))
    arch: Optional[str] = option(None, "feature network family: conv, mlp (on flattened samples) or pixels (no "
                                       "network; count ignored); null: conv for images, mlp for points",
                                 choices=ARCHS)
    kernel: str = option("rbf", "MMD kernel", choices=KERNELS)
    scales: list[float] = option(list(SCALES), "RBF bandwidth multipliers of the median heuristic", gt=0)
    unbiased: bool = option(True, "unbiased MMD² estimator (false: biased)")
    resample_every: int = option(0, "redraw the feature networks every R steps (0: never)", ge=0)
    ratio_every: int = option(100, "steps between gradient-norm ratio refreshes (0: only the first)", ge=0)


class EmbeddingLoss:
    """The EL supplement for the trainer's ``supplements`` hook: ``applies_to(method, phase)`` is true in the
    method's generator phase (when the weight is not 0), ``loss(method, batch, step, base_loss)`` returns
    (λ·L_EL, logs). Needs real data (``needs_data``). Its state (the relative-mode scale) is checkpointed.

    Its MMD couples every sample of the batch (``couples_batch``), so under gradient accumulation the trainer does
    not sum micro-batch losses but caches gradients: ``batch_gradient`` on the whole batch's generated samples,
    and, in relative mode when the ratio is due, ``weight_from_gradients`` from the two accumulated gradients."""

    name = "el"
    needs_data = True
    couples_batch = True

    def __init__(self, opts: ELOptions | None = None, **overrides):
        self.opts = opts = ELOptions.from_dict(overrides, owner="the embedding loss") if opts is None else opts
        self.weight, self.mode, self.count, self.seed = opts.weight, opts.mode, opts.count, opts.seed
        self.widths, self.activations, self.init, self.kernel = opts.widths, opts.activations, opts.init, opts.kernel
        self.scales, self.unbiased, self.arch = tuple(opts.scales), opts.unbiased, opts.arch
        self.resample_every, self.ratio_every = opts.resample_every, opts.ratio_every
        self._nets, self._nets_key = None, None
        self.scale = None           # relative mode: λ_eff / weight = ‖∇L_base‖/‖∇L_EL‖ at the last refresh
        self.last_refresh = None
        self.last_ratio = None

    # -------------------------------------------------------------------------------------------- pieces
    def feature_nets(self, sample_shape: tuple, step: int = 0, device="cpu") -> list[nn.Module]:
        """The random networks in use at ``step`` (a pure function of seed, shape and, with ``resample_every``,
        the step), cached."""
        epoch = step // self.resample_every if self.resample_every else 0
        key = (tuple(sample_shape), epoch, str(device))
        if self._nets_key != key:
            self._nets = [n.to(device) for n in build_feature_nets(
                tuple(sample_shape), self.count, self.seed * 7919 + epoch, self.widths, self.activations, self.init,
                self.arch)]
            self._nets_key = key
        return self._nets

    def applies_to(self, method, phase) -> bool:
        return self.weight != 0 and phase is not None and phase == getattr(method, "generator_phase", None)

    @staticmethod
    def _norm(grads) -> float:
        sq = sum(float(g.detach().double().square().sum()) for g in grads if g is not None)
        return dist.all_reduce_mean(math.sqrt(sq))

    def _grad_norm(self, loss, params) -> float:
        # this rank's gradient, before any reduction (of the unsharded parameters under FSDP2)
        return self._norm(torch.autograd.grad(loss, dist.autograd_leaves(params), retain_graph=True,
                                              allow_unused=True))

    def fsdp_refusal(self, grad_accum: int) -> str | None:
        """Why run.fsdp is refused with this supplement (None: allowed): under accumulation the trainer keeps the
        coupled loss's parameter gradient apart to weigh it by gradient norms, which sharded (already reduced)
        gradients do not allow."""
        if grad_accum > 1 and self.weight != 0 and (self.mode == "relative" or self.ratio_every):
            return ("with run.grad_accum > 1 the embedding loss's gradient-norm ratio (el.mode=relative or "
                    "el.ratio_every > 0) needs each rank's unreduced gradients; use el.mode=fixed with "
                    "el.ratio_every=0, or run.grad_accum=1")
        return None

    def distance(self, x_g: torch.Tensor, batch, step: int) -> torch.Tensor:
        """L_EL (unweighted) between generated samples ``x_g`` and the first len(x_g) samples of the real batch."""
        if batch is None:
            raise UserError("the embedding loss compares with real data, but the trainer has none: give --data")
        x_r = batch[0][: len(x_g)].to(x_g.device)
        nets = self.feature_nets(tuple(x_g.shape[1:]), step, x_g.device)
        return embedding_mmd(nets, x_g, x_r, self.kernel, self.scales, self.unbiased)

    def ratio_due(self, step: int) -> bool:
        """Whether the gradient-norm ratio is measured at this step (always until relative mode has one)."""
        due = self.ratio_every and (self.last_refresh is None or step - self.last_refresh >= self.ratio_every)
        return bool(due or (self.mode == "relative" and self.scale is None))

    def record_ratio(self, step: int, g_el: float, g_base: float) -> None:
        """A measured pair of gradient norms (‖∇L_EL‖, ‖∇L_base‖) on the generator's parameters."""
        # A zero base gradient (e.g. DMD2's first step, where the fake score still equals the teacher) gives no
        # ratio: measure again at the next generator step.
        if g_el > 0 and g_base > 0 and math.isfinite(g_el) and math.isfinite(g_base):
            self.last_ratio = g_el / g_base
            if self.mode == "relative":
                self.scale = 1.0 / self.last_ratio
            self.last_refresh = step

    def current_weight(self) -> float:
        """λ now: ``weight`` (fixed), or weight·scale (relative; 0 until the first ratio has been measured)."""
        if self.mode == "relative":
            return self.weight * self.scale if self.scale is not None else 0.0
        return self.weight

    def weight_logs(self, lam: float) -> dict:
        logs = {"el/weight": lam}
        if self.last_ratio is not None:
            logs["el/grad_ratio"] = lam * self.last_ratio   # ‖∇ λ·L_EL‖ / ‖∇ L_base‖ at the last measurement
        return logs

    def loss(self, method, batch, step, base_loss=None):
        if batch is None:
            raise UserError("the embedding loss compares with real data, but the trainer has none: give --data")
        x_g, _ = method.generated_batch(batch, step)
        l_el = self.distance(x_g, batch, step)
        logs = {"el/mmd2": float(l_el.detach())}
        if self.ratio_due(step) and base_loss is not None and base_loss.requires_grad:
            params = [p for p in method.trainable_params(method.generator_phase) if p.requires_grad]
            self.record_ratio(step, self._grad_norm(l_el, params), self._grad_norm(base_loss, params))
        lam = self.current_weight()
        logs.update(self.weight_logs(lam))
        return lam * l_el, logs

    # -------------------------------------------------------------------------------------------- accumulation
    def batch_gradient(self, method, x_g: torch.Tensor, batch, step: int):
        """Under gradient accumulation: (L_EL, ∂L_EL/∂x_g, λ or None, logs) for the whole batch's generated samples
        ``x_g`` (every micro-batch's, detached) against the whole real batch. λ is None when the ratio is due this
        step: the trainer then keeps EL's parameter gradient apart and asks ``weight_from_gradients``."""
        x = x_g.detach().requires_grad_(True)
        with torch.enable_grad():
            l_el = self.distance(x, batch, step)
            (grad,) = torch.autograd.grad(l_el, x)
        weight = None if self.ratio_due(step) else self.current_weight()
        return l_el.detach(), grad, weight, {"el/mmd2": float(l_el.detach())}

    def weight_from_gradients(self, step: int, grads, base_grads) -> float:
        """λ from this step's accumulated gradients of L_EL and of the base loss on the generator's parameters
        (the ratio ``loss`` measures with the whole batch in one pass)."""
        self.record_ratio(step, self._norm(grads), self._norm(base_grads))
        return self.current_weight()

    def options(self) -> dict:
        """Every option with its value (what a run's config records, defaults included)."""
        return self.opts.to_dict()

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"scale": self.scale, "last_refresh": self.last_refresh, "last_ratio": self.last_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.last_refresh = state.get("scale"), state.get("last_refresh")
        self.last_ratio = state.get("last_ratio")


# ------------------------------------------------------------------------------------------------ wiring
def methods_taking_el() -> list[str]:
    """Registered methods that train a generator from noise (the ones EL can attach to)."""
    _load_all()
    return sorted(k for k, v in METHODS.items() if getattr(v, "generator_phase", None))


def embedding_loss_from_config(el_cfg: dict | None, method_cls) -> list[EmbeddingLoss]:
    """[EmbeddingLoss] from a config's ``el`` section (``weight`` plus any constructor option), or [] when it is
    absent or its weight is 0; a method without a generator phase is refused, naming the ones that take EL."""
    el_cfg = dict(el_cfg or {})
    if not el_cfg:
        return []
    opts = ELOptions.from_dict(el_cfg, owner="the embedding loss")   # validates before the weight-0 shortcut
    if opts.weight == 0:
        return []
    if not getattr(method_cls, "generator_phase", None):
        raise UserError(f"--el-weight: method {method_cls.name!r} trains no generator from noise, so the embedding "
                        f"loss cannot attach to it; it works with: {', '.join(methods_taking_el())}")
    return [EmbeddingLoss(opts)]
