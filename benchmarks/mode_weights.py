"""Mode weights on digits: the digits classifier's class histogram of the training digits, of the shipped teacher
(ODE and SDE sampling) and of any student checkpoints, with proxy-FID and the class-histogram TV distance; then how
much proxy-FID a class-weight error alone costs (the teacher's own samples resampled to skewed class weights).

    python benchmarks/mode_weights.py                                     # data and teacher only
    python benchmarks/mode_weights.py runs/dmd2/checkpoints/ckpt-00003000.pt runs/bench-digits/runs/dmd2/...

Prints two tables. Seeds are fixed, so a rerun prints the same numbers.
"""

from __future__ import annotations

import argparse

import torch

from diffdistill.data.digits import digits_split
from diffdistill.demo import SHIPPED_TEACHER
from diffdistill.diffusion.schedules import karras_sigmas
from diffdistill.distill import load_teacher
from diffdistill.eval.evaluate import digits_quality, digits_reference, sampling_spec_for
from diffdistill.io import load_for_sampling
from diffdistill.eval.generate import generate
from diffdistill.eval.metrics import proxy_fid


@torch.no_grad()
def sde_samples(net, n: int, steps: int = 300, seed: int = 0) -> torch.Tensor:
    """Euler–Maruyama on the reverse SDE dx = −2σ·∇log p dσ + √(2σ) dw̄ (EDM's σ(t) = t), Karras grid: the
    teacher's noisy marginals without the ODE's deterministic transport."""
    g = torch.Generator().manual_seed(seed)
    sig = karras_sigmas(steps, net.sigma_min, net.sigma_max, 7.0, append_zero=True)
    x = torch.randn((n,) + tuple(net.sample_shape), generator=g) * float(sig[0])
    for s, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
        d = net(x, torch.full((n,), s))
        if s_next == 0:
            return d
        x = x + (s * s - s_next * s_next) * (d - x) / (s * s) + (s * s - s_next * s_next) ** 0.5 * torch.randn(
            x.shape, generator=g)
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="*", help="student (or teacher) checkpoints to add as rows")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--teacher", default=str(SHIPPED_TEACHER))
    a = p.parse_args()
    n = a.num_samples
    ref = digits_reference()
    train, _ = digits_split()
    teacher, _ = load_teacher(a.teacher)
    x_ode, _, _ = generate(teacher, range(n), {"sampler": "heun", "nfe": 35})
    rows = [("training digits", None, train.x), ("teacher, Heun 35 NFE", 35, x_ode),
            ("teacher, reverse SDE 300 steps", 300, sde_samples(teacher, n))]
    for path in a.checkpoints:
        net, state = load_for_sampling(path)
        spec = sampling_spec_for(state)
        x, _, info = generate(net, range(n), spec)
        rows.append((f"{state['method']} step {state['step']} ({path})", info["nfe"], x))

    print(f"\n## class histograms (per 1,000 samples; {n} samples per model)\n")
    print("| model | NFE | proxy-FID | class TV | " + " | ".join(str(k) for k in range(10)) + " |")
    print("|---|---|---|---|" + "---|" * 10)
    for name, nfe, x in rows:
        q = digits_quality(x)
        hist = " | ".join(f"{1000 * v:.0f}" for v in q["class_hist"])
        print(f"| {name} | {nfe or '–'} | {q['proxy_fid']:.2f} | {q['class_tv']:.3f} | {hist} |")

    # What a class-weight error alone costs: resample the teacher's samples (with replacement, n of them) so that
    # class k has weight 0.1 + s·c_k, c_k a fixed permutation of evenly spaced values in [−1, 1].
    clf = ref["classifier"]
    with torch.no_grad():
        feats = clf.features(x_ode.clamp(-1, 1))
        cls = clf.head(feats).argmax(1)
    counts = torch.bincount(cls, minlength=10).double()
    g = torch.Generator().manual_seed(0)
    shape = torch.linspace(-1, 1, 10, dtype=torch.float64)[torch.randperm(10, generator=g)]
    print("\n## the teacher's own samples resampled to skewed class weights (mean of 5 draws)\n")
    print("| class weights | class TV to uniform | proxy-FID |\n|---|---|---|")
    for spread in (0.0, 0.01, 0.02, 0.03, 0.05):
        w = 0.1 + spread * shape
        fids = []
        for _ in range(5):
            idx = torch.multinomial((w[cls] / counts[cls]).float(), n, replacement=True, generator=g)
            fids.append(proxy_fid(feats[idx], ref["train"]))
        print(f"| 0.1 ± {spread:.2f} | {0.5 * float((w - 0.1).abs().sum()):.3f} | {sum(fids) / len(fids):.2f} |")
    print("\n(resampling with replacement duplicates samples, which alone raises proxy-FID: compare rows with each "
          "other, not with the teacher's row above)")


if __name__ == "__main__":
    main()
