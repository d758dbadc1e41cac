"""Presets: valid options, official presets equal the documented constructor defaults, config files up to date."""

import importlib.util
import inspect
from pathlib import Path

import pytest
import yaml

from diffdistill.methods.registry import METHODS, list_methods
from diffdistill.train.trainer import check_method_options

ROOT = Path(__file__).resolve().parent.parent
list_methods()
PRESETS = [(name, kind) for name in sorted(METHODS) for kind in sorted(getattr(METHODS[name], "presets", {}))]


def _writer():
    spec = importlib.util.spec_from_file_location("write_preset_configs", ROOT / "scripts" / "write_preset_configs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,kind", PRESETS)
def test_preset_options_are_valid(name, kind):
    preset = METHODS[name].presets[kind]
    assert set(preset) <= {"run", "method", "data", "net"}
    check_method_options(METHODS[name], preset.get("method", {}))  # raises UserError on an unknown option


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if "official" in getattr(METHODS[n], "presets", {})])
def test_official_preset_matches_constructor_defaults(name):
    """The constructor defaults are documented as the paper's; the official preset must not contradict them."""
    defaults = {k: p.default for k, p in inspect.signature(METHODS[name].__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for key, value in METHODS[name].presets["official"].get("method", {}).items():
        want = defaults[key]
        assert (list(want) if isinstance(want, tuple) else want) == value, (name, key)


def test_config_files_match_the_presets():
    files = _writer().all_files()
    assert files, "no presets found"
    for rel, text in files.items():
        path = ROOT / "configs" / rel
        assert path.exists(), f"{path} missing: run python scripts/write_preset_configs.py"
        assert path.read_text() == text, f"{path} is stale: run python scripts/write_preset_configs.py"
        assert yaml.safe_load(text) == METHODS[rel.split("/")[0]].presets[rel.split("/")[1][:-5]]
    stray = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").glob("*/*.yaml")} - set(files)
    assert not stray, f"config files without a preset: {stray}"


def test_a_config_file_gives_the_same_run_as_the_builtin_preset(ring8_teacher):
    import torch
    from diffdistill.distill import distill_config
    state = torch.load(ring8_teacher.path, weights_only=True)
    builtin = distill_config("dmd2", state)
    from_file = distill_config("dmd2", state, config_file=str(ROOT / "configs" / "dmd2" / "points.yaml"))
    assert from_file == builtin
    official = distill_config("dmd2", state, config_file=str(ROOT / "configs" / "dmd2" / "official.yaml"))
    assert official["run"]["batch_size"] == 280 and official["method"]["lr"] == 2e-6


def test_dmd2_lr_decay_over_the_run_follows_iters(ring8_teacher):
    """method.lr_decay_steps=run becomes the run's length, after --iters; a number stays as given."""
    import torch
    from diffdistill.distill import distill_config
    state = torch.load(ring8_teacher.path, weights_only=True)
    cfg = distill_config("dmd2", state, flags={"run": {"steps": 1234}}, overrides=["method.lr_decay_steps=run"])
    assert cfg["method"]["lr_decay_steps"] == 1234
    cfg = distill_config("dmd2", state, overrides=["method.lr_decay_steps=500", "run.steps=900"])
    assert cfg["method"]["lr_decay_steps"] == 500
