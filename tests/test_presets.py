"""Presets are YAML deltas on the methods' typed options, and `official` means official.

The complete-options test resolves the `official` preset of every method on an image and on a 2-D teacher and
compares every resolved method option with the schema's dataclass defaults (the official recipe), and the run
section with the official run settings of the preset file — field by field, nothing else may leak in.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffdistill.config import PRESET_DIR, RUN_DEFAULTS, list_presets, load_preset
from diffdistill.distill import distill_config
from diffdistill.errors import UserError
from diffdistill.methods.registry import METHODS, list_methods

ROOT = Path(__file__).resolve().parent.parent
list_methods()
STUDENT_METHODS = sorted(k for k, v in METHODS.items() if v.role == "student")
TEACHER_STATES = {
    "images": {"config": {"data": {"name": "digits", "split": "train"}},
               "net_config": {"arch": "songunet", "img_channels": 1, "img_resolution": 8, "label_dim": 0}},
    "points": {"config": {"data": {"name": "ring8", "n": 2000}},
               "net_config": {"arch": "mlp", "img_channels": 2, "img_resolution": 0, "label_dim": 0}},
}
PRESET_FILES = sorted(PRESET_DIR.glob("*/*.yaml"))


def test_every_student_method_has_the_three_presets():
    assert len(STUDENT_METHODS) == 8, STUDENT_METHODS
    for name in STUDENT_METHODS:
        assert {"official", "images", "points"} <= set(list_presets(name)), name


@pytest.mark.parametrize("kind", sorted(TEACHER_STATES))
@pytest.mark.parametrize("name", STUDENT_METHODS)
def test_official_resolves_to_exactly_the_dataclass_defaults(name, kind):
    cls = METHODS[name]
    cfg = distill_config(name, copy.deepcopy(TEACHER_STATES[kind]), preset="official")
    method = dict(cfg["method"])
    assert method.pop("name") == name
    defaults = cls.Options.defaults()
    assert set(method) == set(defaults), name
    for key, value in defaults.items():
        assert method[key] == value, (name, kind, key, method[key], value)
    # run: the defaults plus exactly the official file's run settings
    official_run = load_preset(name, "official").get("run", {})
    want = dict(RUN_DEFAULTS, out=f"runs/{name}", **official_run)
    for key in want:
        if key == "steps" and "steps" not in official_run:
            continue  # a method may derive its length from its own schedule (PD: halvings × iterations)
        assert cfg["run"][key] == want[key], (name, kind, key)
    assert cfg["preset"]["name"] == "official"
    # --config official.yaml is the same run as --preset official
    same = distill_config(name, copy.deepcopy(TEACHER_STATES[kind]), config_file=str(PRESET_DIR / name / "official.yaml"))
    assert same == cfg


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_files_are_deltas_on_the_schema(path):
    raw = yaml.safe_load(path.read_text())
    assert raw.get("preset") == path.stem, "a preset file names itself in its first key"
    assert "name" not in (raw.get("method") or {})
    owner = path.parent.name
    if owner == "edm":
        return
    assert path.stem != "official" or not raw.get("method"), "official.yaml sets run options only"
    # every value is accepted by the schema, and every delta differs from the default it overrides
    cls = METHODS[owner]
    defaults = cls.Options.defaults()
    for key, value in (raw.get("method") or {}).items():
        assert key in defaults, (path, key)
        assert value != defaults[key], f"{path}: {key} repeats the default"
    cls.Options.from_dict(raw.get("method") or {})
    for kind, state in TEACHER_STATES.items():
        cfg = distill_config(owner, copy.deepcopy(state), preset=path.stem)
        assert cfg["preset"]["file"] == str(path)


def test_default_preset_follows_the_teacher_kind():
    for kind, state in TEACHER_STATES.items():
        assert distill_config("dmd2", copy.deepcopy(state))["preset"]["name"] == kind


def test_config_file_builds_on_its_own_preset_key(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("preset: official\nmethod:\n  lr: 1.0e-4\nrun:\n  # every key commented out\n")
    cfg = distill_config("dmd2", copy.deepcopy(TEACHER_STATES["images"]), config_file=str(f))
    assert cfg["method"]["lr"] == 1e-4 and cfg["method"]["dm_t_min"] == METHODS["dmd2"].Options().dm_t_min
    assert cfg["run"]["batch_size"] == load_preset("dmd2", "official")["run"]["batch_size"]


@pytest.mark.parametrize("bad,match", [
    ({"overrides": ["mehtod.lr=1e-4"]}, r"unknown section 'mehtod' \(did you mean 'method'\?\)"),
    ({"overrides": ["run.stpes=3"]}, r"run.stpes is not an option .*did you mean 'steps'"),
    ({"overrides": ["method.lr=fast"]}, r"method.lr must be number > 0, got 'fast'"),
    ({"overrides": ["method.lr=-1"]}, r"method.lr must be > 0"),
    ({"overrides": ["method.lr=nan"]}, r"method.lr must be number"),
    ({"overrides": ["run.seed=abc"]}, r"run.seed \(--seed\) must be integer"),
    ({"overrides": ["run.grad_clip=-1"]}, r"run.grad_clip must be > 0"),
    ({"overrides": ["method.gan_wieght=1"]}, r"did you mean 'gan_weight'"),
    ({"preset": "offical"}, r"unknown preset 'offical' .*did you mean 'official'"),
])
def test_bad_values_are_refused_from_the_schema(bad, match):
    with pytest.raises(UserError, match=match):
        distill_config("dmd2", copy.deepcopy(TEACHER_STATES["images"]), **bad)


def test_typo_section_in_a_config_file(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("mehtod:\n  lr: 1.0e-4\n")
    with pytest.raises(UserError, match="unknown section 'mehtod'"):
        distill_config("dmd2", copy.deepcopy(TEACHER_STATES["images"]), config_file=str(f))


def test_dmd2_lr_decay_over_the_run_follows_iters():
    """method.lr_decay_steps=run becomes the run's length, after --iters; a number stays as given."""
    state = TEACHER_STATES["points"]
    cfg = distill_config("dmd2", copy.deepcopy(state), flags={"run": {"steps": 1234}},
                         overrides=["method.lr_decay_steps=run"])
    assert cfg["method"]["lr_decay_steps"] == 1234
    cfg = distill_config("dmd2", copy.deepcopy(state), overrides=["method.lr_decay_steps=500", "run.steps=900"])
    assert cfg["method"]["lr_decay_steps"] == 500
    from diffdistill.options import UNBOUNDED_STEPS
    with pytest.raises(UserError, match="give --iters N too"):   # --budget-minutes alone: no length to decay over
        distill_config("dmd2", copy.deepcopy(state), flags={"run": {"steps": UNBOUNDED_STEPS, "max_minutes": 30}},
                       overrides=["method.lr_decay_steps=run"])


