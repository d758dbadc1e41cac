"""CFD — Classifier-based Feature Distillation (Sun et al., "Accelerating Diffusion Sampling with Classifier-based
Feature Distillation", ICME 2023, arXiv 2211.12039; code zju-SWJ/RCFD, labelled "RCFD").

Progressive distillation (pd.py) with the pixel MSE replaced by a match in a frozen classifier's feature space. The
target x̃ is PD's (two teacher DDIM steps folded into one). The classifier sees x̃ (no grad) and the student's x̂ at
the same (x_s, σ) (grad flows through the frozen classifier into the student). With f = the classifier's pooled
penultimate features and the softmax taken over the *feature channels*:

    L_feat = (1/B) Σ_b KL( softmax(f_T/τ) ‖ softmax(f_S) )             (forward KL, τ on the teacher only, no τ²)
    L_ent  = mean_b H(q_b),  L_div = Σ_c q̄_c log q̄_c,  q_b = softmax(logits(x̂_b)),  q̄ = mean_b q_b
    L_CFD  = L_feat + β·(γ·L_ent + (1 − γ)·L_div)                      (dataset-oriented loss; no pixel MSE term)

Official defaults (zju-SWJ/RCFD, CIFAR-10): τ = 0.9 with DenseNet-201 (β = 0, the dataset loss off) and τ = 0.95 with
ResNet-18 (β = 0.003, γ = 0.75); the CFD loss replaces PD's from the 8-step teacher on (8 → 4, 4 → 2, 2 → 1; plain
PD before); Adam 5e-5 with a cosine LR over each stage, batch 128, grad clip 1, no EMA, 10k updates per stage. The
constructor defaults are the DenseNet-201 profile (the one RDD builds on); the digits preset takes the ResNet-18
profile's dataset loss because its classifier is a small CNN with pooled features.

The classifier is pluggable (method option ``classifier``; feature_classifiers.py): by default, for digits, a small
CNN that is *not* the proxy-FID network. Nothing is copied from the official code; the formulas follow the project's
formula sheet (shared/design/pd_rdd_cfd.md §2).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import UserError
from .feature_classifiers import classifier_outputs, load_feature_classifier
from .pd import ProgressiveDistillation, pd_loss
from .registry import register


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


# ------------------------------------------------------------------------------------------------ method
@register
class CFD(ProgressiveDistillation):
    name = "cfd"
    summary = "CFD: progressive distillation matching a classifier's sharpened feature distribution " \
              "(Sun et al. 2023)"

    presets: ClassVar[dict] = {
        # 8×8 digits: 8 → 4 → 2 → 1 with the CFD loss in every stage; lr 2e-4, cosine LR per stage, 500 updates.
        "images": {
            "run": {"steps": 1500, "batch_size": 128, "grad_clip": 1.0, "log_every": 50, "ckpt_every": 500,
                    "sample_every": 500},
            "method": {"start_steps": 8, "iters_per_halving": 500, "lr": 2e-4, "beta": 0.003, "gamma": 0.75},
        },
        # ring8 (the component classifier): 8 → 1, the feature loss from the start. Other 2-D data need a classifier.
        "points": {
            "run": {"steps": 900, "batch_size": 512, "grad_clip": 1.0, "log_every": 100, "ckpt_every": 300,
                    "sample_every": 0},
            "method": {"start_steps": 8, "iters_per_halving": 300, "lr": 1e-3},
        },
        # CIFAR-10 (zju-SWJ/RCFD, DenseNet-201 profile): each stage from the 8-step PD teacher, 10k updates,
        # Adam 5e-5 with a cosine LR, batch 128, clip 1; τ = 0.9, dataset loss off. (Needs a CIFAR classifier:
        # method.classifier=package.module:factory.)
        "official": {
            "run": {"batch_size": 128, "grad_clip": 1.0},
            "method": {"start_steps": 8, "iters_per_halving": 10_000, "lr": 5e-5, "lr_schedule": "cosine",
                       "tau": 0.9, "beta": 0.0},
        },
    }

    def __init__(self, ctx, start_steps: int = 8, iters_per_halving: int = 10_000, student_steps: int = 1,
                 lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 lr_schedule: str = "cosine", weighting: str = "truncated_snr", grid: str = "karras",
                 rho: float = 7.0, final_stage_iters: int | None = None, tau: float = 0.9, beta: float = 0.0, gamma: float = 0.75,
                 feature_from_steps: int = 8, pd_weight: float = 0.0, classifier: str = "auto",
                 data_name: str | None = None):
        super().__init__(ctx, start_steps=start_steps, iters_per_halving=iters_per_halving,
                         student_steps=student_steps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         lr_schedule=lr_schedule, weighting=weighting, grid=grid, rho=rho,
                         final_stage_iters=final_stage_iters)
        if float(tau) <= 0:
            raise UserError(f"tau must be positive, got {tau}")
        if not 0.0 <= float(gamma) <= 1.0:
            raise UserError(f"gamma must lie in [0, 1], got {gamma}")
        self.tau, self.beta, self.gamma = float(tau), float(beta), float(gamma)
        self.feature_from_steps = int(feature_from_steps)
        self.pd_weight = float(pd_weight)
        self.classifier = load_feature_classifier(str(classifier), self.shape, data_name).to(ctx.device)

    def feature_stage(self) -> bool:
        """Whether the current halving uses the classifier losses (teacher steps ≤ ``feature_from_steps``)."""
        return self.teacher_steps <= self.feature_from_steps

    def distill_loss(self, x_hat, x_target, sigma, step):
        if not self.feature_stage():
            return super().distill_loss(x_hat, x_target, sigma, step)
        with torch.no_grad():
            map_t, f_t, _ = classifier_outputs(self.classifier, x_target)
        map_s, f_s, logits_s = classifier_outputs(self.classifier, x_hat)
        loss, logs = cfd_loss(f_s, f_t, logits_s, self.tau, self.beta, self.gamma)
        extra, extra_logs = self.relational_loss(map_s, map_t)
        loss = loss + extra
        logs.update(extra_logs)
        if self.pd_weight:
            l_pd = pd_loss(x_hat, x_target, sigma, self.weighting, self.sigma_data)
            loss = loss + self.pd_weight * l_pd
            logs["pd/mse"] = float(l_pd.detach())
        return loss, logs

    def relational_loss(self, map_student, map_teacher):
        """Extra terms on the classifier's spatial maps (none for CFD; RDD's relational losses)."""
        return 0.0, {}
