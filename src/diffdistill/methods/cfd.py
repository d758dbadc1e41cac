"""CFD — Classifier-based Feature Distillation (Sun et al., "Accelerating Diffusion Sampling with Classifier-based
Feature Distillation", ICME 2023, arXiv 2211.12039; code zju-SWJ/RCFD, labelled "RCFD").

Progressive distillation (pd.py) with the pixel MSE replaced by a match in a frozen classifier's feature space. The
target x̃ is PD's (two teacher DDIM steps folded into one). The classifier sees x̃ (no grad) and the student's x̂ at
the same (x_s, σ) (grad flows through the frozen classifier into the student). With f = the classifier's pooled
penultimate features and the softmax taken over the *feature channels*:

    L_feat = (1/B) Σ_b KL( softmax(f_T/τ) ‖ softmax(f_S) )             (forward KL, τ on the teacher only, no τ²)
    L_ent  = mean_b H(q_b),  L_div = Σ_c q̄_c log q̄_c,  q_b = softmax(logits(x̂_b)),  q̄ = mean_b q_b
    L_CFD  = L_feat + β·(γ·L_ent + (1 − γ)·L_div)                      (dataset-oriented loss; no pixel MSE term)

Official defaults (zju-SWJ/RCFD, CIFAR-10; ``CFDOptions``): τ = 0.9 with DenseNet-201 (β = 0, the dataset loss off)
and τ = 0.95 with ResNet-18 (β = 0.003, γ = 0.75; README.md:45,51); the CFD loss replaces PD's from the 8-step teacher
on (8 → 4, 4 → 2, 2 → 1; plain PD before; config/CIFAR10_RCFD.txt:30); Adam 5e-5 with a cosine LR over each stage
(RCFD.py:151-152), batch 128, grad clip 1 (student only, RCFD.py:188), no EMA, a student without dropout
(CIFAR10_RCFD.txt:21), 10k updates per stage (CIFAR10_RCFD.txt:12; RCFD.py:33 notes twice that for the 2- and 1-step
students — here every stage has the same K unless you set it per run). The defaults are the DenseNet-201 profile
(the one RDD builds on); the digits preset takes the ResNet-18 profile's dataset loss because its classifier is a
small CNN with pooled features.

The classifier is pluggable (method option ``classifier``; feature_classifiers.py): by default, for digits, a small
CNN that is *not* the proxy-FID network. Nothing is copied from the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..options import option
from .feature_classifiers import classifier_outputs, load_feature_classifier
from .pd import PDOptions, ProgressiveDistillation, pd_loss, restate
from .registry import register

RCFD = "zju-SWJ/RCFD"


# ------------------------------------------------------------------------------------------------ losses
def cfd_feature_kl(f_student: torch.Tensor, f_teacher: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """CFD feature loss (Sun et al. 2023, Eq. of the feature-distillation objective; official code): forward KL from
    the teacher's sharpened distribution over feature channels to the student's,

        L_feat = (1/B) Σ_b Σ_c p_T,c (log p_T,c − log p_S,c),  p_T = softmax(f_T/τ), p_S = softmax(f_S),

    τ = 0.9 (DenseNet-201) / 0.95 (ResNet-18). Zero iff f_S = f_T/τ + c·1; ∂/∂f_S = (p_S − p_T)/B. f_T carries no
    grad. Inputs [B, C]."""
    log_p_t = F.log_softmax(f_teacher.detach() / tau, dim=-1)
    log_p_s = F.log_softmax(f_student, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


def cfd_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """CFD dataset-oriented "entropy" term (Sun et al. 2023; official code): L_ent = mean_b H(softmax(logits_b)),
    small when every sample is classified confidently. Uniform logits give log K."""
    log_q = F.log_softmax(logits, dim=-1)
    return -(log_q.exp() * log_q).sum(-1).mean()


def cfd_diversity_loss(logits: torch.Tensor) -> torch.Tensor:
    """CFD dataset-oriented "diversity" term (Sun et al. 2023; official code): L_div = Σ_c q̄_c log q̄_c = −H(q̄) with
    q̄ = mean_b softmax(logits_b); −log K when the classes are balanced, 0 when every sample is the same class.
    (log of q̄ is clamped at 1e-30 instead of the official unguarded log.)"""
    q_bar = F.softmax(logits, dim=-1).mean(0)
    return (q_bar * q_bar.clamp_min(1e-30).log()).sum()


def cfd_loss(f_student: torch.Tensor, f_teacher: torch.Tensor, logits_student: torch.Tensor | None = None,
             tau: float = 0.9, beta: float = 0.0, gamma: float = 0.75):
    """L_CFD = L_feat + β·(γ·L_ent + (1 − γ)·L_div) (Sun et al. 2023; official flags ``alpha`` = β, ``beta`` = γ;
    defaults β = 0 (DenseNet-201) or 0.003 with γ = 0.75 (ResNet-18)). Returns (loss, logs)."""
    l_feat = cfd_feature_kl(f_student, f_teacher, tau)
    logs = {"cfd/feat_kl": float(l_feat.detach())}
    if beta == 0:
        return l_feat, logs
    if logits_student is None:
        raise UserError("CFD's dataset loss (beta > 0) needs class logits: the classifier has no forward_head; "
                        "set method.beta=0")
    l_ent, l_div = cfd_entropy_loss(logits_student), cfd_diversity_loss(logits_student)
    logs.update({"cfd/entropy": float(l_ent.detach()), "cfd/diversity": float(l_div.detach())})
    return l_feat + beta * (gamma * l_ent + (1.0 - gamma) * l_div), logs


# ------------------------------------------------------------------------------------------------ options
@dataclass
class CFDOptions(PDOptions):
    start_steps: int = restate(PDOptions, "start_steps", 8, f"CFD starts from the 8-step PD student "
                               f"({RCFD} config/CIFAR10_RCFD.txt:30 base_ckpt .../8)")
    iters_per_halving: int = restate(PDOptions, "iters_per_halving", 10_000, f"updates per stage "
                                     f"({RCFD} config/CIFAR10_RCFD.txt:12 total_steps)")
    lr_schedule: str = restate(PDOptions, "lr_schedule", "cosine", f"CosineAnnealingLR over each stage "
                               f"({RCFD} RCFD.py:152)")
    tau: float = option(0.9, f"teacher-feature temperature: 0.9 DenseNet-201 / 0.95 ResNet-18 ({RCFD} RCFD.py:55, "
                        f"README.md:45,51)", gt=0)
    beta: float = option(0.0, f"dataset-loss weight β (official flag alpha; 0 DenseNet-201, 0.003 ResNet-18; "
                         f"{RCFD} RCFD.py:56, README.md:51)", ge=0)
    gamma: float = option(0.75, f"entropy share γ of the dataset loss (official flag beta, 0.75 with β > 0; {RCFD} "
                          f"README.md:51)", ge=0, le=1)
    feature_from_steps: int = option(8, "use the classifier losses once the teacher has at most this many steps "
                                     f"(plain PD before; {RCFD} README: PD to 8 steps, then CFD)", ge=1)
    pd_weight: float = option(0.0, "weight of PD's pixel MSE added to the feature loss (official: none, "
                              f"{RCFD} diffusion.py:257)", ge=0)
    classifier: str = option("auto", "frozen feature classifier: auto, digits, ring8 or package.module:factory "
                             "(official: CIFAR-10 DenseNet-201 / ResNet-18)")


# ------------------------------------------------------------------------------------------------ method
@register
class CFD(ProgressiveDistillation):
    name = "cfd"
    summary = "CFD: progressive distillation matching a classifier's sharpened feature distribution " \
              "(Sun et al. 2023)"
    Options = CFDOptions

    @classmethod
    def accumulation_refusal(cls, opts):
        if cls.accumulation_refusal_reason is None and opts.beta > 0 and opts.gamma < 1:
            return ("its dataset loss's diversity term (beta > 0, gamma < 1) is a function of the batch's mean class "
                    "distribution, which micro-batches cannot sum; set method.beta=0 or method.gamma=1 to accumulate")
        return cls.accumulation_refusal_reason

    def __init__(self, ctx, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        self.classifier = load_feature_classifier(self.opts.classifier, self.shape, ctx.data_name).to(ctx.device)

    def feature_stage(self) -> bool:
        """Whether the current halving uses the classifier losses (teacher steps ≤ ``feature_from_steps``)."""
        return self.teacher_steps <= self.opts.feature_from_steps

    def distill_loss(self, x_hat, x_target, sigma, step):
        if not self.feature_stage():
            return super().distill_loss(x_hat, x_target, sigma, step)
        o = self.opts
        with torch.no_grad():
            map_t, f_t, _ = classifier_outputs(self.classifier, x_target)
        map_s, f_s, logits_s = classifier_outputs(self.classifier, x_hat)
        loss, logs = cfd_loss(f_s, f_t, logits_s, o.tau, o.beta, o.gamma)
        extra, extra_logs = self.relational_loss(map_s, map_t)
        loss = loss + extra
        logs.update(extra_logs)
        if o.pd_weight:
            l_pd = pd_loss(x_hat, x_target, sigma, o.weighting, self.sigma_data)
            loss = loss + o.pd_weight * l_pd
            logs["pd/mse"] = float(l_pd.detach())
        return loss, logs

    def relational_loss(self, map_student, map_teacher):
        """Extra terms on the classifier's spatial maps (none for CFD; RDD's relational losses)."""
        return 0.0, {}
