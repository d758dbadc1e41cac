"""CLI contract: sample/eval outputs, per-seed determinism, and one-line errors for bad input."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

CLI = [sys.executable, "-m", "diffdistill.cli"]


def run(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    r = run("train-teacher", "--preset", "ring8", "--out", out, "--iters", 30, "--batch-size", 64, "--no-progress",
            "--set", "net.kwargs.hidden=32", "--set", "run.sample_every=0")
    assert r.returncode == 0, r.stderr
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts and (out / "config.json").exists() and (out / "log.jsonl").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["net"]["kwargs"]["hidden"] == 32 and cfg["run"]["steps"] == 30
    return ckpts[-1]


def test_sample_npz_contract(teacher_ckpt, tmp_path):
    r = run("sample", teacher_ckpt, "--steps", 4, "--num-samples", 10, "--seed", 3, "--out", tmp_path / "s.npz")
    assert r.returncode == 0, r.stderr
    s = np.load(tmp_path / "s.npz")["samples"]
    assert s.shape == (10, 2) and s.dtype == np.float32
    assert "NFE 7" in r.stdout


def test_samples_depend_on_seed_only(teacher_ckpt):
    from diffdistill.io import load_for_sampling
    from diffdistill.eval.generate import generate
    net, _ = load_for_sampling(teacher_ckpt)
    spec = {"sampler": "heun", "nfe": 7}
    a, _, _ = generate(net, range(0, 12), spec, batch_size=12)
    b, _, _ = generate(net, range(0, 12), spec, batch_size=5)
    c, _, _ = generate(net, range(6, 12), spec, batch_size=4)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a[6:], c, atol=1e-5)


def test_eval_writes_metrics_json(teacher_ckpt, tmp_path):
    out = tmp_path / "m.json"
    r = run("eval", teacher_ckpt, "--steps", 3, "--num-samples", 300, "--out", out)
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    for key in ("dataset", "role", "method", "nfe", "num_samples", "seed", "images_per_second", "sliced_w2", "mmd"):
        assert key in m, key
    assert m["role"] == "teacher" and m["nfe"] == 5 and m["num_samples"] == 300 and m["dataset"] == "ring8"


@pytest.mark.parametrize("args,needle", [
    (["eval", "does/not/exist.pt"], "checkpoint not found"),
    (["sample", "nope.pt", "--out", "x.npz"], "checkpoint not found"),
    (["train-teacher", "--iters", "-3"], "run.steps (--iters) must be >= 1, got -3"),
    (["train-teacher", "--preset", "cifar"], "invalid choice"),
    (["train-teacher", "--data", "/no/such/folder"], "/no/such/folder"),
    (["train-teacher", "--set", "oops"], "--set expects key=value"),
    (["frobnicate"], "invalid choice"),
    (["eval", "x.pt", "--num-samples", "many"], "invalid int value"),
])
def test_bad_input_one_line_no_traceback(args, needle, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("diffdistill: error:") and needle in err, err
    assert not any(tmp_path.iterdir()), "no partial outputs on bad input"


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    r = run("eval", bad)
    assert r.returncode == 2 and "corrupted" in r.stderr and "Traceback" not in r.stderr


def test_wrong_shape_data_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 5), dtype=np.float32))
    r = run("train-teacher", "--data", tmp_path / "bad.npz", "--out", tmp_path / "run", "--iters", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for c in ("train-teacher", "sample", "eval", "demo"):
        assert c in r.stdout


def _commands():
    """(name, parser) of the top-level parser and of every subcommand."""
    from diffdistill.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("diffdistill", parser), *sub.choices.items()]


def test_every_flag_of_every_command_has_help_with_its_default():
    """A flag added without help fails here: every argument says what it does, and every optional value flag says
    its default (``argparse.SUPPRESS`` marks a deliberately hidden, deprecated spelling; --set is repeatable, with
    nothing set by default)."""
    missing, no_default = [], []
    for name, parser in _commands():
        parser.format_help()  # a bad %(default)s placeholder would raise here
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
                continue
            flag = f"{name} {'/'.join(a.option_strings) or a.dest}"
            if not (a.help or "").strip():
                missing.append(flag)
            elif (a.option_strings and a.nargs != 0 and not a.required and not isinstance(a, argparse._AppendAction)
                  and "default" not in a.help):
                no_default.append(flag)
    assert not missing, f"no help text: {missing}"
    assert not no_default, f"help does not say the default: {no_default}"


def test_distill_help_says_how_to_list_a_methods_options():
    text = dict(_commands())["distill"].format_help()
    assert "diffdistill options METHOD" in " ".join(text.split())
    assert "--steps" not in text.replace("--student-steps", "")  # the deprecated spelling is not advertised


def test_export_roundtrip(teacher_ckpt, tmp_path):
    out = tmp_path / "t.safetensors"
    r = run("export", teacher_ckpt, out)
    assert r.returncode == 0, r.stderr
    from diffdistill.io import load_for_sampling
    from diffdistill.eval.generate import generate
    a, sa = load_for_sampling(teacher_ckpt)
    b, sb = load_for_sampling(out)
    assert sb["role"] == "teacher" and sb["net_config"] == sa["net_config"] and sb["sampling"] == sa["sampling"]
    xa, _, _ = generate(a, range(8), {"sampler": "heun", "nfe": 5})
    xb, _, _ = generate(b, range(8), {"sampler": "heun", "nfe": 5})
    assert torch.equal(xa, xb)
    r = run("export", teacher_ckpt, tmp_path / "t.bin")
    assert r.returncode == 2 and "safetensors" in r.stderr


def test_distill_refuses_a_non_teacher_and_unknown_method(teacher_ckpt, tmp_path):
    r = run("distill", "--method", "nope", "--teacher", teacher_ckpt, cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
    r = run("distill", "--method", "dmd2", "--teacher", teacher_ckpt, "--set", "method.bogus=1", cwd=tmp_path)
    assert r.returncode == 2 and "bogus" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["dmd2", "dmd", "diff-instruct"])
def test_distill_cli_runs_and_student_checkpoint_samples(method, teacher_ckpt, tmp_path):
    out = tmp_path / method
    extra = ["--set", "method.num_pairs=64"] if method == "dmd" else []
    r = run("distill", "--method", method, "--teacher", teacher_ckpt, "--iters", 5, "--out", out, "--no-progress",
            "--batch-size", 32, "--set", "run.sample_every=0", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    r = run("eval", ckpt, "--num-samples", 200, "--out", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["role"] == "student" and m["method"] == method.replace("-", "_") and m["nfe"] == 1


def test_old_flag_spellings_still_work_with_a_deprecation_line(capsys):
    from diffdistill.cli import build_parser
    a = build_parser().parse_args(["train-teacher", "--steps", "5"])
    assert a.iters == 5 and "--steps is deprecated here, use --iters" in capsys.readouterr().err
    a = build_parser().parse_args(["distill", "--method", "dmd2", "--teacher", "t.pt", "--steps", "4"])
    assert a.student_steps == 4 and "use --student-steps" in capsys.readouterr().err
    a = build_parser().parse_args(["distill", "--method", "dmd2", "--teacher", "t.pt", "--student-steps", "2",
                                   "--iters", "7", "--budget-minutes", "1.5"])
    assert (a.student_steps, a.iters, a.budget_minutes) == (2, 7, 1.5) and capsys.readouterr().err == ""


def test_demo_reports_progress_and_headline_and_runs_again(tmp_path, capsys):
    from diffdistill.cli import main
    args = ["demo", "--out", str(tmp_path / "demo"), "--num-samples", "40", "--distill-iters", "2", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/6] teacher, Heun, 18 steps (NFE 35)" in out and "resume auto" not in out
    assert "dmd2 student, 1 NFE: proxy-FID" in out and "× the teacher's" in out and "demo done in" in out
    assert (tmp_path / "demo" / "report.md").is_file()
    assert main(args) == 0, "a second demo into the same folder continues its own runs"


def test_budget_minutes_decides_the_length_unless_iters_is_given():
    """`--budget-minutes M` alone trains for M minutes (the preset's iteration count no longer stops it, as in
    `compare`); with `--iters N` too, N still caps the run."""
    from diffdistill.cli import _run_flags, build_parser
    p = build_parser()
    for cmd in (["distill", "--method", "dmd2", "--teacher", "t.pt"], ["train-teacher"]):
        run = _run_flags(p.parse_args(cmd + ["--budget-minutes", "30"]))["run"]
        assert run["max_minutes"] == 30 and run["steps"] >= 10 ** 9
        run = _run_flags(p.parse_args(cmd + ["--budget-minutes", "30", "--iters", "500"]))["run"]
        assert (run["max_minutes"], run["steps"]) == (30, 500)
        assert "steps" not in _run_flags(p.parse_args(cmd))["run"]
