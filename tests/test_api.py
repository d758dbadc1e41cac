"""The README's Python API example runs as written, and the API refuses bad input like the CLI."""

import re
from pathlib import Path

import pytest

import diffdistill as dd
from diffdistill.errors import UserError

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Python API"):text.index("## Commands")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert out[0] == "teacher" and out[1:5] == ["torch.Size([16,", "1,", "8,", "8])"] and out[5] == "0.0005"
    assert float(out[6]) > 0
    ckpts = sorted((tmp_path / "runs/api-dmd2/checkpoints").glob("ckpt-*.pt"))
    assert ckpts and ckpts[-1].name == "ckpt-00000020.pt"


def test_api_refuses_bad_options(tmp_path):
    from diffdistill.demo import SHIPPED_TEACHER
    with pytest.raises(UserError, match="method.lr must be > 0"):
        dd.distill("dmd2", SHIPPED_TEACHER, out=tmp_path / "x", iters=2, options={"lr": -1})
    with pytest.raises(UserError, match="not found"):
        dd.sample(tmp_path / "missing.pt")
    assert not (tmp_path / "x").exists()
