"""Shared pieces of the score-distillation methods (DMD, DMD2, Diff-Instruct, SiD): a generator and an online
"fake" score network, both initialised from the teacher (``FakeScoreMethod``), and, for DMD and DMD2, the
distribution-matching gradient that pushes the generator's distribution toward the teacher's
(``DistributionMatchingMethod``).

Notation: D_real is the frozen teacher, D_fake the fake-score network trained with a denoising loss on the
generator's own samples, x a generated sample, x_t = x + σε. The score is s = (D − x)/σ², so
s_fake − s_real = (D_fake − D_real)/σ² and every gradient below is written with the denoiser difference.

This module holds only what these methods share (and the shared option blocks ``ScoreDistillOptions`` and
``DMDFamilyOptions``); each method file holds its own losses. The official repositories (tianweiy/DMD2,
pkulwj1994/diff_instruct) are CC BY-NC-SA: nothing here is copied from them; the formulas follow the papers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..diffusion import condition as cond
from ..diffusion.guidance import GuidedDenoiser, guided_denoise, set_guidance, takes_guidance
from ..diffusion.losses import WEIGHTINGS, edm_loss, loss_weight
from ..diffusion.precond import conditioned_sigma_max, teacher_timestep_sigmas
from ..diffusion.schedules import karras_sigmas
from ..errors import UserError
from ..nets.prompt_embedding import PromptEmbedding
from ..options import Options, option
from ..train import distributed as dist
from .base import GainMatchedLROptions, Method, MethodContext, trainable_copy  # noqa: F401 (re-exported)

# Grid-index ranges of DMD/DMD2 (in σ space, so they stay fixed when the model is scaled down).
GRID_SIZE = 1000
DM_T_MIN, DM_T_MAX = 20, 980          # DM gradient: t ~ U{20..980} (0.02T..0.98T)
CRITIC_T_MIN, CRITIC_T_MAX = 0, 999   # fake-score and GAN noise levels: t ~ U{0..999}


# ------------------------------------------------------------------------------------------------ options
FAKE_SCORE_WEIGHTING_DOC = ("λ(σ) of the fake-score loss: 'teacher' = the teacher's own training weighting, "
                            "1/c_out² (EDM teachers: EDM's λ, the official setting; ε-prediction: the ε-MSE of DMD2's "
                            "SD code, sd_guidance.py compute_loss_fake); 'edm' = EDM's λ for any teacher")


NOISE_GRIDS = ("karras", "teacher")
NOISE_GRID_DOC = ("the 1000-point σ grid that the grid indices (dm_t_*, critic_t_*, gan_t_*) and the student's steps "
                  "address: 'karras' = the Karras grid on the teacher's [σ_min, σ_max] (DMD2's EDM code path); "
                  "'teacher' = the teacher's own DDPM training timesteps, index t → σ_t = √((1 − ᾱ_t)/ᾱ_t) of its "
                  "scheduler (DMD2's SD/SDXL code path, sd_guidance.py; DDPM-family teachers only), the student then "
                  "at the teacher's timesteps (1 step: t = 999, its σ_max)")


@dataclass
class GuidanceOptions(Options):
    """Guidance inside score distillation, placed as the papers place it.

    Classifier-free guidance (``guided_denoise``: D_∅ + w·(D_c − D_∅), the null class the all-zero label; 1 = none,
    the official setting for class-conditional EDM teachers). DMD2's SD1.5 recipe guides the real score only
    (``--real_guidance_scale 1.75``, ``--fake_guidance_scale 1``, ε-space, which is the same D-space CFG); SiD-LSG
    guides the real score (κ₄) and the fake score in the generator loss (κ₂ = κ₃), 2 for SD1.5 (run_sid.sh); 0 on
    the fake score is zero-CFG (an unconditional fake score), a negative value anti-CFG.

    Embedded guidance (FLUX.1-dev style: the scale is a network input, ``extra.guidance``, and there is no negative
    pass): ``guidance_embedded`` is the scale written into the teacher's real-score call; the generator and the
    fake score — copies of the teacher, with the same input — get ``guidance_embedded_fake`` (null: the same value,
    so at the start the fake score is the teacher at the same input and D_fake − D_real measures only the
    distributions' gap; FLUX distillations feed their students one fixed guidance value likewise).

    A w-conditioned student (``guidance_student: [w_min, w_max]``, Meng et al. 2023's w-conditioning): each
    generated sample draws its own w ~ U[w_min, w_max]; the generator and the fake score (which must model the
    generator's distribution at that w) receive it as ``extra.guidance`` — natively for a teacher that takes it,
    else through a zero-initialised guidance embedding added to both copies (``net.kwargs.guidance_embed``); the
    real score is guided with the same per-sample w (as input, or CFG). Sampling ``--guidance W`` then feeds W."""

    guidance_real: float = option(1.0, "CFG scale w of the teacher (real score) in the generator loss (DMD2 "
                                       "--real_guidance_scale: 1.75 for SD1.5; SiD-LSG κ4 --cfg_eval_real; 1: none)")
    guidance_fake: float = option(1.0, "CFG scale of the fake score in the generator loss (DMD2 "
                                       "--fake_guidance_scale 1; SiD-LSG κ2 = κ3 --cfg_eval_fake; 0: zero-CFG, "
                                       "< 0: anti-CFG; 1: none)")
    guidance_embedded: Optional[float] = option(None, "a teacher that takes the guidance scale as input (FLUX.1-dev, "
                                                      "extra.guidance): the scale of its real-score call, no null "
                                                      "branch (FluxPipeline's guidance_scale 3.5); null: the "
                                                      "prompts' own extra.guidance")
    guidance_embedded_fake: Optional[float] = option(None, "with guidance_embedded: the extra.guidance of the "
                                                           "generator and the fake score; null: guidance_embedded")
    guidance_student: Optional[tuple[float, float]] = option(None, "[w_min, w_max]: a w-conditioned student, each "
                                                                   "sample's w ~ U[w_min, w_max] fed to the "
                                                                   "generator and fake score and guiding the real "
                                                                   "score; null: off")

    def guided(self) -> bool:
        return (any(getattr(self, f) != 1.0 for f in ("guidance_real", "guidance_fake", "guidance_fake_train")
                    if hasattr(self, f))
                or any(getattr(self, f) is not None for f in ("guidance_embedded", "guidance_embedded_fake",
                                                              "guidance_student")))


@dataclass
class ScoreDistillOptions(GuidanceOptions, GainMatchedLROptions):
    """Options every method of the family has: two optimizers (generator, fake score), the student's step count
    and the fake-score loss's reduction. Defaults: DMD2's ImageNet-64 run (tianweiy/DMD2 ``main/edm/train_edm.py``
    and ``experiments/imagenet/*lr2e-6*.sh``); Diff-Instruct restates its own."""

    lr: float = option(2e-6, "generator learning rate (DMD2 --generator_lr 2e-6, ImageNet-64)", gt=0)
    lr_critic: Optional[float] = option(None, "fake-score (critic) learning rate; null: lr (both official recipes "
                                              "use one rate)", gt=0)
    betas: tuple[float, float] = option((0.9, 0.999), "optimizer β1, β2 (DMD2 train_edm.py: AdamW defaults)",
                                        ge=0, lt=1)
    student_steps: int = option(1, "generator steps at sampling time", ge=1)
    critic_reduction: str = option("mean", "fake-score loss: 'mean' over pixels (DMD2 edm_guidance.py) or 'sum' "
                                           "over pixels, mean over the batch (EDM, Diff-Instruct)",
                                   choices=("mean", "sum"))
    fake_score_weighting: str = option("teacher", FAKE_SCORE_WEIGHTING_DOC, choices=WEIGHTINGS)

    def critic_lr(self) -> float:
        return self.lr if self.lr_critic is None else self.lr_critic


@dataclass
class DMDFamilyOptions(ScoreDistillOptions):
    """The DMD/DMD2 block: AdamW with weight decay, a linear warm-up then a constant rate (DMD2 train_edm.py:
    ``constant_with_warmup``, ``--warmup_step 500``), and the networks' dropout (DMD2 ``main/edm/edm_network.py``
    builds the teacher, fake score and generator with dropout 0)."""

    weight_decay: float = option(0.01, "AdamW weight decay (DMD2 train_edm.py)", ge=0)
    warmup_steps: int = option(500, "linear lr warm-up in iterations, then constant (DMD2 --warmup_step)", ge=0)
    dropout: Optional[float] = option(0.0, "dropout of the generator and fake score, and the teacher runs without "
                                           "dropout (DMD2 edm_network.py: 0 for every net); null: keep the "
                                           "teacher's dropout in the trained copies", ge=0, lt=1)
    student_sigma_max: Optional[float] = option(None, "the student's noise ceiling (its K grid indices on a grid "
                                                      "ending here; K = 1: input σ·z); null: the teacher's σ_max "
                                                      "(official), or below it where the teacher's output gain "
                                                      "|c_out| exceeds 2.5 (ε-prediction: σ = 2.5)", gt=0)
    noise_grid: str = option("karras", NOISE_GRID_DOC, choices=NOISE_GRIDS)


# ------------------------------------------------------------------------------------------------ σ grid

def dmd_sigma_grid(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   n: int = GRID_SIZE) -> torch.Tensor:
    """The DMD2 EDM-port noise grid: the n-point Karras grid *reversed*, so index j = 0 is σ_min and j = n−1 is
    σ_max (j = 20 → 0.00323, 249 → 0.168, 499 → 2.50, 749 → 17.5, 980 → 72.05, 999 → 80 at the EDM defaults).
    float32, shape [n]."""
    return karras_sigmas(n, sigma_min, sigma_max, rho, append_zero=False).flip(0).to(torch.float32)


def sample_grid_index(n: int, lo: int, hi: int, generator: torch.Generator) -> torch.Tensor:
    """n integer grid indices uniform on {lo, ..., hi} (both inclusive)."""
    return torch.randint(lo, hi + 1, (n,), generator=generator)


# ------------------------------------------------------------------------------------------------ DM gradient
def dm_gradient(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """DMD's distribution-matching gradient in x space (Yin et al., "One-step Diffusion with Distribution Matching
    Distillation": the DM gradient and its per-sample weight w_t; unchanged in DMD2):

        g_b = (D_fake(x_t) − D_real(x_t))_b / mean_CHW |x_b − D_real(x_t)_b|

    i.e. w_t·(s_fake − s_real) with w_t = σ_t²·CS/‖D_real(x_t) − x‖₁ (the σ² cancels the score's 1/σ²).
    The per-sample normaliser makes g invariant to the pixel scale. Computed without grad; non-finite entries
    (a zero normaliser) become 0. Shape as ``x``."""
    with torch.no_grad():
        x, d_real, d_fake = x.detach(), d_real.detach(), d_fake.detach()
        norm = (x - d_real).abs().flatten(1).mean(1).reshape((-1,) + (1,) * (x.ndim - 1))
        g = (d_fake - d_real) / norm
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def dm_pseudo_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Stop-gradient surrogate whose gradient is the DM gradient: L_DM = ½·mean_BCHW (x − sg(x − g))², so
    ∂L_DM/∂x = g/(B·C·H·W) and the value is ½·mean g² (a monitor only; it often rises early in training)."""
    target = (x - g).detach()
    return 0.5 * (x - target).square().mean()


# ------------------------------------------------------------------------------------------------ critic
def fake_score_loss(fake, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, labels=None,
                    reduction: str = "mean", weighting: str = "teacher") -> torch.Tensor:
    """Denoising loss of the fake-score network on *detached* generator samples (DMD trains its fake score with
    this denoising loss; Karras et al. 2022, Eq. 2):

        L_fake = E[ λ(σ)·‖D_fake(x + σε; σ) − x‖² ]

    λ: the teacher's own weighting (``weighting='teacher'``, 1/c_out²: for an EDM teacher EDM's λ(σ) = 1/σ² + 1/σ_d²
    as DMD2's edm_guidance.py; for an ε-teacher the ε-MSE as DMD2's sd_guidance.py) or EDM's (``'edm'``).
    ``reduction='mean'`` averages over batch and pixels (DMD2's ImageNet code path); ``'sum'`` sums over pixels
    and averages over the batch (EDM, Diff-Instruct)."""
    x = x.detach()
    per_sample = edm_loss(fake, x, sigma, noise, labels, weight=loss_weight(fake, sigma, weighting))
    if reduction == "sum":
        return per_sample.mean()
    if reduction == "mean":
        return per_sample.mean() / x[0].numel()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _rng_state(device: torch.device):
    """The global RNG states dropout draws from for nets on ``device``: the CPU generator's, and the CUDA
    generator's of that device when it is a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def in_mode(training: Optional[bool], *modules: nn.Module):
    """Run the block with the modules in train (True) or eval (False) mode, restoring each one's mode after;
    ``None`` leaves the modes as they are."""
    saved = [(m, m.training) for m in modules if m is not None]
    if training is not None:
        for m, _ in saved:
            m.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.train(flag)


@torch.no_grad()
def paired_denoise(fake, real, x_t: torch.Tensor, sigma: torch.Tensor, labels=None, training: Optional[bool] = None,
                   w_fake: float = 1.0, w_real: float = 1.0):
    """(D_fake(x_t; σ), D_real(x_t; σ)) without grad. The global RNG that dropout draws from — the CPU generator
    and, on a GPU, that device's CUDA generator — is rewound between the two calls, so nets in the same mode draw
    the same dropout masks: equal weights then give exactly equal outputs, and a zero gradient (Diff-Instruct,
    pkulwj1994/diff_instruct ``training/di_loss.py``: both nets in train mode, the CUDA RNG restored between the
    calls). ``training`` runs both nets in that mode for the two calls (restored after); None keeps their modes.
    ``w_fake`` / ``w_real``: each net's CFG scale (``guided_denoise``; 1: a plain call)."""
    with in_mode(training, fake, real):
        state = _rng_state(x_t.device)
        d_fake = guided_denoise(fake, x_t, sigma, labels, w_fake)
        _set_rng_state(state, x_t.device)
        d_real = guided_denoise(real, x_t, sigma, labels, w_real)
    return d_fake, d_real


def _is_rate(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def set_dropout(net: nn.Module, p: float) -> nn.Module:
    """Set every dropout rate of ``net`` to ``p`` in place: ``nn.Dropout`` modules and the float ``dropout``
    attribute of this project's U-Net blocks, plus class-label dropout when ``p`` is 0. Returns ``net``."""
    for m in net.modules():
        own = vars(m)   # instance attributes only: diffusers models answer ``.dropout`` from their config, deprecated
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = p
        elif _is_rate(own.get("dropout")):
            m.dropout = float(p)
        if p == 0 and _is_rate(own.get("label_dropout")):
            m.label_dropout = 0
    return net


# ------------------------------------------------------------------------------------------------ helpers
def random_onehot(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """n uniformly random one-hot labels [n, num_classes] (float32)."""
    idx = torch.randint(num_classes, (n,), generator=generator)
    return nn.functional.one_hot(idx, num_classes).float()


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Treat the modules' parameters as constants for the forward passes run inside the block (the autograd
    graph is recorded then, so restoring ``requires_grad`` afterwards does not make them receive gradients)."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def shared_randint(high: int, generator: torch.Generator) -> int:
    """One integer uniform on {0..high−1} drawn from ``generator``; with several ranks rank 0's draw is broadcast
    so the whole global batch shares it (DMD2's backward-simulation step index)."""
    k = torch.randint(high, (1,), generator=generator)
    if dist.is_distributed():
        import torch.distributed as tdist
        tdist.broadcast(k, src=0)
    return int(k)


class FakeScoreMethod(Method):
    """What DMD, DMD2, Diff-Instruct and SiD share: ``self.teacher`` (the frozen D_real), ``self.G`` and
    ``self.fake`` (a generator and an online fake-score network, both trainable copies of the teacher), the sample
    shape, and noise / labels drawn from the trainer's checkpointed generator."""

    role = "student"
    generator_phase = "generator"
    supports_lora = True

    def __init__(self, ctx: MethodContext, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        if ctx.teacher is None:
            raise UserError(f"method {self.name!r} distils a teacher: give one with --teacher CKPT")
        self.teacher = ctx.teacher.eval().requires_grad_(False)
        self.G, self.fake = self.trainable_copies("generator", "fake_score")
        self.nets["generator"] = self.G
        self.nets["fake_score"] = self.fake
        self.shape = tuple(self.teacher.sample_shape)
        self.label_dim = int(getattr(self.teacher, "label_dim", 0) or 0)
        self.conditioning = cond.conditioning_of(self.teacher)
        if self.opts.guided() and self.conditioning == "none":
            raise UserError(f"{self.name}: classifier-free guidance (method.guidance_*) needs a conditional "
                            f"teacher; this one is unconditional: leave the guidance scales at 1")
        self._setup_guidance()
        cond.check_bank(self.teacher, ctx.conditions, "the teacher")
        # The generator phase's samples, with grad (set by each method's generator loss; see ``generated_batch``).
        self.generated = None
        self.generated_labels = None

    # ---------------------------------------------------------------- guidance as an input (GuidanceOptions)
    def _setup_guidance(self) -> None:
        """Check the embedded-guidance / w-conditioned-student options against the teacher, give the generator and
        fake score a guidance embedding where they need one, and fill ``extra.guidance`` into a prompt bank that
        lacks it. Sets ``self.student_guidance``: what the generator and fake score are fed (a number, 'range':
        per-sample draws from ``guidance_student``, or None: the batch as it is) and ``self.student_net_delta``."""
        o, ctx = self.opts, self.ctx
        emb, emb_fake, ws = o.guidance_embedded, o.guidance_embedded_fake, o.guidance_student
        teacher_input = takes_guidance(self.teacher)
        self.student_guidance, self.student_net_delta = None, {}
        if emb_fake is not None and emb is None:
            raise UserError(f"{self.name}: method.guidance_embedded_fake needs method.guidance_embedded (the "
                            f"teacher's own input scale)")
        if emb is not None and not teacher_input:
            raise UserError(f"{self.name}: method.guidance_embedded: this teacher does not take the guidance scale as "
                            f"an input (its condition has no extra.guidance, as FLUX.1-dev's has): use "
                            f"method.guidance_real (classifier-free guidance) instead")
        if emb is not None:
            self.student_guidance = float(emb if emb_fake is None else emb_fake)
        if ws is not None:
            lo, hi = (float(v) for v in ws)
            if not lo <= hi:
                raise UserError(f"{self.name}: method.guidance_student is [w_min, w_max] with w_min <= w_max, got {ws}")
            if emb is not None or o.guidance_real != 1:
                raise UserError(f"{self.name}: method.guidance_student guides the real score with each sample's own "
                                f"w: leave method.guidance_real at 1 and method.guidance_embedded unset")
            if self.conditioning != "embeddings":
                raise UserError(f"{self.name}: method.guidance_student needs a teacher conditioned on prompt "
                                f"embeddings (w reaches the student as the condition's extra.guidance); class-label "
                                f"teachers are not supported")
            if not teacher_input:
                if ctx.lora is not None and ctx.lora.enabled():
                    raise UserError(f"{self.name}: method.guidance_student adds a guidance embedding to full copies of "
                                    f"the teacher: remove the lora section")
                for net in (self.G, self.fake):
                    mp = getattr(getattr(net, "model", None), "map_prompt", None)
                    if not isinstance(mp, PromptEmbedding):
                        raise UserError(f"{self.name}: method.guidance_student: the student cannot take the guidance "
                                        f"scale as an input (the teacher has no extra.guidance, and only this "
                                        f"package's MLP / SongUNet with embed_dim get a guidance embedding)")
                    mp.add_guidance_embedding()
                    net.embedding_signature = dict(net.embedding_signature, **{"extra.guidance": ()})
                self.student_net_delta["guidance_embed"] = True
            self.student_guidance = "range"
        if self.student_guidance is not None:   # the scale the student samples at without --guidance
            w = (lo + hi) / 2 if self.student_guidance == "range" else self.student_guidance
            self.G.default_guidance = float(w)
            self.student_net_delta["default_guidance"] = float(w)
        bank = ctx.conditions
        if teacher_input and bank is not None and "guidance" not in bank.extra and self.student_guidance is not None:
            ctx.conditions = bank.with_extra(guidance=self.G.default_guidance)

    def student_net_config(self, net_config: dict) -> dict:
        """The student's ``net_config``: the teacher's, with ``kwargs.guidance_embed`` for a w-conditioned student
        given a guidance embedding and ``default_guidance`` for one that takes the scale as input."""
        d = self.student_net_delta
        if not d:
            return net_config
        out = dict(net_config)
        if d.get("guidance_embed"):
            out["kwargs"] = dict(out.get("kwargs") or {}, guidance_embed=True)
        if "default_guidance" in d:
            out["default_guidance"] = d["default_guidance"]
        return out

    def with_student_guidance(self, labels, like=None):
        """``labels`` as the generator and fake score take them: ``extra.guidance`` = each sample's w drawn from
        ``guidance_student`` (or ``like``'s, a batch of the same size that has them), or ``guidance_embedded_fake``;
        unchanged otherwise."""
        if labels is None or self.student_guidance is None:
            return labels
        if self.student_guidance != "range":
            return set_guidance(self.G, labels, self.student_guidance)
        if like is not None and "guidance" in like.extra and len(like) == len(labels):
            return labels.with_extra(guidance=like.extra["guidance"])
        lo, hi = self.opts.guidance_student
        w = self.ctx.draws.per_sample(len(labels), lambda m, g: lo + (hi - lo) * torch.rand(m, generator=g))
        return labels.with_extra(guidance=w.to(self.ctx.device))

    def example_condition(self):
        """One row of the prompt bank as the generator and fake score take it (a w-conditioned student's at its
        default w), for probing the networks' shapes."""
        row = self.ctx.conditions.rows([0])
        if self.student_guidance is None or not takes_guidance(self.G):
            return row
        return row.with_extra(guidance=self.G.default_guidance)

    @property
    def real_score(self):
        """The teacher as the real score of the generator loss: a w-conditioned student's batch guides it with each
        sample's own w (as input for a teacher that takes the scale, else CFG); otherwise ``guidance_embedded`` as
        its input and/or CFG at ``guidance_real`` (the plain teacher when neither is set)."""
        o = self.opts
        if o.guidance_student is not None:
            return GuidedDenoiser(self.teacher, None, "auto")
        net = self.teacher
        if o.guidance_embedded is not None:
            net = GuidedDenoiser(net, o.guidance_embedded, "input")
        return GuidedDenoiser(net, o.guidance_real) if o.guidance_real != 1 else net

    def generated_batch(self, batch, step):
        """The samples (and labels) of this step's generator phase, as its loss computed them (with grad)."""
        if self.generated is None:
            raise RuntimeError(f"{self.name}: generated_batch() is only valid after the generator phase's loss")
        return self.generated, self.generated_labels

    # draws (all from the trainer's checkpointed generator through ``ctx.draws``, moved to the device afterwards)
    def randn(self, n: int) -> torch.Tensor:
        return self.ctx.draws.randn((n,) + self.shape).to(self.ctx.device)

    def randn_like(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """``groups``: x is that many batches concatenated (see ``Draws.per_sample``)."""
        return self.ctx.draws.randn_like(x, groups)

    def labels_for(self, batch, n: int):
        """Labels for n generated samples: the real batch's labels when there are some, else random one-hot;
        None for unconditional models."""
        if self.conditioning == "none":
            return None
        if batch is not None and batch[1] is not None and cond.batch_len(batch[1]) >= n:
            return self.with_student_guidance(cond.to_device(cond.rows(batch[1], slice(0, n)), self.ctx.device))
        return self.random_labels(n)

    def random_labels(self, n: int):
        """n uniformly random one-hot labels from the trainer's generator — or, for a teacher conditioned on
        embeddings, n uniformly random rows of the prompt bank (None for unconditional models)."""
        if self.conditioning == "none":
            return None
        if self.conditioning == "embeddings":
            bank = self.ctx.conditions
            idx = self.ctx.draws.per_sample(n, lambda m, g: torch.randint(len(bank), (m,), generator=g))
            return self.with_student_guidance(bank.rows(idx).to(self.ctx.device))
        L = self.label_dim
        return self.ctx.draws.per_sample(n, lambda m, g: random_onehot(m, L, g)).to(self.ctx.device)

    @staticmethod
    def bview(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.reshape((-1,) + (1,) * (x.ndim - 1))


class DistributionMatchingMethod(FakeScoreMethod):
    """DMD and DMD2: noise levels on DMD2's reversed 1000-point Karras grid, the DM generator loss and the
    fake-score denoising loss on that grid."""

    def __init__(self, ctx: MethodContext, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        top = self.opts.student_sigma_max
        if self.opts.noise_grid == "teacher":
            # The teacher's own timesteps (DMD2's SD code: DDPM timesteps drawn as integers, sd_guidance.py:84-85,
            # :179-181, :271-273); the student's steps are its timesteps too, the top one σ_{T−1}.
            table = teacher_timestep_sigmas(self.teacher, f"{self.name}: method.noise_grid=teacher")
            if len(table) != GRID_SIZE:
                raise UserError(f"{self.name}: method.noise_grid=teacher needs a teacher trained on {GRID_SIZE} "
                                f"timesteps (its grid indices are DMD2's), this one has {len(table)}: use "
                                f"method.noise_grid=karras")
            if top is not None:
                raise UserError(f"{self.name}: method.noise_grid=teacher puts the student's steps on the teacher's "
                                f"timesteps (the top one its σ_max): drop method.student_sigma_max, or give the "
                                f"student's σ's with method.sigmas")
            self.grid = table.to(torch.float32)
            self.student_sigma_max = float(self.grid[-1])
        else:
            self.grid = dmd_sigma_grid(self.teacher.sigma_min, self.teacher.sigma_max)
            # The student's noise ceiling (its one-step input σ): explicit, or the teacher's σ_max unless the
            # teacher's parameterisation makes a one-step output there ill-conditioned (``conditioned_sigma_max``).
            if top is not None and not self.teacher.sigma_min < top <= self.teacher.sigma_max:
                raise UserError(f"method.student_sigma_max must lie in ({self.teacher.sigma_min}, "
                                f"{self.teacher.sigma_max}], got {top}")
            self.student_sigma_max = conditioned_sigma_max(self.teacher) if top is None else float(top)
        # Grid-index ranges of the DM gradient and of the fake-score loss (official; a method may narrow them).
        self.dm_t_range, self.critic_t_range = (DM_T_MIN, DM_T_MAX), (CRITIC_T_MIN, CRITIC_T_MAX)
        # The mode both nets run in for the paired DM call (None: teacher eval, fake score as it is).
        self.paired_training: Optional[bool] = None

    def noise_levels(self) -> dict:
        g = self.grid
        return {"DM loss σ": [float(g[self.dm_t_range[0]]), float(g[self.dm_t_range[1]])],
                "fake-score loss σ": [float(g[self.critic_t_range[0]]), float(g[self.critic_t_range[1]])]}

    def grid_sigma(self, n: int, lo: int, hi: int, grid: torch.Tensor, groups: int = 1):
        """(indices, σ = grid[indices]) with indices uniform on {lo..hi}; ``groups`` as in ``randn_like``."""
        t = self.ctx.draws.per_sample(n, lambda m, g: sample_grid_index(m, lo, hi, g), groups)
        return t, grid[t].to(self.ctx.device)

    def distribution_matching_loss(self, x: torch.Tensor, labels=None):
        """DMD's generator loss on samples ``x`` (with grad): t ~ U{20..980} (``self.dm_t_range``), x_t = sg(x) +
        σ_t·ε, the DM gradient g from the fake and real denoisers at x_t, and the pseudo-loss ½·mean (x − sg(x − g))².
        Returns (L_DM, g, t)."""
        t, sigma = self.grid_sigma(x.shape[0], *self.dm_t_range, self.grid)
        x_t = x.detach() + self.bview(sigma, x) * self.randn_like(x)
        d_fake, d_real = paired_denoise(self.fake, self.real_score, x_t, sigma, labels, self.paired_training,
                                        self.opts.guidance_fake)
        g = dm_gradient(x, d_real, d_fake)
        return dm_pseudo_loss(x, g), g, t

    def critic_denoising_loss(self, x: torch.Tensor, labels=None, reduction: str = "mean"):
        """Fake-score loss on detached samples at σ = grid[U{0..999}] (DMD2's EDM code path;
        ``self.critic_t_range``)."""
        _, sigma = self.grid_sigma(x.shape[0], *self.critic_t_range, self.grid)
        return fake_score_loss(self.fake, x.detach(), sigma, self.randn_like(x), labels, reduction,
                               self.opts.fake_score_weighting)
