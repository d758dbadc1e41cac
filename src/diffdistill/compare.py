"""``diffdistill compare``: every method on one teacher, same seeds and budget, one table.

For the teacher: quality and throughput at 1, 2, 4, 8 NFE (Euler) and 35 NFE (Heun-18). For each method: a
distillation run (``run.max_minutes`` and/or ``--iters``), its quality over training time (a small-sample curve),
and each way its student samples (``Method.sampling_variants``), with images/s at one fixed batch, the speed-up
over the teacher at 35 NFE, the training wall-clock and the peak memory of the run. Writes ``OUT/report.md``,
``OUT/report.html`` (one static file, images embedded, opens offline), ``OUT/metrics.json``, plots and sample
grids with the same seeds for every model. The module knows methods only through the registry and the Method
interface, so a new method appears here without changes.

With ``seeds`` = N > 1 every method is trained N times (run seeds seed, seed+1, …; one run folder each, the same
budget and the same evaluation samples): each quality cell is the mean ± the 95 % Student-t interval over the
seeds, curves get a min–max band, and each student is tested against the best one at its step count (Welch's t,
p < 0.05). Next to quality: k-NN precision/recall and the mode-weight TV (digits classes / ring8 modes), the best
evaluation of the curve (labelled optimistic) apart from the last checkpoint's value, and the training seconds to
first reach 1.5× and 1× the teacher's quality.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from .distill import distill, distill_config, load_teacher
from .io.load import without_weights
from .errors import UserError
from .eval.evaluate import evaluate_net
from .eval.generate import generate
from .eval.plots import save_samples_png
from .eval.resources import peak_memory_mb, reset_peak_memory
from .eval.stats import ALPHA, fmt_ci, t_interval, welch_p
from .eval.throughput import sampling_throughput
from .methods.registry import get_method
from .options import UNBOUNDED_STEPS
from .train.trainer import DivergenceError


TEACHER_NFES = (1, 2, 4, 8, 35)
QUALITY_KEYS = ("fid", "proxy_fid", "sliced_w2")   # the first one a metrics dict has is the headline figure
TV_KEYS = ("class_tv", "mode_tv")   # mode-weight TV: digits class histogram, ring8 nearest-mode weights
# time-to-quality thresholds: (multiple of the teacher's 35-NFE quality, key in a method's result)
REACH = ((1.5, "seconds_to_1.5x_teacher_quality"), (1.0, "seconds_to_teacher_quality"))
# per-student figures averaged over seeds (mean ± CI where N > 1)
# conditional teachers (digits): correctness and within-class diversity (eval.evaluate.conditional_spread)
COND_KEYS = ("class_accuracy", "cond_spread")
STUDENT_FIELDS = (*QUALITY_KEYS, "kid", "precision", "recall", *TV_KEYS, *COND_KEYS, "modes_covered",
                  "images_per_second")
RUN_FIELDS = ("iterations", "train_seconds", "wall_seconds", "peak_memory_mib", "best_of_curve")


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
               num_samples, curve_samples, curve_points, batch, overrides, el_weight=None, eval_seed=None,
               run_name=None, grids=True) -> dict:
    """Distil with one method (plus the EL supplement at ``el_weight`` when given) with run seed ``seed`` in
    ``OUT/runs/<run_name>`` (default: the label) and measure its student(s) on the samples of ``eval_seed``
    (default ``seed``); ``grids``: write the sample grids. A failing method is reported, not fatal."""
    label = f"{method}+EL" if el_weight else method
    eval_seed = seed if eval_seed is None else eval_seed
    run_dir = out / "runs" / (run_name or label)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = {"out": str(run_dir), "seed": seed, "device": device, "progress": progress, "sample_every": 0,
           "resume": "auto"}
    if budget_minutes:
        run["max_minutes"] = budget_minutes
        run["steps"] = iters or UNBOUNDED_STEPS  # the budget decides unless --iters is smaller
    elif iters:
        run["steps"] = iters
    tstate = without_weights(load_teacher(teacher_path, device)[1])   # (a record alive through the run)
    flags = {"run": run, **({"el": {"weight": el_weight}} if el_weight else {})}
    steps = distill_config(method, tstate, {"run": dict(run)}, overrides=overrides)["run"]["steps"]
    curve = _Curve(data_cfg, curve_samples, eval_seed, device, curve_points, None if budget_minutes else steps,
                   60.0 * budget_minutes if budget_minutes else None, run_dir / "curve.json")
    reset_peak_memory(device)
    t0 = time.perf_counter()
    try:
        tr = distill(method, teacher_path, flags=flags, overrides=overrides, on_step=curve)
    except (DivergenceError, UserError) as e:
        return {"method": label, "seed": seed, "error": str(e).splitlines()[0], "curve": curve.points}
    wall = time.perf_counter() - t0
    peak = peak_memory_mb(device)
    curve.add(tr)
    variants = sorted(tr.method.sampling_variants().items())
    res = {"method": label, "seed": seed, "iterations": tr.step, "train_seconds": round(tr.train_seconds, 1),
           "wall_seconds": round(wall, 1), "peak_memory_mib": None if peak is None else round(peak, 1),
           "curve": curve.points, "students": [],
           # the variant the curve evaluates (the method's own sampling recipe)
           "curve_steps": next((k for k, spec in variants if spec == tr.method.sampling_spec()), variants[0][0])}
    net = tr.method.sampling_net()
    for steps_k, spec in variants:
        m = _measure(net, spec, data_cfg, num_samples, eval_seed, device, batch)
        grid = f"samples_{label}_{steps_k}step.png"
        if grids:
            x, _, _ = generate(net, range(eval_seed, eval_seed + _grid_n(net)), spec, device=device)
            save_samples_png(x, out / grid, title=f"{label}, {steps_k} step(s)")
        res["students"].append({"steps": steps_k, "spec": spec, "grid": grid, **m})
    return res


def curve_summary(res: dict, key: str, teacher_ref: float) -> dict:
    """Adds to one run's result: the best evaluation of its curve (``best_of_curve``, optimistic: the minimum of
    several noisy evaluations) and, per ``REACH`` threshold, the training seconds of the first evaluation at or
    below threshold × the teacher's quality at the curve's n (None: not reached)."""
    pts = [p for p in res.get("curve", []) if p.get(key) is not None]
    best = min(pts, key=lambda p: p[key]) if pts else None
    res["best_of_curve"] = None if best is None else best[key]
    res["best_of_curve_step"] = None if best is None else best["step"]
    for mult, field in REACH:
        res[field] = next((p["train_seconds"] for p in pts if p[key] <= mult * teacher_ref), None)
    return res


def aggregate_seeds(label: str, runs: list[dict], key: str) -> dict:
    """One method's runs over N seeds → one entry shaped like a single run's result (means), plus ``ci`` (95 %
    t-interval half-widths, None for one value), ``values`` (the per-seed values), ``runs`` (every run's result)
    and ``failed_seeds``. Time to quality: mean over the seeds that reached it, with ``<field>_reached`` the count."""
    ok = [r for r in runs if "error" not in r]
    failed = [{"seed": r["seed"], "error": r["error"]} for r in runs if "error" in r]
    base = {"method": label, "seeds": [r["seed"] for r in runs], "n_seeds": len(runs), "runs": runs,
            "failed_seeds": failed}
    if not ok:
        return {**base, "error": f"all {len(runs)} seeds failed; seed {failed[0]['seed']}: {failed[0]['error']}",
                "curve": []}

    def summarise(dst: dict, rows: list[dict], fields) -> None:
        dst.setdefault("ci", {})
        dst.setdefault("values", {})
        for f in fields:
            vals = [r.get(f) for r in rows]
            if all(v is None for v in vals):
                continue
            dst["values"][f] = vals
            dst[f], dst["ci"][f] = t_interval([v for v in vals if v is not None])

    agg = {**base, "ok_seeds": [r["seed"] for r in ok], "curve_steps": ok[0]["curve_steps"]}
    summarise(agg, ok, RUN_FIELDS + tuple(f for _, f in REACH))
    for _, f in REACH:
        agg[f"{f}_reached"] = sum(r.get(f) is not None for r in ok)
        agg.setdefault(f, None)
    agg["students"] = []
    for s0 in ok[0]["students"]:
        rows = [s for r in ok for s in r["students"] if s["steps"] == s0["steps"]]
        st = {"steps": s0["steps"], "spec": s0["spec"], "grid": s0["grid"], "nfe": s0["nfe"], "n_seeds": len(rows)}
        summarise(st, rows, STUDENT_FIELDS)
        if all(s.get("class_recall") for s in rows):  # per-class recall, mean over seeds
            st["class_recall"] = [None if any(s["class_recall"][c] is None for s in rows) else
                                  round(sum(s["class_recall"][c] for s in rows) / len(rows), 4)
                                  for c in range(len(rows[0]["class_recall"]))]
        agg["students"].append(st)
    # curves: the i-th evaluation of every seed (same steps with --iters; same time points with a budget), over the
    # evaluations all seeds have: mean, min and max of the quality, mean training seconds
    curves = [[p for p in r["curve"] if p.get(key) is not None] for r in ok]
    agg["curve"] = [{"step": round(sum(c[i]["step"] for c in curves) / len(curves)),
                     "train_seconds": round(sum(c[i]["train_seconds"] for c in curves) / len(curves), 2),
                     key: sum(c[i][key] for c in curves) / len(curves),
                     f"{key}_min": min(c[i][key] for c in curves), f"{key}_max": max(c[i][key] for c in curves)}
                    for i in range(min(map(len, curves)))]
    return agg


def significance(results: list[dict], key: str) -> None:
    """Per step count: the student with the lowest mean quality is ``best``; every other student at that step
    count gets ``p_vs_best``, Welch's two-sided p-value on the per-seed values (needs ≥ 2 seeds on both sides)."""
    by_steps: dict[int, list[dict]] = {}
    for r in results:
        for s in r.get("students", []):
            if key in s.get("values", {}):
                by_steps.setdefault(s["steps"], []).append((r["method"], s))
    for group in by_steps.values():
        best_name, best = min(group, key=lambda ms: ms[1][key])
        for name, s in group:
            s["best_at_steps"] = s is best
            s["p_vs_best"] = None if s is best else welch_p(best["values"][key], s["values"][key])
            s["best_method"] = best_name


def compare(teacher_path, methods, out="runs/compare", iters=None, budget_minutes=None, seed=0, num_samples=2000,
            curve_samples=500, curve_points=8, batch=256, device="cpu", progress=True, overrides=(),
            el_weight=None, seeds=1) -> dict:
    """``seeds``: how many times each method is trained (run seeds seed, seed+1, …); every run evaluates the same
    samples (seeds seed…), so the spread is that of training."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"--seeds must be a positive whole number (training runs per method), got {seeds!r}")
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
    tstate = without_weights(tstate)   # the weights are in the teacher; this record lives through every run
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
        cls = get_method(name)
        takes_el = bool(el_weight) and getattr(cls, "generator_phase", None) is not None  # EL needs a generator
        label = f"{cls.name}+EL" if takes_el else cls.name
        runs = []
        for i in range(seeds):
            print(f"[diffdistill] compare: {name}" + (f", seed {seed + i} ({i + 1}/{seeds})" if seeds > 1 else ""),
                  flush=True)
            r = run_method(cls.name, teacher_path, out, data_cfg, iters=iters, budget_minutes=budget_minutes,
                           seed=seed + i, eval_seed=seed, device=device, progress=progress, num_samples=num_samples,
                           curve_samples=curve_samples, curve_points=curve_points, batch=batch,
                           overrides=list(overrides), el_weight=el_weight if takes_el else None,
                           # one folder per (method, seed); N = 1 keeps the single-seed layout
                           run_name=None if seeds == 1 else f"{label}-seed{seed + i}",
                           grids=not any("students" in q for q in runs))  # grids from the first run that trained
            runs.append(curve_summary(r, key, teacher_curve_ref))
        results.append(runs[0] if seeds == 1 else aggregate_seeds(label, runs, key))
    if seeds > 1:
        significance(results, key)
    report = {"teacher": str(teacher_path), "data": data_cfg, "quality_key": key, "seed": seed, "seeds": seeds,
              "run_seeds": list(range(seed, seed + seeds)), "num_samples": num_samples, "curve_samples": curve_samples, "batch_for_throughput": batch,
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
def _tv_key(report: dict) -> str | None:
    return next((k for k in TV_KEYS if report["teacher_rows"][0].get(k) is not None), None)


def _multi(report: dict) -> bool:
    return report.get("seeds", 1) > 1


def _cell(m: dict, field: str | None, spec: str) -> str:
    """One figure: the value, '± half-width' where it is a mean over seeds, '–' where absent."""
    if field is None or m.get(field) is None:
        return "–"
    return fmt_ci(m[field], m.get("ci", {}).get(field), spec)


def _reach_cell(r: dict, field: str) -> str:
    """Training seconds to a quality threshold; over seeds, the mean of those that reached it and how many did."""
    n = len(r.get("ok_seeds", [None]))
    k = r.get(f"{field}_reached")
    if r.get(field) is None:
        return "not reached" if k is None else f"not reached (0/{n} seeds)"
    cell = _cell(r, field, ".0f")
    return cell if k is None or k == n else f"{cell} ({k}/{n} seeds)"


def _p_cell(s: dict) -> str:
    if s.get("best_at_steps"):
        return "best"
    p = s.get("p_vs_best")
    return "–" if p is None else f"{p:.2g}" + (" *" if p < ALPHA else "")


def table_rows(report: dict) -> list[list[str]]:
    """The report's table as strings: one row per teacher NFE and per student variant. With several seeds the
    student quality cells are mean ± 95 % CI and the last column the significance test against the best."""
    key, tv, multi = report["quality_key"], _tv_key(report), _multi(report)
    base = next(r for r in report["teacher_rows"] if r["nfe"] == 35)["images_per_second"]
    kid = "kid" in report["teacher_rows"][0]
    ncols = len(_headers(report))
    cond_keys = COND_KEYS if _cond(report) else ()

    def row(model, steps, m, train, iters, peak, curve=("–", "–", "–"), p="–"):
        return [model, str(steps), str(m["nfe"]), _cell(m, key, ".4g"), _cell(m, "kid", ".4f") if kid else "–",
                _cell(m, "precision", ".3f"), _cell(m, "recall", ".3f"), _cell(m, tv, ".3f"),
                *(_cell(m, k, ".3f") for k in cond_keys), f"{m['images_per_second']:.0f}",
                f"{m['images_per_second'] / base:.1f}×", train, iters, peak, *curve, *([p] if multi else [])]

    rows = [row(f"teacher ({r['spec']['sampler']})", r["nfe"] if r["spec"]["sampler"] != "heun" else 18, r, "–", "–",
                "–") for r in report["teacher_rows"]]
    for r in report["methods"]:
        if "error" in r:
            rows.append([r["method"], "–", "–", "failed: " + r["error"]] + ["–"] * (ncols - 4))
            continue
        for s in r["students"]:
            curve = ("–", "–", "–")
            if s["steps"] == r.get("curve_steps", s["steps"]):  # the curve evaluates this variant
                curve = (_cell(r, "best_of_curve", ".4g"), *(_reach_cell(r, f) for _, f in REACH))
            rows.append(row(r["method"], s["steps"], s, f"{r['train_seconds']:.0f}",
                            f"{r['iterations']:.0f}" if multi else str(r["iterations"]),
                            "–" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}", curve, _p_cell(s)))
    return rows


def _cond(report) -> bool:
    """Whether the teacher is class-conditional with a classifier to check it (digits): extra columns."""
    return report["teacher_rows"][0].get("class_accuracy") is not None


def _headers(report):
    key = report["quality_key"].replace("_", "-")
    tv = {"class_tv": "class TV", "mode_tv": "mode TV"}.get(_tv_key(report), "mode TV")
    return ["model", "steps", "NFE", f"{key} (n={report['num_samples']}, last checkpoint)", "KID",
            "precision (k=3)", "recall (k=3)", tv,
            *(["class accuracy", "within-class spread"] if _cond(report) else []),
            "images/s", "speed-up vs teacher 35 NFE", "train s", "iterations",
            "peak MiB", f"best of curve (optimistic, n={report['curve_samples']})", "train s to 1.5× teacher",
            "train s to 1× teacher", *(["Welch p vs best"] if _multi(report) else [])]


def _plots(out: Path, report: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = report["quality_key"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    t = report["teacher_rows"]
    ax.plot([r["nfe"] for r in t], [r[key] for r in t], "k-o", ms=4, label="teacher")
    for i, r in enumerate(m for m in report["methods"] if "students" in m):
        st = r["students"]
        # several seeds: bars from the lowest to the highest seed's value (a CI bar can cross 0 on the log axis)
        vals = [s.get("values", {}).get(key) or [s[key]] for s in st]
        yerr = None if all(len(v) == 1 for v in vals) else [[s[key] - min(v) for s, v in zip(st, vals)],
                                                             [max(v) - s[key] for s, v in zip(st, vals)]]
        ax.errorbar([s["nfe"] for s in st], [s[key] for s in st], yerr=yerr, marker="s", ls="--", color=f"C{i}",
                    capsize=3, label=r["method"])
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=key.replace("_", "-"),
           title="quality vs NFE" + (f" (mean, min–max over {report['seeds']} seeds)" if _multi(report) else ""))
    ax.title.set_fontsize(9 if _multi(report) else 12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for i, r in enumerate(report["methods"]):
        pts = [p for p in r["curve"] if p.get(key) is not None]
        if pts:
            x = [p["train_seconds"] for p in pts]
            ax.plot(x, [p[key] for p in pts], marker="o", ms=3, color=f"C{i}", label=r["method"])
            if f"{key}_min" in pts[0]:  # several seeds: mean line, min–max band
                ax.fill_between(x, [p[f"{key}_min"] for p in pts], [p[f"{key}_max"] for p in pts], color=f"C{i}",
                                alpha=0.2, lw=0)
    ax.axhline(report["teacher_curve_reference"], color="k", ls=":", label="teacher, 35 NFE")
    title = "quality vs training time" + (f" (mean, min–max over {report['seeds']} seeds)" if _multi(report) else "")
    ax.set(yscale="log", xlabel="training wall-clock (s)",
           ylabel=f"{key.replace('_', '-')} (n={report['curve_samples']})", title=title)
    ax.title.set_fontsize(9 if _multi(report) else 12)
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


def _seed_notes(report) -> list[str]:
    """What the cells mean over seeds, which differences are significant, and which seeds failed."""
    key, n, s0 = report["quality_key"], report.get("seeds", 1), report["seed"]
    if n == 1:
        return [f"One seed (run seed {s0}): every figure is one run's value, without a confidence interval; "
                "--seeds N trains each method N times and adds 95 % intervals and significance tests."]
    notes = [f"{n} seeds per method (run seeds {s0}…{s0 + n - 1}, one run folder each, OUT/runs/<method>-seed<s>; "
             f"every run is evaluated on the same samples, seeds {s0}…): a student cell is the mean ± the "
             f"half-width of the 95 % Student-t interval, t(0.975, N−1)·s/√N over the seeds; train s, iterations, "
             "images/s and peak MiB are means; teacher rows are one evaluation (the teacher is not retrained); the "
             "training-time curves are the mean with a min–max band."]
    groups: dict[int, list] = {}
    for r in report["methods"]:
        for s in r.get("students", []):
            if "best_at_steps" in s:
                groups.setdefault(s["steps"], []).append((r["method"], s))
    for steps, group in sorted(groups.items()):
        best = next(m for m, s in group if s["best_at_steps"])
        others = [(m, s["p_vs_best"]) for m, s in group if not s["best_at_steps"]]
        sig = [f"{m} (p = {p:.2g})" for m, p in others if p is not None and p < ALPHA]
        same = [f"{m} (p = {p:.2g})" for m, p in others if p is not None and p >= ALPHA]
        untested = [m for m, p in others if p is None]
        notes.append(f"Significance at {steps} step(s), Welch's two-sided t-test of the last-checkpoint "
                     f"{key.replace('_', '-')} against the best mean ({best}), * = p < {ALPHA}: "
                     f"significantly worse: {', '.join(sig) or 'none'}; not significantly different: "
                     f"{', '.join(same) or 'none'}" + (f"; untested (< 2 seeds): {', '.join(untested)}"
                                                        if untested else "") + ".")
    for r in report["methods"]:
        if r.get("failed_seeds") and "error" not in r:
            notes.append(f"{r['method']}: {len(r['failed_seeds'])} of {r['n_seeds']} seeds failed ("
                         + "; ".join(f"seed {f['seed']}: {f['error']}" for f in r["failed_seeds"])
                         + "); its cells are over the other seeds.")
    return notes


def _diversity_notes(report) -> list[str]:
    key, tv = report["quality_key"], _tv_key(report)
    space = {"proxy_fid": "the digits classifier's 64-d features (those of proxy-FID), against the training digits",
             "sliced_w2": "the plane, against the same fresh draws as sliced W2"}.get(key, "the quality features")
    notes = [f"Diversity: precision / recall = the k-NN manifold estimator (Kynkäänniemi et al. 2019, k = 3) in "
             f"{space}: precision = fraction of generated samples inside the union of the real samples' k-NN "
             "balls (fidelity), recall = fraction of real samples inside the union of the generated samples' "
             "(coverage); both depend on the number of samples."]
    if tv == "class_tv":
        notes.append("class TV = total variation between the classifier's class histogram of the samples and that "
                     "of the training digits (0 = the same class proportions).")
        worst = []
        for name, m in [("teacher 35 NFE", report["teacher_rows"][-1])] + [
                (f"{r['method']} {s['steps']} step(s)", s) for r in report["methods"] for s in r.get("students", [])]:
            cr = [(v, c) for c, v in enumerate(m.get("class_recall") or []) if v is not None]
            if cr:
                v, c = min(cr)
                worst.append(f"{name}: digit {c} ({v:.2f})")
        if worst:
            notes.append("Lowest per-class recall (fraction of the real digits of one class inside the generated "
                         "manifold): " + "; ".join(worst) + ".")
        if _cond(report):
            notes.append("Class-conditional teacher (classes seed mod 10): class accuracy = share of samples the "
                         "classifier assigns to the class asked for; within-class spread = √(tr Σ_generated / tr "
                         "Σ_real) of the classifier features per requested class, averaged over classes (1 = as "
                         "varied as the real digits of that class, → 0 = collapse inside a class).")
    elif tv == "mode_tv":
        notes.append("mode TV = total variation between the fraction of samples nearest each mode and the "
                     "mixture's weights (uniform over the 8 modes; 0 = balanced).")
    ref = report["teacher_curve_reference"]
    notes.append(f"'last checkpoint' = the student at the end of training; 'best of curve (optimistic)' = the "
                 f"lowest of its curve evaluations (n = {report['curve_samples']}), which selects on evaluation "
                 f"noise. Time to 1.5× / 1× teacher: training seconds of the first curve evaluation at or below "
                 f"1.5× / 1× the teacher's 35-NFE {key.replace('_', '-')} at the same n ({ref:.4g}); over seeds, "
                 "the mean of the seeds that reached it, with their count. Curve columns sit on the row of the "
                 "variant the curve evaluates (the method's own sampling recipe).")
    return notes


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
                 for r in report["methods"]) + ".",
             *_seed_notes(report), *_diversity_notes(report)]
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
