"""``diffdistill demo``: the main job on the embedded default (real 8×8 digits, no downloads, minutes on a CPU).

1. Teacher: the digits teacher shipped with the package (trained by the project's own ``digits`` preset), or
   ``--train-teacher`` to retrain it with that preset.
2. Teacher quality at 35 NFE (Heun-18), at 1/3/7 NFE (Heun 1/2/4 steps) and at 2/4 NFE (DDIM), next to the
   real-data floor and the Gaussian-noise ceiling, all in the same feature space.
3. Distillation: a 1-step DMD2 student from that teacher, with proxy-FID tracked over the iterations.
4. ``OUT/report.md`` (+ ``metrics.json``, sample grids, the proxy-FID curve) with the time each phase took.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import resolve
from .distill import distill
from .eval.evaluate import digits_floor_and_ceiling, evaluate_net, load_for_sampling
from .eval.generate import generate
from .eval.plots import line_plot, save_samples_png
from .io.checkpoint import list_checkpoints
from .methods.registry import list_methods
from .train.trainer import Trainer


SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "teacher_digits.safetensors"
TEACHER_SPECS = [("Heun, 18 steps", {"sampler": "heun", "nfe": 35}), ("Heun, 4 steps", {"sampler": "heun", "nfe": 7}),
                 ("DDIM, 4 steps", {"sampler": "ddim", "nfe": 4}), ("Heun, 2 steps", {"sampler": "heun", "nfe": 3}),
                 ("DDIM, 2 steps", {"sampler": "ddim", "nfe": 2}), ("1 step", {"sampler": "heun", "nfe": 1})]
DEMO_METHOD = "dmd2"


def _get_teacher(out: Path, retrain: bool, teacher_steps, device, progress, timings):
    t0 = time.perf_counter()
    if not retrain and not teacher_steps and SHIPPED_TEACHER.exists():
        teacher, tstate = load_for_sampling(SHIPPED_TEACHER, device)
        timings[f"teacher: shipped (trained by the digits preset in {tstate.get('train_seconds', '?')} s; "
                "--train-teacher retrains)"] = time.perf_counter() - t0
        return teacher, SHIPPED_TEACHER
    if retrain and (out / "teacher").exists():  # keep the old run: never overwrite work
        (out / "teacher").rename(out / f"teacher.old-{time.strftime('%Y%m%d-%H%M%S')}")
    flags = {"run": {"out": str(out / "teacher"), "device": device, "progress": progress,
                     **_continue_or_restart(out / "teacher")}}
    if teacher_steps:
        flags["run"]["steps"] = teacher_steps
    trainer = Trainer(resolve("digits", flags=flags))
    trainer.run()
    timings["teacher training"] = time.perf_counter() - t0
    return trainer.method.sampling_net().eval(), list_checkpoints(trainer.ckpt_dir)[-1]


def _continue_or_restart(run_dir: Path) -> dict:
    """A demo run again continues its own runs; one stopped before its first checkpoint starts over."""
    return {"resume": "auto"} if list_checkpoints(run_dir / "checkpoints") else {"overwrite": True}


def run_demo(out="runs/demo", retrain_teacher: bool = False, teacher_steps=None, num_samples: int = 2000,
             device="cpu", progress: bool = True, distill_iters=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings, rows = {}, []
    data_cfg = resolve("digits")["data"]
    teacher, teacher_ckpt = _get_teacher(out, retrain_teacher, teacher_steps, device, progress, timings)

    t0 = time.perf_counter()
    say(f"evaluating the teacher at {len(TEACHER_SPECS)} step counts ({num_samples} samples each; the 35-NFE one "
        f"takes the longest)")
    ref = digits_floor_and_ceiling()
    for i, (name, spec) in enumerate(TEACHER_SPECS):
        m = evaluate_net(teacher, spec, data_cfg, num_samples, seed=0, device=device)
        rows.append({"model": f"teacher ({name})", **m})
        say(f"  [{i + 1}/{len(TEACHER_SPECS)}] teacher, {name} (NFE {m['nfe']}): proxy-FID {m['proxy_fid']:.2f} "
            f"({time.perf_counter() - t0:.0f} s)")
    x, _, _ = generate(teacher, range(64), TEACHER_SPECS[0][1], device=device)
    save_samples_png(x, out / "teacher_samples.png")
    timings["teacher evaluation"] = time.perf_counter() - t0

    curve = []
    if DEMO_METHOD in list_methods():
        t0 = time.perf_counter()

        def track(trainer):  # proxy-FID of the 1-step student over the iterations (500 samples: cheap at 1 NFE)
            net = trainer.method.sampling_net()
            m = evaluate_net(net, trainer.method.sampling_spec(), data_cfg, 500, seed=0, device=device)
            curve.append((trainer.step, m["proxy_fid"]))

        flags = {"run": {"out": str(out / DEMO_METHOD), "device": device, "progress": progress,
                         **_continue_or_restart(out / DEMO_METHOD)}}
        say(f"distilling a 1-step {DEMO_METHOD} student")
        if distill_iters:
            flags["run"]["steps"] = distill_iters
        tr = distill(DEMO_METHOD, teacher_ckpt, flags=flags, on_sample=track)
        timings[f"{DEMO_METHOD} distillation ({tr.step} iterations)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        student = tr.method.sampling_net()
        m = evaluate_net(student, tr.method.sampling_spec(), data_cfg, num_samples, seed=0, device=device)
        rows.append({"model": f"{DEMO_METHOD} student (1 step)", **m})
        x, _, _ = generate(student, range(64), tr.method.sampling_spec(), device=device)
        save_samples_png(x, out / "student_samples.png")
        if curve:
            line_plot({f"{DEMO_METHOD} student, 1 NFE (500 samples)": tuple(zip(*curve))}, out / "distill_curve.png",
                      "iteration", "proxy-FID", f"{DEMO_METHOD}: proxy-FID over distillation", logy=True)
        timings["student evaluation"] = time.perf_counter() - t0

    metrics = {"teacher_checkpoint": str(teacher_ckpt), "reference": ref, "rows": rows, "curve": curve,
               "timings_seconds": {k: round(v, 1) for k, v in timings.items()}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out, metrics)
    teacher_fid = rows[0]["proxy_fid"]
    say(f"teacher, 35 NFE: proxy-FID {teacher_fid:.2f}; teacher, 1 NFE: {rows[len(TEACHER_SPECS) - 1]['proxy_fid']:.1f}")
    if len(rows) > len(TEACHER_SPECS):
        s = rows[-1]
        say(f"{DEMO_METHOD} student, 1 NFE: proxy-FID {s['proxy_fid']:.2f} ({s['proxy_fid'] / teacher_fid:.1f}× the "
            f"teacher's), {s['images_per_second'] / rows[0]['images_per_second']:.0f}× its images/s")
    say(f"demo done in {sum(timings.values()) / 60:.1f} min: {out / 'report.md'}")
    return metrics


def say(msg: str) -> None:
    print(f"[diffdistill] {msg}", flush=True)


def _num(v, digits: int) -> str:
    """A table cell: the number, or '–' when it was not measured (e.g. @297 with fewer samples)."""
    return "–" if v is None else f"{v:.{digits}f}"


def write_report(out: Path, metrics: dict) -> None:
    ref = metrics["reference"]
    n = ref["floor_n"]
    lines = [
        "# diffdistill demo report — 8×8 handwritten digits (scikit-learn, real data)", "",
        f"Teacher: `{metrics['teacher_checkpoint']}`", "",
        "Quality is proxy-FID / KID in the 64-d penultimate feature space of the project's digits classifier "
        "(lower is better), against the 1,500 training digits. It is not Inception FID.",
        f"FID is biased upwards at small sample sizes, so the column *proxy-FID @{n}* compares every model with "
        f"the real-data floor at the floor's own size ({n} held-out digits; mean over disjoint {n}-sample subsets).",
        "", f"| model | NFE | samples | proxy-FID | proxy-FID @{n} | KID | samples/s |", "|---|---|---|---|---|---|---|",
        f"| real held-out digits (floor) | – | {n} | – | {ref['floor_proxy_fid']:.3f} | – | – |",
    ]
    for r in metrics["rows"]:
        lines.append(f"| {r['model']} | {r['nfe']} | {r['num_samples']} | {_num(r['proxy_fid'], 3)} | "
                     f"{_num(r.get(f'proxy_fid_n{n}'), 3)} | {_num(r.get('kid'), 4)} | "
                     f"{_num(r['images_per_second'], 0)} |")
    lines += [f"| Gaussian noise (ceiling) | – | {ref['noise_n']} | {ref['noise_proxy_fid']:.1f} | – | – | – |", "",
              "Teacher, Heun 35 NFE:", "", "![teacher samples](teacher_samples.png)", ""]
    if (out / "student_samples.png").exists():
        lines += [f"{DEMO_METHOD} student, 1 NFE (same seeds):", "", "![student samples](student_samples.png)", ""]
    if (out / "distill_curve.png").exists():
        lines += ["![proxy-FID over distillation](distill_curve.png)", ""]
    lines += ["## Time per phase", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics["timings_seconds"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
