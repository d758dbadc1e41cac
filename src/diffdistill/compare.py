"""``diffdistill compare``: every method on one teacher, same seeds and budget, one table.

For the teacher: quality and throughput at 1, 2, 4, 8 NFE (Euler) and 35 NFE (Heun-18). For each method: a
distillation run (``run.max_minutes`` and/or ``--iters``), its quality over training time (a small-sample curve),
and each way its student samples (``Method.sampling_variants``), with images/s at one fixed batch, the speed-up
over the teacher at 35 NFE, the training wall-clock and the peak memory of the run. Writes ``OUT/report.md``,
``OUT/report.html`` (one static file, images embedded, opens offline), ``OUT/metrics.json``, plots and sample
grids with the same seeds for every model. The module knows methods only through the registry and the Method
interface, so a new method appears here without changes.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from .distill import distill, distill_config, load_teacher
from .errors import UserError
from .eval.evaluate import evaluate_net
from .eval.generate import generate
from .eval.plots import save_samples_png
from .eval.resources import peak_memory_mb, reset_peak_memory
from .eval.throughput import sampling_throughput
from .methods.registry import get_method
from .train.trainer import DivergenceError


TEACHER_NFES = (1, 2, 4, 8, 35)
QUALITY_KEYS = ("fid", "proxy_fid", "sliced_w2")   # the first one a metrics dict has is the headline figure


def teacher_spec(nfe: int) -> dict:
    """Heun-18 (35 NFE) as in EDM; plain Euler for the few-NFE teacher baselines (NFE = steps exactly)."""
    return {"sampler": "heun", "nfe": 35} if nfe == 35 else {"sampler": "euler", "nfe": nfe}


def quality_key(metrics: dict) -> str:
    for k in QUALITY_KEYS:
        if metrics.get(k) is not None:
            return k
    raise UserError("this data has no built-in quality metric: compare needs digits, a 2-D preset or Inception "
                    "features (--inception)")


def _grid_n(net) -> int:
    return 64 if net.img_resolution else 1000  # an 8×8 image grid, or a scatter plot of 2-D points


def _measure(net, spec, data_cfg, num_samples, seed, device, batch) -> dict:
    m = evaluate_net(net, spec, data_cfg, num_samples, seed=seed, device=device)
    m["images_per_second"] = sampling_throughput(net, spec, batch_size=batch, device=device)["images_per_second"]
    return m


class _Curve:
    """Quality of the student over training, at evenly spaced steps or training seconds (not counted as training
    time: the trainer calls ``on_step`` outside its clock)."""

    def __init__(self, data_cfg, n, seed, device, points, total_steps, budget_s, path: Path):
        self.data_cfg, self.n, self.seed, self.device, self.path = data_cfg, n, seed, device, path
        self.points = json.loads(path.read_text()) if path.exists() else []
        self.every_step = max(1, total_steps // points) if total_steps else None
        self.every_s = budget_s / points if budget_s else None
        self.next_s = self.every_s

    def __call__(self, trainer):
        due = self.every_step is not None and trainer.step % self.every_step == 0
        if self.every_s is not None and trainer.train_seconds >= self.next_s:
            due, self.next_s = True, self.next_s + self.every_s
        if due or trainer.step == trainer.cfg["run"]["steps"]:
            self.add(trainer)

    def add(self, trainer):
        if self.points and self.points[-1]["step"] == trainer.step:
            return
        m = evaluate_net(trainer.method.sampling_net(), trainer.method.sampling_spec(), self.data_cfg, self.n,
                         seed=self.seed, device=self.device)
        k = quality_key(m)
        self.points.append({"step": trainer.step, "train_seconds": round(trainer.train_seconds, 2), k: m[k]})
        self.path.write_text(json.dumps(self.points))


def run_method(method: str, teacher_path, out: Path, data_cfg, *, iters, budget_minutes, seed, device, progress,
               num_samples, curve_samples, curve_points, batch, overrides, el_weight=None) -> dict:
    """Distil with one method (plus the EL supplement at ``el_weight`` when given) and measure its student(s); a
    failing method is reported, not fatal."""
    label = f"{method}+EL" if el_weight else method
    run_dir = out / "runs" / label
    run_dir.mkdir(parents=True, exist_ok=True)
    run = {"out": str(run_dir), "seed": seed, "device": device, "progress": progress, "sample_every": 0,
           "resume": "auto"}
    if budget_minutes:
        run["max_minutes"] = budget_minutes
        run["steps"] = iters or 10**7  # the budget decides unless --iters is smaller
    elif iters:
        run["steps"] = iters
    _, tstate = load_teacher(teacher_path, device)
    flags = {"run": run, **({"el": {"weight": el_weight}} if el_weight else {})}
    steps = distill_config(method, tstate, {"run": dict(run)}, overrides=overrides)["run"]["steps"]
    curve = _Curve(data_cfg, curve_samples, seed, device, curve_points, None if budget_minutes else steps,
                   60.0 * budget_minutes if budget_minutes else None, run_dir / "curve.json")
    reset_peak_memory(device)
    t0 = time.perf_counter()
    try:
        tr = distill(method, teacher_path, flags=flags, overrides=overrides, on_step=curve)
    except (DivergenceError, UserError) as e:
        return {"method": label, "error": str(e).splitlines()[0], "curve": curve.points}
    wall = time.perf_counter() - t0
    peak = peak_memory_mb(device)
    curve.add(tr)
    res = {"method": label, "iterations": tr.step, "train_seconds": round(tr.train_seconds, 1),
           "wall_seconds": round(wall, 1), "peak_memory_mib": None if peak is None else round(peak, 1),
           "curve": curve.points, "students": []}
    net = tr.method.sampling_net()
    for steps_k, spec in sorted(tr.method.sampling_variants().items()):
        m = _measure(net, spec, data_cfg, num_samples, seed, device, batch)
        grid = f"samples_{label}_{steps_k}step.png"
        x, _, _ = generate(net, range(seed, seed + _grid_n(net)), spec, device=device)
        save_samples_png(x, out / grid, title=f"{label}, {steps_k} step(s)")
        res["students"].append({"steps": steps_k, "spec": spec, "grid": grid, **m})
    return res


def compare(teacher_path, methods, out="runs/compare", iters=None, budget_minutes=None, seed=0, num_samples=2000,
            curve_samples=500, curve_points=8, batch=256, device="cpu", progress=True, overrides=(),
            el_weight=None) -> dict:
    if not methods:
        raise UserError("--methods is empty: give a comma-separated list, e.g. --methods dmd2,sid")
    for name in methods:
        if get_method(name).role != "student":
            raise UserError(f"{name!r} trains teachers, not students: leave it out of --methods")
    for what, v in (("--iters", iters), ("--budget-minutes", budget_minutes), ("--num-samples", num_samples),
                    ("--el-weight", el_weight)):
        if v is not None and v <= 0:
            raise UserError(f"{what} must be positive, got {v}")
    out = Path(out)
    teacher, tstate = load_teacher(teacher_path, device)
    data_cfg = tstate["config"].get("data")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    teacher_rows = []
    for nfe in TEACHER_NFES:
        spec = teacher_spec(nfe)
        teacher_rows.append({"nfe": nfe, "spec": spec, **_measure(teacher, spec, data_cfg, num_samples, seed, device,
                                                                   batch)})
    key = quality_key(teacher_rows[-1])
    # the curves use fewer samples; FID-like figures depend on n, so the teacher's reference uses the same n
    teacher_curve_ref = evaluate_net(teacher, teacher_spec(35), data_cfg, curve_samples, seed=seed, device=device)[key]
    x, _, _ = generate(teacher, range(seed, seed + _grid_n(teacher)), teacher_spec(35), device=device)
    save_samples_png(x, out / "samples_teacher_35nfe.png", title="teacher, 35 NFE")
    teacher_seconds = time.perf_counter() - t0

    results = []
    for name in methods:
        print(f"[diffdistill] compare: {name}", flush=True)
        cls = get_method(name)
        takes_el = bool(el_weight) and getattr(cls, "generator_phase", None) is not None  # EL needs a generator
        results.append(run_method(cls.name, teacher_path, out, data_cfg, iters=iters,
                                  budget_minutes=budget_minutes, seed=seed, device=device, progress=progress,
                                  num_samples=num_samples, curve_samples=curve_samples, curve_points=curve_points,
                                  batch=batch, overrides=list(overrides), el_weight=el_weight if takes_el else None))
    for r in results:
        r["seconds_to_teacher_quality"] = next((p["train_seconds"] for p in r["curve"]
                                                if p.get(key) is not None and p[key] <= teacher_curve_ref), None)
    report = {"teacher": str(teacher_path), "data": data_cfg, "quality_key": key, "seed": seed,
              "num_samples": num_samples, "curve_samples": curve_samples, "batch_for_throughput": batch,
              "budget_minutes": budget_minutes, "iters": iters, "device": device, "el_weight": el_weight,
              "teacher_rows": teacher_rows,
              "teacher_curve_reference": teacher_curve_ref, "teacher_eval_seconds": round(teacher_seconds, 1),
              "methods": results}
    _plots(out, report)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(out, report)
    write_html(out, report)
    print(f"[diffdistill] compare done: {out / 'report.md'} and {out / 'report.html'}")
    return report


# ------------------------------------------------------------------------------------------------ report
def table_rows(report: dict) -> list[list[str]]:
    """The report's table as strings: one row per teacher NFE and per student variant."""
    key = report["quality_key"]
    base = next(r for r in report["teacher_rows"] if r["nfe"] == 35)["images_per_second"]
    kid = "kid" in report["teacher_rows"][0]

    def row(model, steps, m, train, iters, peak):
        return [model, str(steps), str(m["nfe"]), f"{m[key]:.4g}", f"{m['kid']:.4f}" if kid else "–",
                f"{m['images_per_second']:.0f}", f"{m['images_per_second'] / base:.1f}×", train, iters, peak]

    rows = [row(f"teacher ({r['spec']['sampler']})", r["nfe"] if r["spec"]["sampler"] != "heun" else 18, r, "–", "–",
                "–") for r in report["teacher_rows"]]
    for r in report["methods"]:
        if "error" in r:
            rows.append([r["method"], "–", "–", "failed: " + r["error"]] + ["–"] * 6)
            continue
        for s in r["students"]:
            rows.append(row(r["method"], s["steps"], s, f"{r['train_seconds']:.0f}", str(r["iterations"]),
                            "–" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"))
    return rows


def _headers(report):
    key = report["quality_key"].replace("_", "-")
    return ["model", "steps", "NFE", f"{key} (n={report['num_samples']})", "KID", "images/s",
            "speed-up vs teacher 35 NFE", "train s", "iterations", "peak MiB"]


def _plots(out: Path, report: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = report["quality_key"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    t = report["teacher_rows"]
    ax.plot([r["nfe"] for r in t], [r[key] for r in t], "k-o", ms=4, label="teacher")
    for i, r in enumerate(m for m in report["methods"] if "students" in m):
        ax.plot([s["nfe"] for s in r["students"]], [s[key] for s in r["students"]], marker="s", ls="--",
                color=f"C{i}", label=r["method"])
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=key.replace("_", "-"), title="quality vs NFE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for i, r in enumerate(report["methods"]):
        pts = [p for p in r["curve"] if p.get(key) is not None]
        if pts:
            ax.plot([p["train_seconds"] for p in pts], [p[key] for p in pts], marker="o", ms=3, color=f"C{i}",
                    label=r["method"])
    ax.axhline(report["teacher_curve_reference"], color="k", ls=":", label="teacher, 35 NFE")
    ax.set(yscale="log", xlabel="training wall-clock (s)",
           ylabel=f"{key.replace('_', '-')} (n={report['curve_samples']})", title="quality vs training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_time.png")
    plt.close(fig)


def _grids(report):
    yield "teacher, 35 NFE", "samples_teacher_35nfe.png"
    for r in report["methods"]:
        for s in r.get("students", []):
            yield f"{r['method']}, {s['steps']} step(s)", s["grid"]


def _notes(report) -> list[str]:
    key = report["quality_key"]
    what = {"proxy_fid": "proxy-FID in the digits classifier's 64-d feature space (not Inception FID)",
            "sliced_w2": "sliced Wasserstein-2 distance to the data (2-D)", "fid": "FID"}[key]
    budget = (f"{report['budget_minutes']} min of training per method" if report["budget_minutes"] else
              f"{report['iters']} iterations per method" if report["iters"] else "each method's preset iterations")
    notes = [f"Teacher {report['teacher']}; quality = {what}, lower is better; {report['num_samples']} samples per "
             f"row, seeds {report['seed']}…; budget: {budget}; device {report['device']}.",
             f"images/s: sampling alone at batch {report['batch_for_throughput']}, measured in this run; the "
             "speed-up column divides by the teacher's images/s at 35 NFE (the limit is the NFE ratio).",
             *([f"EL (embedding loss) at weight {report['el_weight']} on the methods that train a generator from "
                "noise (rows marked +EL); the others ran without it."] if report.get("el_weight") else []),
             "Time to reach the teacher's 35-NFE quality (curve samples, same n): " + ", ".join(
                 f"{r['method']} {'%.0f s' % r['seconds_to_teacher_quality'] if r.get('seconds_to_teacher_quality') is not None else 'not reached'}"
                 for r in report["methods"]) + "."]
    return notes


def write_markdown(out: Path, report: dict) -> None:
    head = _headers(report)
    lines = ["# diffdistill compare", ""] + [f"- {n}" for n in _notes(report)] + [
        "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += ["", "![quality vs NFE](quality_vs_nfe.png) ![quality vs time](quality_vs_time.png)", "",
              "## Samples (same seeds)", ""]
    lines += [f"**{title}**\n\n![{title}]({png})\n" for title, png in _grids(report)]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _img(out: Path, png: str, alt: str) -> str:
    data = base64.b64encode((out / png).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_html(out: Path, report: dict) -> None:
    """One self-contained page (images inlined as data URIs): no network, no external files."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _headers(report))
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in table_rows(report))
    grids = "".join(f"<figure>{_img(out, png, title)}<figcaption>{esc(title)}</figcaption></figure>"
                    for title, png in _grids(report))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>diffdistill compare</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:0 1em 1em 0}} figure img{{width:256px;image-rendering:pixelated}}
.plots img{{max-width:48%}}</style></head>
<body><h1>diffdistill compare</h1><ul>{''.join(f'<li>{esc(n)}</li>' for n in _notes(report))}</ul>
<table id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<div class="plots">{_img(out, 'quality_vs_nfe.png', 'quality vs NFE')} {_img(out, 'quality_vs_time.png', 'quality vs time')}</div>
<h2>Samples (same seeds)</h2>{grids}</body></html>
"""
    (out / "report.html").write_text(page)
