"""The bad-input corpus (tests/bad_inputs/cases.yaml): every case must exit with code 2, print exactly one line
``diffdistill: error: …`` naming the problem and the fix, print no traceback, and write nothing.

The CLI runs in-process (``diffdistill.cli.main``), so a case costs milliseconds, not an interpreter start.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from diffdistill.cli import main

BAD = Path(__file__).resolve().parent / "bad_inputs"
CASES = yaml.safe_load((BAD / "cases.yaml").read_text())
SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "src/diffdistill/assets/teacher_digits.safetensors"


def _snapshot(*roots) -> dict:
    """path → sha256 of every file under the roots (to prove a failed command changed nothing)."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The checkpoints of the corpus, made once per module: a real teacher and damaged copies of it, a student of
    another method, a class-conditional teacher, and a run folder whose checkpoints are all corrupt."""
    from diffdistill.io.checkpoint import list_checkpoints, manifest_path
    root = tmp_path_factory.mktemp("bad_corpus")
    assert main(["train-teacher", "--preset", "ring8", "--out", str(root / "teacher"), "--iters", "4",
                 "--batch-size", "32", "--no-progress", "--set", "net.kwargs.hidden=16", "--set",
                 "run.sample_every=0"]) == 0
    teacher = list_checkpoints(root / "teacher" / "checkpoints")[-1]
    data = teacher.read_bytes()
    paths = {"teacher": teacher, "digits_teacher": SHIPPED_TEACHER}
    for name, content, with_manifest in [("truncated", data[: len(data) // 2], True),
                                         ("flipped", data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:], True),
                                         ("truncated_bare", data[: len(data) // 2], False)]:
        p = root / "damaged" / name / teacher.name
        p.parent.mkdir(parents=True)
        p.write_bytes(content)
        if with_manifest:
            shutil.copy(manifest_path(teacher), manifest_path(p))
        paths[name] = p
    assert main(["distill", "--method", "dmd2", "--teacher", str(teacher), "--iters", "2", "--batch-size", "16",
                 "--out", str(root / "student"), "--no-progress", "--set", "run.sample_every=0"]) == 0
    paths["student"] = list_checkpoints(root / "student" / "checkpoints")[-1]
    assert main(["train-teacher", "--preset", "digits", "--out", str(root / "cond"), "--iters", "1", "--batch-size",
                 "8", "--no-progress", "--set", "net.label_dim=10", "--set", "net.kwargs.model_channels=8",
                 "--set", "net.kwargs.num_blocks=1", "--set", "net.kwargs.attn_resolutions=[]",
                 "--set", "run.sample_every=0"]) == 0
    paths["cond_teacher"] = list_checkpoints(root / "cond" / "checkpoints")[-1]
    corrupt_run = root / "corrupt_run" / "checkpoints"
    corrupt_run.mkdir(parents=True)
    for step in (10, 20):
        p = corrupt_run / f"ckpt-{step:08d}.pt"
        p.write_bytes(data[: len(data) // 3])
        shutil.copy(manifest_path(teacher), manifest_path(p))
    paths["corrupt_run"] = corrupt_run.parent
    return {k: str(v) for k, v in paths.items()}


def _unmet(needs) -> str | None:
    from diffdistill.cli import build_parser
    from diffdistill.methods.registry import list_methods
    for need in needs or []:
        kind, _, what = need.partition(":")
        if kind == "method" and what not in list_methods(role="student"):
            return f"method {what!r} is not registered yet"
        if kind == "flag":
            distill = build_parser()._subparsers._group_actions[0].choices["distill"]
            if what not in distill._option_string_actions:
                return f"distill has no {what} flag yet"
        if kind == "no-cuda" and torch.cuda.is_available():
            return "a GPU is present"
    return None


def test_corpus_is_listed_and_large():
    """Every static file is used by some case, and the corpus covers the categories of issue 9."""
    text = (BAD / "cases.yaml").read_text()
    static = [p for p in BAD.iterdir() if p.name not in ("cases.yaml", "make_corpus.py", "README.md")
              and not p.name.startswith((".", "_"))]
    unused = [p.name for p in static if f"{{bad}}/{p.name}" not in text]
    assert not unused, unused
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, corpus, tmp_path, monkeypatch, capsys):
    why = _unmet(case.get("needs"))
    if why:
        pytest.skip(why)
    out, scratch, cwd = tmp_path / "out", tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    fill = dict(corpus, bad=str(BAD), out=str(out), tmp=str(scratch))
    argv = [str(a).format(**fill) for a in case["argv"]]
    if argv[0] in ("train-teacher", "distill") and "--out" not in argv:
        argv += ["--out", str(out)]
    monkeypatch.chdir(cwd)  # default outputs (runs/...) would land here
    for k, v in (case.get("env") or {}).items():
        monkeypatch.setenv(k, str(v))
    inputs = [BAD] + [Path(p) for p in corpus.values()]
    before = _snapshot(*(p if p.is_dir() else p.parent for p in inputs))
    capsys.readouterr()

    rc = main(argv)

    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert rc == 2, (rc, stderr)
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("diffdistill: error: "), line
    assert case["expect"].lower() in line.lower(), line
    assert case["fix"].lower() in line.lower(), line
    # nothing written: no run folder / sample file, nothing in the working directory, inputs untouched
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir()), list(tmp_path.iterdir())
    assert not any(cwd.iterdir()) and not any(scratch.iterdir())
    assert _snapshot(*(p if p.is_dir() else p.parent for p in inputs)) == before
