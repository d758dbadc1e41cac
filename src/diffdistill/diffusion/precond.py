"""Preconditioning (Karras et al. 2022, "EDM", Table 1): D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)).

    EDM ("Ours"): c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²), c_noise = ¼·ln σ
    VP (Song et al. 2021, DDPM++): c_skip = 1, c_out = −σ, c_in = 1/√(σ² + 1), c_noise = (M − 1)·σ⁻¹(σ)
    VE (Song et al. 2021, NCSN++): c_skip = 1, c_out = σ,  c_in = 1,           c_noise = ln(½σ)
    flow matching (rectified flow, SD3/FLUX; ``FlowPrecond``): c_in = 1/(1+σ), c_noise = 1000·σ/(1+σ), and
        velocity c_skip = 1/(1+σ), c_out = −σ/(1+σ);  x₀ c_skip = 0, c_out = 1;  ε c_skip = 1, c_out = −σ

A *Denoiser* is any module ``D(x, sigma, labels=None) -> x0_hat`` (fp32 at the boundary) that also carries
``img_channels``, ``img_resolution``, ``label_dim``, ``sigma_min`` and ``sigma_max``. Teachers, students and fake
score networks are all Denoisers. ``sigma_min``/``sigma_max`` are the *sampling* bounds: EDM's generate.py clips its
[0.002, 80] Karras grid to the network's supported range, and so do the VP/VE classes here.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import UserError
from .condition import Condition


@runtime_checkable
class Denoiser(Protocol):
    img_channels: int
    img_resolution: int
    label_dim: int
    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        ...


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """Return (c_skip, c_out, c_in, c_noise) of EDM for a tensor of noise levels."""
    s2, d2 = sigma ** 2, sigma_data ** 2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Precond(nn.Module):
    """Wrap a raw network ``F(x_in, c_noise, class_labels)`` into a denoiser D(x; σ); subclasses give the four
    coefficients. The raw network is ``self.model`` so state-dict keys match NVlabs/edm's preconditioners
    (``model.enc.8x8_conv.weight`` ...). ``img_resolution`` is 0 for flat (2-D point) data. ``sigma_data`` is the
    data std the training losses weight with (EDM's λ(σ)); VP/VE keep it for that use only."""

    kind = "base"
    # Set on denoisers conditioned on embeddings (text-to-image adapters): the per-sample field shapes of the
    # `Condition` they take (``Condition.signature``); None for unconditional and class-conditional ones.
    embedding_signature: Optional[dict] = None
    # Set where one sample is not (C,), (C, R, R): e.g. video latents (C, F, H, W) or non-square latents.
    fixed_sample_shape: Optional[tuple] = None

    def __init__(self, model: nn.Module, img_channels: int, img_resolution: int = 0, label_dim: int = 0,
                 sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.model = model
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for a [B] tensor of noise levels."""
        raise NotImplementedError

    def family(self) -> str:
        """The teacher family in a few words (printed at the start of a distillation), e.g. 'EDM (σ_d 0.5)',
        'VP (ε)', 'flow (velocity)'."""
        return {"edm": "EDM", "vp": "VP (ε-prediction)",
                "ve": "VE (score / ε)"}.get(self.kind, self.kind)

    def precond_config(self) -> dict:
        """Keyword arguments that rebuild this preconditioner (stored as ``net_config['precond_kwargs']``)."""
        return {}

    def timestep_sigmas(self) -> Optional[torch.Tensor]:
        """σ_t of the network's own discrete training timesteps t = 0..T−1 (float64, CPU; increasing), for
        networks trained on such a table (DDPM-family diffusers schedulers: σ_t = √((1 − ᾱ_t)/ᾱ_t)); None for
        networks trained on a continuous σ (EDM, VP, VE, flow matching). Recipes that address noise levels as the
        teacher's own timesteps read it (``teacher_timestep_sigmas``)."""
        return None

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) of this network's own training objective, on the x₀ error ‖D − x‖²: 1/c_out(σ)², i.e. unit weight
        on the error of the raw output F (EDM §5, Eq. 8: the weighting that makes the effective training target
        uniform). It is EDM's λ for EDM networks, the ε-MSE for ε-prediction (VP, DDPM: 1/σ²), the v-MSE for
        v-prediction ((1 + σ²)/σ²) and the plain x₀-MSE for x₀-prediction (1)."""
        return 1 / self.coefficients(sigma)[1].square()

    def output_gain(self, sigma: float) -> float:
        """|c_out(σ)|: how much an error of the raw output F is amplified in D(x; σ) — ≤ σ_d for EDM networks at
        every σ, < 1 for v-prediction, 1 for x₀-prediction, but σ itself for ε-prediction (so a one-step output
        D(σ_max·z; σ_max) of an ε-network multiplies every error of ε̂ by σ_max)."""
        return float(torch.as_tensor(self.coefficients(torch.tensor([float(sigma)]))[1]).abs().reshape(-1)[0])

    @property
    def sample_shape(self) -> tuple:
        """Shape of one sample: (C, H, W) for images, (C,) for flat data (or ``fixed_sample_shape``)."""
        if self.fixed_sample_shape is not None:
            return tuple(self.fixed_sample_shape)
        if self.img_resolution:
            return (self.img_channels, self.img_resolution, self.img_resolution)
        return (self.img_channels,)

    def forward(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None,
                return_bottleneck: bool = False, bottleneck_only: bool = False):
        """D(x; σ). With ``return_bottleneck=True`` returns ``(D, features)``, where ``features`` are the raw
        network's bottleneck activations (SongUNet: the last encoder output; MLP: the last hidden layer), e.g. for
        a GAN discriminator head on a fake-score network (DMD2); ``bottleneck_only=True`` returns the features
        alone (the same values) without computing D.
        The boundary is float32; a network converted to float64 (``.double()``: the exactness tests) runs in
        float64 throughout."""
        dt = self.compute_dtype()
        x = x.to(dt)
        sigma = torch.as_tensor(sigma, dtype=dt, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if isinstance(labels, Condition):
            if self.embedding_signature is None:
                raise ValueError("this denoiser is not conditioned on embeddings: pass "
                                 + ("one-hot labels" if self.label_dim else "no condition"))
            labels = labels.to(x.device, dt)
        elif self.embedding_signature is not None:
            raise ValueError("this denoiser is conditioned on embeddings: pass a Condition (diffusion/condition.py)")
        elif self.label_dim:
            if labels is None:
                raise ValueError("this denoiser is class-conditional: pass labels (one-hot, shape [B, label_dim])")
            labels = labels.to(dt).reshape(-1, self.label_dim)
        else:
            labels = None
        c_skip, c_out, c_in, c_noise = (torch.as_tensor(c, dtype=dt, device=x.device).expand(sigma.shape)
                                        for c in self.coefficients(sigma))
        bshape = (-1,) + (1,) * (x.ndim - 1)
        if bottleneck_only:
            return self.model(c_in.reshape(bshape) * x, c_noise, labels, bottleneck_only=True)
        if return_bottleneck:
            F_x, feats = self.model(c_in.reshape(bshape) * x, c_noise, labels, return_bottleneck=True)
        else:
            F_x = self.model(c_in.reshape(bshape) * x, c_noise, labels)
        D = c_skip.reshape(bshape) * x + c_out.reshape(bshape) * F_x.to(dt)
        return (D, feats) if return_bottleneck else D

    def compute_dtype(self) -> torch.dtype:
        """float32, or float64 when the network's parameters are float64."""
        p = next(self.model.parameters(), None)
        return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


MAX_OUTPUT_GAIN = 2.5   # SiD's σ_init (sid_train.py:95): the one-step input noise level of its generator


def teacher_timestep_sigmas(teacher, what: str) -> torch.Tensor:
    """The teacher's training-timestep σ table (``Precond.timestep_sigmas``), or a UserError naming ``what`` (the
    option that asked for it) when the teacher has none."""
    table = teacher.timestep_sigmas() if hasattr(teacher, "timestep_sigmas") else None
    if table is None:
        family = teacher.family() if hasattr(teacher, "family") else type(teacher).__name__
        raise UserError(f"{what} reads the teacher's own DDPM timestep table, and this teacher ({family}) is trained "
                        f"on a continuous σ and has none: use a DDPM-family teacher (SD1.x/2.x, SDXL), or leave "
                        f"that option at its default")
    return table


def conditioned_sigma_max(teacher, max_gain: float = MAX_OUTPUT_GAIN) -> float:
    """The highest input noise level ≤ the teacher's σ_max at which a student initialised from the teacher has a
    one-step output D(σ·z; σ) whose error is amplified at most ``max_gain``× the error of the raw network output
    (|c_out(σ)| ≤ max_gain, ``Precond.output_gain``).

    EDM, v- and x₀-prediction teachers have |c_out| ≤ 1 everywhere, so this is their σ_max — DMD/DMD2's official
    input. An ε-prediction teacher (DDPM, VP, Stable Diffusion) has |c_out| = σ: at σ_max = 80 every error of ε̂ is
    multiplied by 80 and the student starts far off the data's scale (the teacher's own one-step output spans
    −15..22 on data in [−1, 1] for a DDPM digits UNet), so its ceiling becomes σ = 2.5, where the gain is that of
    the noise level SiD and Diff-Instruct feed their one-step generators (σ_init 2.5 and 1.0)."""
    hi, lo = float(teacher.sigma_max), float(teacher.sigma_min)
    gain = getattr(teacher, "output_gain", None)
    if gain is None or gain(hi) <= max_gain:
        return hi
    for _ in range(60):   # |c_out| increases with σ for every preconditioning here: bisect in ln σ
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if gain(mid) <= max_gain else (lo, mid)
    return lo


def gain_matched_lr_factor(teacher, sigma: float, sigma_data: float = 0.5) -> float:
    """min(1, |c_out(σ)| of an EDM network with σ_d = 0.5 / the teacher's |c_out(σ)|): the factor that makes an
    optimizer step move a student's one-step output D(σ·z; σ) as far as it moves an EDM student's, for which the
    methods' learning rates (official and presets) were set. 1 for EDM teachers; 1/5 for an ε-teacher at σ = 2.5
    (gain 2.5 against 0.49)."""
    gain = getattr(teacher, "output_gain", None)
    if gain is None:
        return 1.0
    s = float(sigma)
    ratio = s * sigma_data / (s * s + sigma_data ** 2) ** 0.5 / max(gain(s), 1e-12)
    return 1.0 if ratio > 1 - 1e-6 else ratio   # exactly 1 for an EDM teacher (its gain is computed in float32)


class EDMPrecond(Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1 "Ours"; σ_d = 0.5 by default)."""

    kind = "edm"

    def coefficients(self, sigma):
        return edm_coefficients(sigma, self.sigma_data)

    def loss_weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2   # = 1/c_out², EDM's form


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """VP noise level at time t ∈ (0, 1]: σ(t) = √(exp(½β_d t² + β_min t) − 1) (EDM Table 1, VP column)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return ((0.5 * beta_d * t ** 2 + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """Inverse of `vp_sigma`: t(σ) = (√(β_min² + 2β_d ln(1 + σ²)) − β_min) / β_d."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d


def vp_coefficients(sigma: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000):
    """VP preconditioning (EDM Table 1, VP column): c_skip = 1, c_out = −σ, c_in = 1/√(σ² + 1),
    c_noise = (M − 1)·t(σ): the network predicts the noise ε, fed the VP-scaled input x/√(1 + σ²) and the DDPM
    timestep on a 0..M−1 scale."""
    return (torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(),
            (M - 1) * vp_sigma_inv(sigma, beta_d, beta_min))


def ve_coefficients(sigma: torch.Tensor):
    """VE preconditioning (EDM Table 1, VE column): c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(½σ)."""
    return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class VPPrecond(Precond):
    """Variance-preserving preconditioning of Song et al. (2021) as parameterised in EDM: β_d = 19.9, β_min = 0.1,
    M = 1000, ε_t = 1e-5 (the official defaults). The network supports σ ∈ [σ(ε_t), σ(1)] ≈ [0.001, 152]; the
    sampling bounds default to that range clipped to EDM's [0.002, 80]."""

    kind = "vp"

    def __init__(self, model: nn.Module, img_channels: int, img_resolution: int = 0, label_dim: int = 0,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 sigma_data: float = 0.5, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None):
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        lo, hi = float(vp_sigma(epsilon_t, beta_d, beta_min)), float(vp_sigma(1.0, beta_d, beta_min))
        super().__init__(model, img_channels, img_resolution, label_dim, sigma_data,
                         max(0.002, lo) if sigma_min is None else sigma_min,
                         min(80.0, hi) if sigma_max is None else sigma_max)

    def coefficients(self, sigma):
        return vp_coefficients(sigma, self.beta_d, self.beta_min, self.M)

    def precond_config(self) -> dict:
        return {"beta_d": self.beta_d, "beta_min": self.beta_min, "M": self.M, "epsilon_t": self.epsilon_t}


class VEPrecond(Precond):
    """Variance-exploding preconditioning of Song et al. (2021) as parameterised in EDM; the network supports
    σ ∈ [0.02, 100] (official defaults), so sampling uses [0.02, 80]."""

    kind = "ve"

    def __init__(self, model: nn.Module, img_channels: int, img_resolution: int = 0, label_dim: int = 0,
                 sigma_data: float = 0.5, sigma_min: float = 0.02, sigma_max: float = 80.0):
        super().__init__(model, img_channels, img_resolution, label_dim, sigma_data, sigma_min, sigma_max)

    def coefficients(self, sigma):
        return ve_coefficients(sigma)


# ------------------------------------------------------------------------------------------------ flow matching
def flow_sigma(t) -> torch.Tensor:
    """σ of flow time t ∈ [0, 1): σ = t/(1 − t). Flow matching interpolates x_t = (1 − t)·x₀ + t·ε; dividing by
    (1 − t) gives x_t/(1 − t) = x₀ + t/(1 − t)·ε = x₀ + σε, the σ-space (variance-exploding) point of EDM."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return t / (1 - t)


def flow_time(sigma) -> torch.Tensor:
    """Inverse of `flow_sigma`: t = σ/(1 + σ) (t → 1 as σ → ∞)."""
    sigma = torch.as_tensor(sigma)
    return sigma / (1 + sigma)


def shift_sigma(sigma, shift: float) -> torch.Tensor:
    """SD3's time shift t′ = s·t/(1 + (s − 1)·t) (Esser et al. 2024, Eq. 23; diffusers
    ``FlowMatchEulerDiscreteScheduler(shift=s)``) in σ-space: σ′ = t′/(1 − t′) = s·t/(1 + (s − 1)t − s·t) =
    s·t/(1 − t) = s·σ — a shift is a constant multiplier of the noise level. The resolution-dependent dynamic shift
    of FLUX (``time_shift`` with exponent 1: t′ = e^μ/(e^μ + 1/t − 1)) is the same map with s = e^μ."""
    return torch.as_tensor(sigma) * float(shift)


FLOW_PREDICTIONS = ("velocity", "x0", "epsilon")


def flow_coefficients(sigma: torch.Tensor, prediction: str = "velocity", time_scale: float = 1000.0):
    """(c_skip, c_out, c_in, c_noise) of a flow-matching network F(x_t, t) in σ-space, x_σ = x₀ + σε:

    the network sees x_t = (1 − t)·x_σ = x_σ/(1 + σ)  →  c_in = 1/(1 + σ), c_noise = time_scale·t, t = σ/(1 + σ);
    velocity v = ε − x₀ (rectified flow, SD3, FLUX): x_t − t·v = (1 − t)x₀ + tε − tε + t·x₀ = x₀, so
        D = x_σ/(1 + σ) − σ/(1 + σ)·v̂                    (c_skip = 1/(1 + σ), c_out = −σ/(1 + σ));
    x₀-prediction: D = x̂₀ (c_skip = 0, c_out = 1); ε-prediction: x₀ = (x_t − t·ε)/(1 − t) = x_σ − σε
        (c_skip = 1, c_out = −σ).
    ``time_scale``: 1000 where the network was trained on timesteps t·1000 (diffusers' flow schedulers,
    num_train_timesteps = 1000), 1 where it takes t itself."""
    t = sigma / (1 + sigma)
    c_in, c_noise = 1 / (1 + sigma), time_scale * t
    if prediction == "velocity":
        return 1 / (1 + sigma), -t, c_in, c_noise
    if prediction == "x0":
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, c_noise
    if prediction == "epsilon":
        return torch.ones_like(sigma), -sigma, c_in, c_noise
    raise ValueError(f"flow prediction must be one of {FLOW_PREDICTIONS}, got {prediction!r}")


class FlowPrecond(Precond):
    """Flow-matching (rectified-flow) network in σ-space (`flow_coefficients`). Its own training loss,
    ``loss_weight`` = 1/c_out² on the x₀ error, is exactly the velocity MSE ‖v̂ − (ε − x₀)‖² for velocity networks
    (D − x₀ = c_out·(v̂ − v)). The sampling bounds default to EDM's [0.002, 80] (t ∈ [0.002, 0.988]); a t_max of
    0.999 is σ_max = 999."""

    kind = "flow"

    def __init__(self, model: nn.Module, img_channels: int, img_resolution: int = 0, label_dim: int = 0,
                 prediction: str = "velocity", time_scale: float = 1000.0, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        if prediction not in FLOW_PREDICTIONS:
            raise UserError(f"net.precond_kwargs.prediction: a flow network predicts one of "
                            f"{', '.join(FLOW_PREDICTIONS)}; got {prediction!r}: set one of these")
        self.prediction, self.time_scale = prediction, float(time_scale)
        super().__init__(model, img_channels, img_resolution, label_dim, sigma_data, sigma_min, sigma_max)

    def coefficients(self, sigma):
        return flow_coefficients(sigma, self.prediction, self.time_scale)

    def family(self) -> str:
        return f"flow ({self.prediction}, timestep ×{self.time_scale:g})"

    def precond_config(self) -> dict:
        return {"prediction": self.prediction, "time_scale": self.time_scale}


PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "flow": FlowPrecond}
