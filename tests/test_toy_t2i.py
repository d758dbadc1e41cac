"""The toy text-to-image path (issue 22): ``scripts/make_toy_t2i_pipeline.py`` makes a standard
StableDiffusionPipeline folder on the digits; prompt files carry each prompt's class so that ``eval --prompts``
scores conditional correctness; the slow test runs ``benchmarks/toy_t2i.py`` reduced, end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffdistill.cli import main
from diffdistill.errors import UserError
from diffdistill.eval.evaluate import digits_reference
from diffdistill.io.text_encode import read_prompt_labels

ROOT = Path(__file__).resolve().parents[1]


def load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


toy = load_script("make_toy_t2i_pipeline", ROOT / "scripts" / "make_toy_t2i_pipeline.py")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_captions_held_out_phrasings_are_new_and_every_word_is_one_token():
    seen, held = toy.captions(toy.TRAIN_TEMPLATES), toy.captions(toy.HELDOUT_TEMPLATES)
    assert len(seen) == 10 * len(toy.TRAIN_TEMPLATES) and len(held) == 10 * len(toy.HELDOUT_TEMPLATES)
    assert not {t for t, _ in seen} & {t for t, _ in held}
    assert ("a handwritten seven", 7) in seen and ("the digit 7", 7) in seen and ("a 7", 7) in seen
    for text, label in seen + held:   # the digit is named, by word or numeral
        assert toy.WORDS[label] in text.split() or str(label) in text.split()
    tok = toy.build_tokenizer()
    for text, _ in seen + held:
        words = text.split()
        assert tok.tokenize(text) == [w + "</w>" for w in words]
        assert len(tok(text).input_ids) <= tok.model_max_length
    assert len(tok.tokenize("an unseen phrase")) > 3    # unknown words fall back to bytes


def test_read_prompt_labels(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a 7", "label": 7}\n\n{"text": "a 3", "label": 3}\n')
    assert read_prompt_labels(p) == [7, 3]
    p.write_text('{"text": "a 7", "label": 7}\n{"text": "a 3"}\n')
    with pytest.raises(UserError, match="every row"):
        read_prompt_labels(p)
    p.write_text('{"text": "a 7", "label": "seven"}\n')
    with pytest.raises(UserError, match="class index"):
        read_prompt_labels(p)
    p.write_text('{"text": "a 7"}\n')
    assert read_prompt_labels(p) is None


def test_made_folder_is_a_stable_diffusion_pipeline_and_a_teacher_and_eval_scores_correctness(tmp_path, capsys):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from diffdistill.io import load_for_sampling
    info = toy.make(tmp_path, vae_iters=2, unet_iters=2, batch=8, width=16, log=lambda m: None)
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.vae.config.scaling_factor == pytest.approx(info["vae_scaling_factor"])
    with torch.no_grad():
        img = pipe(prompt="a handwritten seven", num_inference_steps=2, output_type="pt", height=8, width=8,
                   generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 1, 8, 8)
    net, state = load_for_sampling(str(tmp_path / "pipe"))
    assert tuple(net.sample_shape) == (4, 4, 4) and state["role"] == "teacher"
    lines = (tmp_path / "data" / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 1500 and json.loads(lines[0])["text"] in {t for t, _ in toy.captions(toy.TRAIN_TEMPLATES)}

    # encode-prompts records the classes; eval's conditional correctness is the share of decoded samples the
    # digits classifier assigns to the class of their prompt (seed s gets prompt s mod N)
    prompts = tmp_path / "held.safetensors"
    assert main(["encode-prompts", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts_heldout.jsonl"),
                 "--out", str(prompts)]) == 0
    labels = json.loads(prompts.with_suffix(".json").read_text())["labels"]
    assert labels == [c for _, c in toy.captions(toy.HELDOUT_TEMPLATES)]
    common = [str(tmp_path / "pipe"), "--prompts", str(prompts), "--steps", "2", "--seeds", "0-39"]
    assert main(["sample", *common, "--out", str(tmp_path / "s.npz"), "--decode", "--raw"]) == 0
    capsys.readouterr()
    assert main(["eval", *common, "--data", "digits", "--no-kid", "--no-pr"]) == 0
    m = json.loads(capsys.readouterr().out)
    with np.load(tmp_path / "s.npz") as z:
        x, idx = torch.from_numpy(z["samples"]), z["prompt_index"]
    with torch.no_grad():
        got = digits_reference()["classifier"](x).argmax(1).numpy()
    want = np.array(labels)[idx]
    assert m["class_accuracy"] == pytest.approx(float((got == want).mean()))
    per = [float((got[want == c] == c).mean()) for c in range(10)]
    assert m["class_accuracy_per_class"] == pytest.approx(per, abs=1e-4)


@pytest.mark.slow
def test_toy_t2i_end_to_end_students_follow_their_prompts(tmp_path):
    """Reduced benchmarks/toy_t2i.py: pipeline, encode-prompts, encode-data, DMD2 4-step and SiD-LSG 1-step
    through the CLI, eval on seen and held-out phrasings; the students beat a random-init student and are well
    above chance (10 %) in conditional correctness. Thresholds: measured values (benchmarks/notes/toy_t2i.md)
    with margin."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench = load_script("toy_t2i", ROOT / "benchmarks" / "toy_t2i.py")
    out = tmp_path / "toy"
    # the teacher keeps the benchmark's 3,000 iterations: at 1,500 it follows its prompts only 27-36 % of the time
    assert bench.main(["--out", str(out), "--vae-iters", "800", "--unet-iters", "3000", "--dmd2-iters", "200",
                       "--sid-iters", "150", "--num-samples", "300"]) == 0
    rows = {r["model"].split(" ")[0]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    # measured (2026-12-02, one seed): proxy-FID 52.1 / 59.2 against the random-init UNet's 295.4 (ratio <= 0.20);
    # correctness 98.0 % / 98.0 % on the training phrasings, 29.7 % / 26.7 % on the held-out ones (teacher 25.7 %)
    for name in ("DMD2", "SiD-LSG"):
        r = rows[name]
        assert r["proxy_fid_seen"] < 0.4 * rows["random-init"]["proxy_fid_seen"], r
        assert r["class_accuracy_seen"] > 0.7, r           # chance: 0.1
        assert r["class_accuracy_heldout"] > 0.15, r
