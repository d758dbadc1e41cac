"""The digits teacher shipped in the package is what the project's own `digits` preset produces, and it is good.

Default suite: the file's recorded recipe equals today's preset (so the preset cannot drift from the shipped
weights), the weights load strictly, and re-measuring it gives the recorded proxy-FID, within 2× the real-data floor.
`-m slow`: retrain the preset from scratch and check it reaches the shipped quality.
"""


import pytest

from diffdistill.config import load_preset, resolve
from diffdistill.demo import SHIPPED_TEACHER
from diffdistill.eval.evaluate import digits_floor_and_ceiling, evaluate_net
from diffdistill.io import load_for_sampling

pytestmark = pytest.mark.skipif(not SHIPPED_TEACHER.exists(), reason="no shipped teacher in this checkout")

STABLE_KEYS = ("data", "net", "method")


def _recipe(cfg):
    run = {k: cfg["run"][k] for k in ("steps", "batch_size", "seed")}
    return {"run": run, **{k: cfg[k] for k in STABLE_KEYS}}


def test_shipped_teacher_matches_the_preset():
    net, state = load_for_sampling(SHIPPED_TEACHER)
    assert state["role"] == "teacher" and state["method"] == "edm" and state["preset"] == "digits"
    assert _recipe(state["config"]) == _recipe(resolve("digits"))
    assert state["step"] == load_preset("edm", "digits")["run"]["steps"]
    assert SHIPPED_TEACHER.stat().st_size <= 2 * 1024 * 1024


def test_shipped_teacher_quality_is_what_it_says():
    net, state = load_for_sampling(SHIPPED_TEACHER)
    rec = state["measured"]
    m = evaluate_net(net, {"sampler": "heun", "nfe": 35}, state["config"]["data"], rec["num_samples"],
                     seed=rec["seed"])
    floor = digits_floor_and_ceiling()["floor_proxy_fid"]
    assert m["proxy_fid"] == pytest.approx(rec["proxy_fid_35nfe"], rel=0.05)
    # same-size comparison with the floor (297 held-out real digits): the teacher is within 2× of real data
    assert m["proxy_fid_n297"] <= 2 * floor, (m["proxy_fid_n297"], floor)


@pytest.mark.slow
def test_retraining_the_preset_reaches_the_shipped_quality(tmp_path):
    from diffdistill.train.trainer import Trainer
    _, state = load_for_sampling(SHIPPED_TEACHER)
    cfg = resolve("digits", flags={"run": {"out": str(tmp_path), "progress": False, "sample_every": 0}})
    tr = Trainer(cfg)
    tr.run()
    m = evaluate_net(tr.method.sampling_net(), {"sampler": "heun", "nfe": 35}, cfg["data"], 2000, seed=0)
    assert m["proxy_fid"] <= 1.5 * state["measured"]["proxy_fid_35nfe"] + 0.1
