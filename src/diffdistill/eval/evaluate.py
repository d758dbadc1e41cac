"""Evaluate a teacher or student checkpoint: the metrics.json contract of the architecture sketch.

Quality figures depend on the data kind, never on the method:
- 8×8 digits: proxy-FID and KID in the penultimate-feature space of the project's digits classifier (trained
  deterministically, cached), against the 1,500 training digits. "proxy" because it is not Inception FID.
- 2-D points: sliced W2 and RBF-MMD² against fresh draws of the same distribution (+ mode coverage and mode
  weights for ring8).
Diversity next to quality: k-NN precision/recall (Kynkäänniemi et al. 2019, k = 3) in the same space (digits: the
classifier features of proxy-FID, per-class recall too; 2-D: the plane), digits class histogram / class TV.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data import dataset_from_config as load_dataset
from ..data.digits import digits_split
from ..data.toy2d import ring8_gmm
from ..diffusion.samplers import STEP_SCHEDULES, sampler_options, teacher_nfe, teacher_sigmas, teacher_steps
from ..errors import UserError
from ..io import load_for_sampling
from ..io.checkpoint import file_sha256
from ..io.text_encode import prompt_file_labels
from ..io.vae import latent_codec_for
from .features import load_or_train_digits_classifier
from .generate import generate
from .inception import evaluate_inception
from .metrics import kid, manifold_membership, mmd_rbf, mode_coverage, proxy_fid, sliced_w2, total_variation

# k of the k-NN manifold estimator (Kynkäänniemi et al. 2019; their default)
PR_K = 3


_DIGITS_REF_CACHE: dict = {}


def _sha256(path) -> str | None:
    return file_sha256(path)[0] if Path(path).is_file() else None


def sampling_spec_for(state: dict, steps: int | None = None, sampler: str | None = None,
                      options: dict | None = None, guidance: float | None = None, prompts=None) -> dict:
    """The checkpoint's sampling recipe with the user's changes (``_sampling_spec``) and, when given, a
    classifier-free guidance scale (``generate``'s ``'guidance'``, checked against the network there) and an
    encoded-prompts file (default: the run's ``data.prompts``)."""
    spec = _sampling_spec(state, steps, sampler, options)
    if guidance is not None:
        spec["guidance"] = float(guidance)
    prompts = prompts or ((state.get("config") or {}).get("data") or {}).get("prompts")
    if prompts:
        spec["prompts"] = str(prompts)
    return spec


def _sampling_spec(state: dict, steps: int | None = None, sampler: str | None = None,
                   options: dict | None = None) -> dict:
    """The checkpoint's own sampling recipe, or a teacher sampler with ``steps`` Karras steps. ``options``: the
    sampler's keyword options (``--s-churn`` …), over the checkpoint's own when the sampler is the checkpoint's;
    checked here, before any sampling."""
    spec = dict(state["sampling"])
    if steps is not None and steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}")
    if "sigmas" in spec and options:
        raise UserError(f"a student samples with its own recipe ({spec['sampler']}); sampler options "
                        f"({', '.join(sorted(options))}) are for a teacher")
    if "sigmas" in spec:  # students carry their σ list; samplers with a step schedule redraw it for --steps k
        # multistep/consistency lists hold one σ per step; a DDIM/Euler grid (PD students) also holds its end point
        trained = (len([v for v in spec["sigmas"] if v > 0]) if spec["sampler"] in ("multistep", "consistency")
                   else len(spec["sigmas"]) - 1)
        if steps is not None and steps != trained:
            schedule = STEP_SCHEDULES.get(spec["sampler"])
            if schedule is None:
                raise UserError(f"this student was trained for {trained} step(s); got --steps {steps}")
            net_cfg = state.get("net_config") or {}
            spec["sigmas"] = schedule(steps, net_cfg.get("sigma_min", 0.002), net_cfg.get("sigma_max", 80.0))
        return spec
    if sampler is not None or steps is not None or options:
        name = sampler or spec["sampler"]
        kept = (spec.get("sampler_options") or {}) if name == spec["sampler"] else {}
        opts = {**kept, **(options or {})}
        sampler_options(name, opts)
        n = steps if steps is not None else teacher_steps(spec["sampler"], spec["nfe"])
        out = {"sampler": name, "nfe": teacher_nfe(name, n), **{k: spec[k] for k in ("seed_labels",) if k in spec}}
        return {**out, "sampler_options": opts} if opts else out
    return spec


def describe_spec(spec: dict, net) -> dict:
    sig = spec.get("sigmas")
    if sig is None:
        sig = teacher_sigmas(spec["sampler"], spec["nfe"], net.sigma_min, net.sigma_max)
    out = {"sampler": spec["sampler"], "sigmas": [round(float(s), 6) for s in sig]}
    if spec.get("sampler_options"):  # as given; options left out take the sampler's defaults
        out["sampler_options"] = dict(spec["sampler_options"])
    return out


# ------------------------------------------------------------------- quality by data kind
def digits_reference(device="cpu") -> dict:
    """Classifier, training-split features, and the floor/ceiling references (cached per process)."""
    if "ref" not in _DIGITS_REF_CACHE:
        clf = load_or_train_digits_classifier().eval()
        train, held = digits_split()
        with torch.no_grad():
            f_train = clf.features(train.x)
            _DIGITS_REF_CACHE["ref"] = {"classifier": clf, "train": f_train, "heldout": clf.features(held.x),
                                        "n_train": len(train), "n_heldout": len(held), "train_labels": train.labels,
                                        "train_classes": class_histogram(clf.head(f_train))}
    return _DIGITS_REF_CACHE["ref"]


def class_histogram(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of samples per predicted class (argmax of the logits), float64 [num_classes]."""
    return torch.bincount(logits.argmax(1), minlength=logits.shape[1]).double() / len(logits)


def conditional_correctness(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The share of samples the classifier assigns to the class they were asked for, overall and per requested
    class (None for a class never requested)."""
    asked, got = labels.argmax(1), logits.argmax(1)
    hit = (asked == got).double()
    return {"class_accuracy": float(hit.mean()),
            "class_accuracy_per_class": [round(float(hit[asked == c].mean()), 4) if (asked == c).any() else None
                                         for c in range(labels.shape[1])]}


def conditional_spread(feats: torch.Tensor, asked: torch.Tensor, real: torch.Tensor, real_labels) -> dict:
    """Diversity *within* each condition of a class-conditional generator (collapse inside a class is invisible to
    the overall recall when every class is present): per requested class c, in the classifier's features,

    * ``cond_spread``: √(tr Σ_gen,c / tr Σ_real,c), the feature spread of the samples asked for c over that of the
      real digits of c (1 = as varied as the data, → 0 = one image per class);
    * ``cond_recall``: the k-NN recall (``PR_K``) of the real digits of c against the manifold of the samples asked
      for c (the share of the class's real variety the generator covers when asked for it).

    Means over the classes with more than ``PR_K`` samples on both sides, and per-class lists (None elsewhere)."""
    real_labels = torch.as_tensor(real_labels).long()
    spread, recall = [], []
    for c in range(int(real_labels.max()) + 1):
        g, r = feats[asked == c].double(), real[real_labels == c].double()
        enough = min(len(g), len(r)) > PR_K
        spread.append(round(float((g.var(0).sum() / r.var(0).sum()).sqrt()), 4) if enough else None)
        recall.append(round(float(manifold_membership(r, g, k=PR_K)[1].double().mean()), 4) if enough else None)

    def mean(values):
        v = [x for x in values if x is not None]
        return float(sum(v) / len(v)) if v else None
    return {"cond_spread": mean(spread), "cond_recall": mean(recall), "cond_spread_per_class": spread,
            "cond_recall_per_class": recall}


def digits_quality(samples: torch.Tensor, seed: int = 0, labels=None) -> dict:
    """Proxy-FID, KID, precision/recall and mode weights in the digits classifier's feature space; with ``labels``
    (one-hot requested classes) also ``class_accuracy`` (conditional correctness)."""
    ref = digits_reference()
    with torch.no_grad():
        feats = ref["classifier"].features(samples.clamp(-1, 1))
        logits = ref["classifier"].head(feats)
        hist = class_histogram(logits)
    # prompts (a Condition) name no class index: correctness needs one-hot labels, or class indices (a prompt
    # file's recorded labels)
    if torch.is_tensor(labels) and labels.ndim == 1 and not labels.is_floating_point() and int(labels.max()) < 10:
        labels = torch.nn.functional.one_hot(labels.long(), 10).float()
    extra = {}
    if torch.is_tensor(labels) and labels.ndim == 2 and labels.shape[1] == 10:
        extra = {**conditional_correctness(logits, labels),
                 **conditional_spread(feats, labels.argmax(1), ref["train"], ref["train_labels"])}
    # KID's cubic kernel (xᵀy/d + 1)³ explodes on raw classifier features (norms ≫ √d, unlike Inception's), so KID
    # is taken on features divided by one fixed scale: the RMS per-dimension value of the training features.
    scale = ref["train"].square().mean().sqrt()
    kid_mean, kid_std = kid(feats / scale, ref["train"] / scale, seed=seed)
    # FID is biased upwards at small n, so the real-data floor (297 held-out digits) is only comparable with
    # generated sets of the same size: mean proxy-FID over disjoint 297-sample subsets.
    k = ref["n_heldout"]
    subsets = [proxy_fid(feats[i:i + k], ref["train"]) for i in range(0, len(feats) - k + 1, k)]
    return {**_precision_recall(ref["train"], feats, ref["train_labels"]), "proxy_fid": float(proxy_fid(feats, ref["train"])), "kid": float(kid_mean), "kid_std": float(kid_std),
            f"proxy_fid_n{k}": float(sum(subsets) / len(subsets)) if subsets else None,
            # Mode weights: the classifier's class histogram of the samples and its total-variation distance to the
            # training digits' (0 = the same class proportions). A proxy-FID that stalls with a large class_tv is
            # a mode-weight problem, not a sample-quality one.
            "class_hist": [round(float(v), 4) for v in hist],
            "class_tv": float(0.5 * (hist - ref["train_classes"]).abs().sum()),
            "feature_space": "digits-classifier-64d", "reference": f"digits train split ({ref['n_train']} images)",
            **extra}


def _precision_recall(real, fake, real_labels=None) -> dict:
    """k-NN precision and recall (``PR_K``) of ``fake`` against ``real`` in their given space; with ``real_labels``
    also the recall per class (the fraction of real samples of class c inside the generated manifold: a dropped or
    thinned class shows as a low value). None where a set has no more than k samples."""
    if min(len(real), len(fake)) <= PR_K:
        return {"precision": None, "recall": None, "pr_k": PR_K}
    fake_in, real_in = manifold_membership(real, fake, k=PR_K)
    out = {"precision": float(fake_in.double().mean()), "recall": float(real_in.double().mean()), "pr_k": PR_K}
    if real_labels is not None:
        labels = torch.as_tensor(real_labels).long()
        out["class_recall"] = [round(float(real_in[labels == c].double().mean()), 4) if (labels == c).any() else None
                               for c in range(int(labels.max()) + 1)]
    return out


def digits_floor_and_ceiling(seed: int = 0, n_noise: int = 2000) -> dict:
    """Real-data floor (held-out real digits vs training digits) and Gaussian-noise ceiling, same feature space."""
    ref = digits_reference()
    noise = torch.randn((n_noise, 1, 8, 8), generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    with torch.no_grad():
        f_noise = ref["classifier"].features(noise)
    return {"floor_proxy_fid": float(proxy_fid(ref["heldout"], ref["train"])), "floor_n": ref["n_heldout"],
            "noise_proxy_fid": float(proxy_fid(f_noise, ref["train"])), "noise_n": n_noise}


def points_quality(samples: torch.Tensor, data_cfg: dict, seed: int = 0) -> dict:
    ref_cfg = dict(data_cfg, n=len(samples), seed=int(data_cfg.get("seed", 0)) + 10_000 + seed)
    ref = load_dataset(ref_cfg).x
    out = {"sliced_w2": float(sliced_w2(samples, ref, seed=seed)), "mmd": float(mmd_rbf(samples, ref)),
           # precision/recall in the plane itself, against the same fresh draws
           **_precision_recall(ref, samples), "reference": f"fresh draws of {data_cfg.get('name')}"}
    if data_cfg.get("name") == "ring8":
        gmm = ring8_gmm()
        mc = mode_coverage(samples, gmm.means, gmm.std)
        # mode weights: fraction of samples per nearest mode, and their TV distance to the mixture's weights
        out.update({"modes_covered": mc["modes_covered"], "high_quality_fraction": mc["high_quality"],
                    "mode_weights": [round(w, 4) for w in mc["weights"]],
                    "mode_tv": total_variation(mc["weights"], gmm.weights)})
    return out


def quality(samples: torch.Tensor, data_cfg: dict | None, seed: int = 0, labels=None) -> dict:
    """The data kind's built-in figures of ``samples``; ``labels`` (one-hot, the classes the samples were asked
    for) adds conditional correctness where the data kind has a classifier (digits)."""
    data_cfg = data_cfg or {}
    if samples.ndim == 2:
        return points_quality(samples, data_cfg, seed)
    if data_cfg.get("name") == "digits" and tuple(samples.shape[1:]) == (1, 8, 8):
        return digits_quality(samples, seed, labels)
    return {"note": "no built-in feature space for this data; FID needs an Inception weights file"}


def parse_seeds(text: str) -> list[int]:
    """EDM's seed lists (generate.py ``--seeds``): '0-1999', '5,7,100-199'; ranges include both ends."""
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise UserError(f"--seeds: {part!r} is not a seed or an A-B range (e.g. 0-1999 or 0-999,5000-5999)") \
                from None
        if sep and int(hi) < int(lo):
            raise UserError(f"--seeds: the range {part!r} is empty (A-B needs A <= B)")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: seeds must be non-negative and distinct")
    return seeds


def evaluate_net(net, spec: dict, data_cfg: dict | None, num_samples: int = 2000, seed: int = 0, device="cpu",
                 batch_size: int = 500, seeds=None, decode=None) -> dict:
    """Quality of ``net`` sampled with ``spec``: one sample per seed, ``seeds`` or seed, seed+1, …,
    seed+num_samples−1 (a second run with other seeds must not overlap: give a disjoint ``seeds`` range);
    ``decode``: latents → images (a VAE's ``LatentCodec.decode``), scored instead of the latents."""
    t0 = time.perf_counter()
    seeds = list(seeds) if seeds is not None else list(range(seed, seed + num_samples))
    num_samples, seed = len(seeds), seeds[0]
    x, labels, info = generate(net, seeds, spec, batch_size=batch_size, device=device, decode=decode)
    classes = prompt_file_labels(spec["prompts"]) if spec.get("prompts") and "prompt_index" in info else None
    if classes is not None:   # the class each prompt asks for (encode-prompts of a .jsonl with "label")
        labels = torch.tensor(classes)[torch.tensor(info["prompt_index"])]
    out = {"nfe": info["nfe"], "num_samples": num_samples, "seed": seed,
           "seeds": f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else "list",
           "images_per_second": round(info["images_per_second"], 2), **describe_spec(spec, net)}
    out.update(quality(x, data_cfg, seed, labels))
    out["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def evaluate_checkpoint(path, steps=None, sampler=None, num_samples=2000, seed=0, device="cpu",
                        inception: dict | None = None, seeds=None, data: dict | None = None,
                        sampler_options: dict | None = None, guidance: float | None = None, prompts=None,
                        vae=None) -> dict:
    """metrics.json of a checkpoint. ``inception`` (``{'extractor': TorchScriptExtractor, 'reference': Reference,
    'kid': bool, 'pr': bool, 'batch_size': int}``) replaces the data kind's built-in figures with Inception
    FID/KID/precision-recall and their recipe (eval/inception.py). ``data`` (a data section, e.g. ``{'name':
    'digits'}``) replaces the data recorded in the checkpoint — a diffusers teacher or a data-free student of one
    records none. ``seeds`` (a list) replaces seed..seed+num_samples−1. ``sampler_options``: a teacher sampler's
    keyword options (``sampling_spec_for``). Latent samples are decoded with ``vae`` (a VAE or pipeline folder) or,
    by default, the teacher's diffusers folder's ``vae/`` when it has one, and the images are scored
    (``decoded_with`` in the result)."""
    net, state = load_for_sampling(path, device)
    codec = latent_codec_for(state, vae, device, required=vae is not None)
    decode = codec.decode if codec is not None else None
    spec = sampling_spec_for(state, steps, sampler, sampler_options, guidance, prompts)
    data_cfg = data or state["config"].get("data")
    if seeds is not None:
        seeds = list(seeds)
        num_samples, seed = len(seeds), seeds[0]
    if inception is not None:
        m = evaluate_inception(net, spec, inception["extractor"], inception["reference"], num_samples, seed, device,
                               batch_size=inception.get("batch_size", 250), kid=inception.get("kid", True),
                               pr=inception.get("pr", True), seeds=seeds, decode=decode)
        m.update(describe_spec(spec, net))
        m["fid_recipe"].update({"checkpoint_sha256": _sha256(path), **describe_spec(spec, net)})
    else:
        m = evaluate_net(net, spec, data_cfg, num_samples, seed, device, seeds=seeds, decode=decode)
    if codec is not None:
        m["decoded_with"] = codec.describe()
    return {"dataset": (data_cfg or {}).get("name") or (data_cfg or {}).get("path"), "role": state["role"],
            "method": state["method"], "checkpoint": str(Path(path)), "step": state["step"], **m}