@pytest.mark.parametrize("name", ["sid", "diff_instruct"])
def test_image_presets_decay_only_past_their_measured_lengths(name):
    """SiD's and Diff-Instruct's images presets decay linearly from iteration 1,000: a run at the preset's own
    length (every README number of theirs) keeps the constant rate; a time-budgeted run decays."""
    cfg = distill_config(name, copy.deepcopy(TEACHER_STATES["images"]))
    assert cfg["run"]["lr_decay"] == "linear" and cfg["run"]["lr_decay_start"] == 1000 > cfg["run"]["steps"]
    official = distill_config(name, copy.deepcopy(TEACHER_STATES["images"]), preset="official")
    assert official["run"]["lr_decay"] == "none"


def test_options_command_lists_schema_and_presets(capsys):
    from diffdistill.cli import main
    assert main(["options", "dmd2"]) == 0
    out = capsys.readouterr().out
    assert "gan_weight" in out and "0.003" in out and "official" in out and "images" in out


def test_an_installed_copy_finds_every_preset_file(tmp_path):
    """A non-editable install (the wheel's files, outside the checkout) carries configs/*/*.yaml."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    code = ("import diffdistill, diffdistill.config as c, sys; "
            "assert diffdistill.__file__.startswith(sys.argv[1]), diffdistill.__file__; "
            "print(sorted(str(p.relative_to(c.PRESET_DIR)) for p in c.PRESET_DIR.glob('*/*.yaml')))")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    want = sorted(str(p.relative_to(PRESET_DIR)) for p in PRESET_FILES)
    assert eval(out) == want
    cli = subprocess.run([sys.executable, "-m", "diffdistill.cli", "options", "sid"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "official" in cli.stdout, cli.stderr
