"""`diffdistill compare`: one command, every requested method, a table and a static page that renders."""

import json
import math
import re

import numpy as np
import pytest

from diffdistill.cli import main
from diffdistill.errors import UserError


@pytest.fixture(scope="module")
def compare_report(ring8_teacher, tmp_path_factory):
    from diffdistill.compare import compare
    from diffdistill.methods.diff_instruct import DiffInstruct
    from diffdistill.methods.registry import METHODS, register

    # A method the compare module has never heard of: registering it is all it takes to appear in the report.
    @register
    class RenamedDI(DiffInstruct):
        name = "renamed_di_test"
    try:
        out = tmp_path_factory.mktemp("compare")
        report = compare(ring8_teacher.path, ["sid", "renamed-di-test"], out=out, iters=90, num_samples=400,
                         curve_samples=200, curve_points=3, progress=False,
                         overrides=["run.batch_size=128", "run.ckpt_every=0"])
    finally:
        METHODS.pop("renamed_di_test", None)
    return out, report


def test_compare_table_rows_and_files(compare_report):
    out, report = compare_report
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == 5 + 2                               # teacher at 1/2/4/8/35 NFE + one 1-step student each
    assert [r["nfe"] for r in report["teacher_rows"]] == [1, 2, 4, 8, 35]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[5:] == ["sid", "renamed_di_test"]
    for m in report["methods"]:
        assert "error" not in m, m
        assert m["iterations"] == 90 and m["train_seconds"] > 0 and m["peak_memory_mib"] > 0
        assert [p["step"] for p in m["curve"]] == [30, 60, 90]
        (s,) = m["students"]
        assert s["nfe"] == 1 and s["sliced_w2"] > 0 and s["images_per_second"] > 0
        assert (out / s["grid"]).stat().st_size > 1000
    # distillation moved both students well past the untrained 1-step teacher
    assert all(m["students"][0]["sliced_w2"] < 0.7 * report["teacher_rows"][0]["sliced_w2"] for m in report["methods"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["quality_key"] == "sliced_w2" and len(saved["methods"]) == 2
    for png in ("quality_vs_nfe.png", "quality_vs_time.png", "samples_teacher_35nfe.png"):
        assert (out / png).stat().st_size > 1000


def test_compare_html_is_self_contained(compare_report):
    out, _ = compare_report
    page = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 2 + 1 + 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http" not in page and page.count("<tr>") == 1 + 7


def test_compare_html_renders_in_a_real_browser(compare_report):
    from diffdistill.eval.html_check import find_browser, render_check
    if find_browser() is None:
        pytest.skip("no headless Chromium here (.ci/run installs Debian's chromium when it can)")
    out, _ = compare_report
    r = render_check(out / "report.html")
    assert r["rows"] == 7 and r["cells"] == 7 * 16  # 16 columns with one seed (no significance column)
    assert len(r["images"]) == 5
    assert all(i["complete"] and i["width"] >= 200 and i["height"] >= 200 for i in r["images"]), r["images"]


def test_compare_refuses_bad_methods_before_doing_any_work(ring8_teacher, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--teacher", str(ring8_teacher.path), "--methods", "dmd2,nosuch", "--out", str(out)]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert main(["compare", "--teacher", str(ring8_teacher.path), "--methods", "edm", "--out", str(out)]) == 2
    assert "trains teachers" in capsys.readouterr().err
    assert main(["compare", "--teacher", str(ring8_teacher.path), "--methods", "dmd2", "--iters", "0",
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_time_budget_stops_training_and_checkpoints(ring8_teacher, tmp_path):
    from diffdistill.distill import distill
    from diffdistill.io.checkpoint import list_checkpoints
    tr = distill("diff_instruct", ring8_teacher.path,
                 flags={"run": {"out": str(tmp_path), "steps": 100000, "max_minutes": 0.02, "progress": False,
                                "ckpt_every": 0, "sample_every": 0, "batch_size": 64}})
    assert 0 < tr.step < 100000 and tr.train_seconds >= 1.2
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == f"ckpt-{tr.step:08d}.pt"
    with pytest.raises(UserError, match="max_minutes"):
        distill("diff_instruct", ring8_teacher.path, flags={"run": {"out": str(tmp_path / "b"), "max_minutes": -1}})


def test_compare_with_el_marks_the_methods_that_take_it(ring8_teacher, tmp_path):
    from diffdistill.compare import compare
    r = compare(ring8_teacher.path, ["sid", "pd"], out=tmp_path, iters=24, num_samples=200, curve_samples=100,
                curve_points=2, progress=False, el_weight=0.5, overrides=["run.batch_size=64", "run.ckpt_every=0"])
    names = [m["method"] for m in r["methods"]]
    assert names == ["sid+EL", "pd"] and all("error" not in m for m in r["methods"])
    md = (tmp_path / "report.md").read_text()
    assert "| sid+EL | 1 |" in md and "rows marked +EL" in md
    assert (tmp_path / "runs" / "sid+EL" / "config.json").exists()


# ------------------------------------------------------------------------------------------------ several seeds
def test_t_interval_matches_scipy():
    from scipy import stats
    from diffdistill.eval.stats import fmt_ci, t_interval
    g = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        x = g.normal(3.0, 2.0, size=n)
        lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        m, h = t_interval(list(x))
        assert m == pytest.approx(x.mean(), rel=1e-12)
        assert (m - h, m + h) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
        lo90, hi90 = stats.t.interval(0.9, n - 1, loc=x.mean(), scale=stats.sem(x))
        assert t_interval(list(x), confidence=0.9)[1] == pytest.approx((hi90 - lo90) / 2, rel=1e-12)
    assert t_interval([0.7]) == (0.7, None)                       # one seed: no interval
    assert t_interval([1.0, None, 3.0]) == t_interval([1.0, 3.0])  # missing values dropped
    assert t_interval([2.0, 2.0, 2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        t_interval([])
    assert fmt_ci(1.23456, 0.1, ".3g") == "1.23 ± 0.1" and fmt_ci(5.0, None, ".0f") == "5" and fmt_ci(None, 1) == "–"


def test_welch_p_matches_its_formula():
    """Welch–Satterthwaite by hand: t = Δmean / √(s_a²/n_a + s_b²/n_b), ν from the usual formula, p = 2·sf(|t|)."""
    from scipy import stats
    from diffdistill.eval.stats import welch_p
    g = np.random.default_rng(1)
    for na, nb, shift in ((2, 2, 1.0), (3, 5, 0.3), (6, 4, 2.0)):
        a, b = g.normal(0, 1, na), g.normal(shift, 2, nb)
        va, vb = a.var(ddof=1) / na, b.var(ddof=1) / nb
        t = (a.mean() - b.mean()) / math.sqrt(va + vb)
        nu = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
        assert welch_p(list(a), list(b)) == pytest.approx(2 * stats.t.sf(abs(t), nu), rel=1e-10)
    assert welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0 and welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0
    assert welch_p([1.0], [2.0, 3.0]) is None
    assert welch_p([1.0, 1.1, 0.9], [5.0, 5.2, 4.9]) < 0.05 < welch_p([1.0, 2.0, 3.0], [1.5, 2.5, 2.0])


def _run(seed, q, curve, reach=None, error=None):
    if error:
        return {"method": "m", "seed": seed, "error": error, "curve": []}
    return {"method": "m", "seed": seed, "iterations": 10, "train_seconds": 2.0 + seed, "wall_seconds": 3.0,
            "peak_memory_mib": None, "curve_steps": 1, "best_of_curve": min(curve),
            "seconds_to_teacher_quality": reach, "seconds_to_1.5x_teacher_quality": 1.0 + seed,
            "curve": [{"step": 5 * (i + 1), "train_seconds": float(i + 1), "sliced_w2": v} for i, v in enumerate(curve)],
            "students": [{"steps": 1, "spec": {}, "grid": "g.png", "nfe": 1, "sliced_w2": q, "precision": 0.5 + seed / 10,
                          "images_per_second": 100.0}]}


def test_aggregate_seeds_and_significance():
    from scipy import stats
    from diffdistill.compare import aggregate_seeds, significance
    runs = [_run(0, 0.2, [0.5, 0.3], reach=4.0), _run(1, 0.4, [0.6, 0.35, 0.1]), _run(2, 0.3, [0.4, 0.2]),
            _run(3, None, None, error="diverged at step 7")]
    agg = aggregate_seeds("m", runs, "sliced_w2")
    assert agg["ok_seeds"] == [0, 1, 2] and agg["failed_seeds"] == [{"seed": 3, "error": "diverged at step 7"}]
    (st,) = agg["students"]
    assert st["sliced_w2"] == pytest.approx(0.3) and st["values"]["sliced_w2"] == [0.2, 0.4, 0.3]
    lo, hi = stats.t.interval(0.95, 2, loc=0.3, scale=stats.sem([0.2, 0.4, 0.3]))
    assert st["ci"]["sliced_w2"] == pytest.approx((hi - lo) / 2)
    assert st["precision"] == pytest.approx(0.6) and "kid" not in st
    assert agg["train_seconds"] == pytest.approx(3.0) and "peak_memory_mib" not in agg
    assert agg["best_of_curve"] == pytest.approx((0.3 + 0.1 + 0.2) / 3)
    # time to quality: over the seeds that reached it, counted
    assert agg["seconds_to_teacher_quality"] == 4.0 and agg["seconds_to_teacher_quality_reached"] == 1
    assert agg["seconds_to_1.5x_teacher_quality_reached"] == 3
    # the band covers the evaluations every seed has (two), mean / min / max across seeds
    assert [p["step"] for p in agg["curve"]] == [5, 10]
    assert agg["curve"][1]["sliced_w2_min"] == 0.2 and agg["curve"][1]["sliced_w2_max"] == 0.35
    assert aggregate_seeds("m", runs[3:], "sliced_w2")["error"].startswith("all 1 seeds failed")

    other = aggregate_seeds("n", [_run(0, 0.9, [1.0]), _run(1, 1.0, [1.0])], "sliced_w2")
    significance([agg, other], "sliced_w2")
    assert agg["students"][0]["best_at_steps"] and agg["students"][0]["p_vs_best"] is None
    p = other["students"][0]["p_vs_best"]
    assert p == pytest.approx(stats.ttest_ind([0.2, 0.4, 0.3], [0.9, 1.0], equal_var=False).pvalue) and p < 0.05


def test_compare_seeds_must_be_positive(ring8_teacher, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--teacher", str(ring8_teacher.path), "--methods", "sid", "--seeds", "0",
                 "--out", str(out)]) == 2
    assert "--seeds must be a positive whole number" in capsys.readouterr().err and not out.exists()


def test_compare_two_seeds_end_to_end(ring8_teacher, tmp_path, capsys):
    """`compare --seeds 2` on ring8: one run folder per (method, seed) with its own run seed, cells mean ± CI over the
    seeds, a Welch column, bands in the plots; a second call resumes every seed's run instead of retraining."""
    from scipy import stats
    out = tmp_path / "cmp"
    args = ["compare", "--teacher", str(ring8_teacher.path), "--methods", "sid,diff-instruct", "--seeds", "2",
            "--iters", "24", "--num-samples", "200", "--curve-points", "2", "--no-progress", "--out", str(out),
            "--set", "run.batch_size=64", "--set", "run.ckpt_every=0"]
    assert main(args) == 0
    runs = out / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["diff_instruct-seed0", "diff_instruct-seed1", "sid-seed0",
                                                      "sid-seed1"]
    assert json.loads((runs / "sid-seed1" / "config.json").read_text())["run"]["seed"] == 1
    report = json.loads((out / "metrics.json").read_text())
    assert report["seeds"] == 2 and report["run_seeds"] == [0, 1]
    for m in report["methods"]:
        assert "error" not in m and [r["seed"] for r in m["runs"]] == [0, 1] and m["iterations"] == 24
        (s,) = m["students"]
        v = s["values"]["sliced_w2"]
        assert v == [r["students"][0]["sliced_w2"] for r in m["runs"]] and v[0] != v[1]  # the run seed matters
        lo, hi = stats.t.interval(0.95, 1, loc=np.mean(v), scale=stats.sem(v))
        assert s["sliced_w2"] == pytest.approx(np.mean(v)) and s["ci"]["sliced_w2"] == pytest.approx((hi - lo) / 2)
        assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1 and s["mode_tv"] >= 0
        assert [p["step"] for p in m["curve"]] == [12, 24] and "sliced_w2_min" in m["curve"][0]
    assert sum(s["best_at_steps"] for m in report["methods"] for s in m["students"]) == 1

    md = (out / "report.md").read_text()
    rows = [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("| ") and not
            line.startswith("| model")]
    assert len(rows) == 5 + 2 and all(len(r) == 17 for r in rows)
    for r in rows[5:]:
        assert all("±" in r[i] for i in (3, 5, 6, 7))           # quality, precision, recall, mode TV
        assert r[16].strip() == "best" or re.fullmatch(r" [0-9.e-]+( \*)? ", r[16])
    assert "best of curve (optimistic" in md and "train s to 1.5× teacher" in md and "Welch's two-sided t-test" in md
    assert "95 % Student-t interval" in md
    for png in ("quality_vs_nfe.png", "quality_vs_time.png", "samples_sid_1step.png",
                "samples_diff_instruct_1step.png"):
        assert (out / png).stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count("<tr>") == 1 + 7 and page.count("<td>") == 7 * 17

    capsys.readouterr()
    assert main(args) == 0  # again: every (method, seed) resumes its finished run
    log = capsys.readouterr()
    assert (log.out + log.err).count("resumed from") == 4 and "starting fresh" not in log.out + log.err
    again = json.loads((out / "metrics.json").read_text())
    assert [m["students"][0]["values"]["sliced_w2"] for m in again["methods"]] == \
        [m["students"][0]["values"]["sliced_w2"] for m in report["methods"]]


def test_compare_on_a_class_conditional_teacher_reports_correctness_and_within_class_spread(tmp_path):
    """A class-conditional digits teacher adds two columns to every row: class accuracy and the within-class
    spread (eval.evaluate.conditional_spread), for the teacher rows and the students alike."""
    from diffdistill.compare import compare, table_rows, _headers
    from diffdistill.demo import SHIPPED_TEACHER
    teacher = SHIPPED_TEACHER.with_name("teacher_digits_cond.safetensors")
    report = compare(teacher, ["diff_instruct"], out=tmp_path, iters=2, num_samples=60, curve_samples=60,
                     curve_points=1, batch=16, progress=False, overrides=["run.batch_size=8", "run.ckpt_every=0"])
    heads = _headers(report)
    acc, spread = heads.index("class accuracy"), heads.index("within-class spread")
    rows = table_rows(report)
    teacher35 = next(r for r in report["teacher_rows"] if r["nfe"] == 35)
    assert teacher35["class_accuracy"] > 0.9 and 0.7 < teacher35["cond_spread"] < 1.3
    assert rows[4][acc] == f"{teacher35['class_accuracy']:.3f}" and rows[4][spread] == f"{teacher35['cond_spread']:.3f}"
    student = report["methods"][0]["students"][0]
    assert rows[5][spread] == f"{student['cond_spread']:.3f}" and all(len(r) == len(heads) for r in rows)
    assert "within-class spread = " in (tmp_path / "report.md").read_text()
