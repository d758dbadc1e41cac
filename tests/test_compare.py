"""`diffdistill compare`: one command, every requested method, a table and a static page that renders."""

import json
import re

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
    assert r["rows"] == 7 and r["cells"] == 70
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
