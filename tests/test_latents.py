"""The latent text-to-image pipeline (issue 22, items 2 and 3): ``encode-prompts`` (a pipeline folder's own text
encoders), ``encode-data`` (VAE latents + encoded captions, resumable shards) and decoding in ``sample`` / ``eval``.

Every reference is diffusers' own code path on tiny random-weight pipelines saved in the test
(``helpers/tiny_pipelines.py``): what the pipeline's ``__call__`` feeds its UNet / transformer (captured with a
forward pre-hook), ``AutoencoderKL.encode(x).latent_dist.mean``, and the images ``__call__`` decodes."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from helpers.tiny_pipelines import build

from diffdistill.cli import main
from diffdistill.data import latent_cache
from diffdistill.data.images import load_npz
from diffdistill.diffusion.condition import load_conditions

PROMPTS = ["a handwritten seven", "two"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def denoiser_inputs(pipe, kind, negative):
    """The keyword inputs of every UNet / transformer call in one denoising step of the pipeline's ``__call__``
    for PROMPTS (with CFG: the pipelines' [negative; positive] batch, or FLUX / Wan's separate negative call)."""
    calls = []
    net = pipe.unet if kind in ("sd", "sdxl") else pipe.transformer
    h = net.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    kw = {"prompt": PROMPTS, "num_inference_steps": 1, "output_type": "latent",
          "generator": torch.Generator().manual_seed(0)}
    if negative is not None:
        kw["negative_prompt"] = negative
    kw.update({"flux": {"true_cfg_scale": 2.0, "negative_prompt": negative or "", "height": 16, "width": 16},
               "sana": {"height": 32, "width": 32, "use_resolution_binning": False},
               "wan": {"height": 16, "width": 16, "num_frames": 5}}.get(kind, {}))
    try:
        with torch.no_grad():
            pipe(**kw)
    finally:
        h.remove()
    return calls


def split(t):
    return t[:len(PROMPTS)], t[len(PROMPTS):]


def expected_fields(kind, calls):
    """(prompt rows, null row) as the pipeline fed them to its network."""
    k = calls[0]
    if kind in ("flux", "wan"):   # the positive call first, then the negative one
        pos = {"embeds": k["encoder_hidden_states"]}
        neg = {"embeds": calls[1]["encoder_hidden_states"][:1]}
        if kind == "flux":
            pos.update(pooled=k["pooled_projections"], **{"extra.guidance": k["guidance"]})
            neg["pooled"] = calls[1]["pooled_projections"][:1]
        return pos, neg
    e_neg, e_pos = split(k["encoder_hidden_states"])
    pos, neg = {"embeds": e_pos}, {"embeds": e_neg[:1]}
    if kind == "sdxl":
        p_neg, p_pos = split(k["added_cond_kwargs"]["text_embeds"])
        pos.update(pooled=p_pos, **{"extra.time_ids": split(k["added_cond_kwargs"]["time_ids"])[1]})
        neg["pooled"] = p_neg[:1]
    if kind == "sd3":
        p_neg, p_pos = split(k["pooled_projections"])
        pos["pooled"], neg["pooled"] = p_pos, p_neg[:1]
    if kind == "sana":
        m_neg, m_pos = split(k["encoder_attention_mask"])
        pos["mask"], neg["mask"] = m_pos, m_neg[:1]
    return pos, neg


# kind, negative prompt (None: the pipeline's default — "" for SD, zeros for SDXL's force_zeros_for_empty_prompt)
CASES = [("sd", None), ("sdxl", None), ("sd3", "blurry"), ("flux", None), ("sana", "blurry"), ("wan", None)]


@pytest.mark.parametrize("kind,negative", CASES, ids=[c[0] for c in CASES])
def test_encode_prompts_stores_what_the_pipeline_feeds_its_network(kind, negative, tmp_path):
    pipe = build(kind, tmp_path / kind)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "prompts.safetensors"
    args = [] if negative is None else ["--negative", negative]
    assert main(["encode-prompts", str(tmp_path / kind), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 *args]) == 0
    cond = load_conditions(out)
    got = {**cond.tensors()}
    want, want_null = expected_fields(kind, denoiser_inputs(pipe, kind, negative))
    assert set(got) == set(want), (set(got), set(want))
    for k, v in want.items():   # bit for bit: the same encoders, tokenizers and arguments
        assert torch.equal(got[k].to(v.dtype), v), k
    null = cond.null.tensors()
    assert set(null) == set(want_null)
    for k, v in want_null.items():
        assert torch.equal(null[k].to(v.dtype), v), f"null.{k}"
    if kind == "sdxl":
        assert not null["embeds"].any()   # force_zeros_for_empty_prompt: the pipeline's own unconditional
    side = json.loads((tmp_path / "prompts.json").read_text())
    assert side["prompts"] == PROMPTS and side["rows"] == 2 and side["pipeline_class"] == type(pipe).__name__


# ------------------------------------------------------------------------------------------------ encode-data
def digit_folder(root, n=10, caption_file=True):
    """n sklearn digits (8×8 greyscale PNGs) with captions.jsonl ("a handwritten seven", …)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray((d.images[i] * 255 / 16).round().astype(np.uint8), mode="L").save(root / f"d{i:03d}.png")
        lines.append(json.dumps({"file_name": f"d{i:03d}.png", "text": f"a handwritten {words[d.target[i]]}"}))
    if caption_file:
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return [json.loads(ln)["text"] for ln in lines]


def pixels(folder, n, channels):
    """The test's own reading of the PNGs: p/127.5 − 1 (= diffusers' VaeImageProcessor 2·(p/255) − 1 bit for bit),
    greyscale repeated to the VAE's channels."""
    from PIL import Image
    x = np.stack([np.asarray(Image.open(folder / f"d{i:03d}.png"), dtype=np.float32) / 127.5 - 1 for i in range(n)])
    return torch.from_numpy(x)[:, None].repeat(1, channels, 1, 1)


def arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_encode_data_is_the_vae_posterior_mean_and_resumes_to_the_same_file(tmp_path, monkeypatch, capsys):
    from diffusers import AutoencoderKL
    pipe_dir, data = tmp_path / "sd", tmp_path / "digits"
    pipe = build("sd", pipe_dir)
    caps = digit_folder(data)
    cmd = ["encode-data", str(pipe_dir), "--data", str(data), "--shard-size", "4", "--batch-size", "2"]
    assert main(cmd + ["--out", str(tmp_path / "full.npz")]) == 0
    full = arrays(tmp_path / "full.npz")
    assert not (tmp_path / "full.shards").exists()   # removed once the .npz is written

    # latents = vae.encode(x).latent_dist.mean · scaling_factor, in the same batches of 2, bit for bit
    vae = AutoencoderKL.from_pretrained(str(pipe_dir / "vae")).eval()
    x = pixels(data, 10, 3)
    with torch.no_grad():
        want = torch.cat([vae.encode(x[i:i + 2]).latent_dist.mean * vae.config.scaling_factor
                          for i in range(0, 10, 2)])
    assert full["latents"].shape == (10, 4, 4, 4)
    assert torch.equal(torch.from_numpy(full["latents"]), want)
    # each image's caption, encoded by the pipeline's own encode_prompt
    with torch.no_grad():
        ref = pipe.encode_prompt(caps, "cpu", 1, True)
    assert torch.allclose(torch.from_numpy(full["embeds"]), ref[0], rtol=0, atol=1e-6)
    assert torch.allclose(torch.from_numpy(full["null.embeds"]), ref[1][:1], rtol=0, atol=1e-6)
    assert list(full["captions"]) == caps and list(full["files"])[:2] == ["d000.png", "d001.png"]
    ds = load_npz(tmp_path / "full.npz")   # a data set: latents with their prompts
    assert ds.kind == "latents" and len(ds.conditions) == 10 and ds.conditions.null is not None

    # stopped right after the first shard was written (atomically), then the same command again
    real_save, real_encode, calls = latent_cache._save_npz, latent_cache.encode_shard, []

    def stop_after_first(path, arrs):
        real_save(path, arrs)
        raise KeyboardInterrupt
    monkeypatch.setattr(latent_cache, "_save_npz", stop_after_first)
    assert main(cmd + ["--out", str(tmp_path / "resumed.npz")]) == 130
    shards = tmp_path / "resumed.shards"
    assert sorted(p.name for p in shards.iterdir()) == ["manifest.json", "shard-000000.npz"]
    assert not (tmp_path / "resumed.npz").exists()
    monkeypatch.setattr(latent_cache, "_save_npz", real_save)
    monkeypatch.setattr(latent_cache, "encode_shard", lambda *a, **k: calls.append(a[1]) or real_encode(*a, **k))
    assert main(cmd + ["--out", str(tmp_path / "resumed.npz")]) == 0
    assert calls == [4, 8]   # shard 0 was not encoded again
    resumed = arrays(tmp_path / "resumed.npz")
    assert resumed.keys() == full.keys() and all(np.array_equal(resumed[k], full[k]) for k in full)

    # a resume with another VAE is refused
    monkeypatch.setattr(latent_cache, "_save_npz", stop_after_first)
    assert main(cmd + ["--out", str(tmp_path / "other.npz")]) == 130
    monkeypatch.setattr(latent_cache, "_save_npz", real_save)
    from helpers.tiny_pipelines import vae as tiny_vae
    tiny_vae(seed=9).save_pretrained(str(pipe_dir / "vae"))
    capsys.readouterr()
    assert main(cmd + ["--out", str(tmp_path / "other.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other VAE weights" in err and "other.shards" in err

    # --sample-posterior: mean + std·noise, the noise of image i from its own generator (seed << 32) + i
    assert main(cmd + ["--out", str(tmp_path / "post.npz"), "--sample-posterior", "--seed", "3"]) == 0
    vae = AutoencoderKL.from_pretrained(str(pipe_dir / "vae")).eval()
    with torch.no_grad():
        post = [vae.encode(x[i:i + 2]).latent_dist for i in range(0, 10, 2)]
    noise = torch.stack([torch.randn((4, 4, 4), generator=torch.Generator().manual_seed((3 << 32) + i))
                         for i in range(10)])
    want = torch.cat([p.mean for p in post]) + torch.cat([p.std for p in post]) * noise
    assert torch.allclose(torch.from_numpy(arrays(tmp_path / "post.npz")["latents"]),
                          want * vae.config.scaling_factor, rtol=0, atol=1e-6)


def test_caption_sources_folder_layout_tab_file_and_npz(tmp_path):
    from PIL import Image
    for sub in ("a_handwritten_one", "a_handwritten_two"):
        (tmp_path / "cls" / sub).mkdir(parents=True)
        Image.new("L", (8, 8), 40).save(tmp_path / "cls" / sub / "x.png")
    src = latent_cache.captioned_source(tmp_path / "cls")
    assert src.names == ["a_handwritten_one/x.png", "a_handwritten_two/x.png"]
    assert src.captions == ["a handwritten one", "a handwritten two"]
    assert src.read(0, 2).shape == (2, 1, 8, 8)
    (tmp_path / "tab").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "tab" / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "tab" / "a.png")
    (tmp_path / "tab" / "captions.txt").write_text("b.png\ta cat\na.png\ta dog\n")
    assert latent_cache.captioned_source(tmp_path / "tab").captions == ["a dog", "a cat"]
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 8, 8, 3), np.uint8), captions=np.array(["p", "q", "r"]))
    src = latent_cache.captioned_source(tmp_path / "d.npz")
    assert src.captions == ["p", "q", "r"] and src.read(1, 3).shape == (2, 3, 8, 8)


def test_sdxl_encode_data_time_ids_are_the_image_size(tmp_path):
    from PIL import Image
    build("sdxl", tmp_path / "xl")
    (tmp_path / "imgs" / "red_square").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (12, 8), (200, 10 * i, 0)).save(tmp_path / "imgs" / "red_square" / f"{i}.png")
    assert main(["encode-data", str(tmp_path / "xl"), "--data", str(tmp_path / "imgs"), "--out",
                 str(tmp_path / "xl.npz")]) == 0
    z = arrays(tmp_path / "xl.npz")
    assert z["latents"].shape == (3, 4, 4, 6) and z["pooled"].shape == (3, 12) and z["embeds"].shape == (3, 16, 24)
    assert (z["extra.time_ids"] == np.array([8, 12, 0, 0, 8, 12], np.float32)).all()   # (H, W) + crop + (H, W)
    assert not z["null.embeds"].any()   # SDXL's force_zeros_for_empty_prompt


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_decode_and_encode_use_the_pipelines_scale_and_shift(kind, tmp_path):
    from diffdistill.io.vae import LatentCodec
    pipe = build(kind, tmp_path / kind)
    codec = LatentCodec(tmp_path / kind / "vae")
    kw = {"prompt": PROMPTS[:1], "num_inference_steps": 2}
    with torch.no_grad():
        z = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).images
        img = pipe(**kw, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    x = codec.decode(z)   # vae.decode(z / scaling_factor + shift_factor), as __call__ decodes
    assert torch.allclose((x / 2 + 0.5).clamp(0, 1), img, rtol=0, atol=1e-6)
    cfg = pipe.vae.config
    assert codec.shift_factor == (cfg.shift_factor or 0.0) and (kind == "sd") == (codec.shift_factor == 0)
    with torch.no_grad():
        want = (pipe.vae.encode(x).latent_dist.mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
    assert torch.equal(codec.encode(x), want)


def test_sample_and_eval_decode_with_the_teacher_folders_vae(tmp_path, capsys):
    root = tmp_path / "t2i"
    build("sd", root, in_channels=1, sample_size=4)   # 8×8 greyscale images, 4×4 latents
    (tmp_path / "p.txt").write_text("a handwritten seven\na handwritten two\n")
    prompts = tmp_path / "p.safetensors"
    assert main(["encode-prompts", str(root), "--prompts", str(tmp_path / "p.txt"), "--out", str(prompts)]) == 0
    base = ["sample", str(root), "--prompts", str(prompts), "--steps", "2", "--num-samples", "3"]
    assert main(base + ["--out", str(tmp_path / "lat.npz")]) == 0
    lat = arrays(tmp_path / "lat.npz")["samples"]
    assert lat.shape == (3, 4, 4, 4) and np.abs(lat).max() > 1   # latents: not clamped to the image range
    assert main(base + ["--out", str(tmp_path / "img.npz"), "--decode"]) == 0
    img = arrays(tmp_path / "img.npz")
    from diffdistill.io.vae import LatentCodec
    want = LatentCodec(root / "vae").decode(torch.from_numpy(lat)).clamp(-1, 1)
    assert img["samples"].shape == (3, 1, 8, 8) and np.array_equal(img["latents"], lat)
    assert torch.equal(torch.from_numpy(img["samples"]), want)
    assert main(base + ["--out", str(tmp_path / "png")]) == 0   # PNG output: decoded by default
    from PIL import Image
    assert Image.open(tmp_path / "png" / "000000.png").size == (8, 8)

    # encode-data's latents train a DMD2 student (GAN on the real latents with their captions), which finds its
    # teacher folder's VAE
    digit_folder(tmp_path / "digits", n=6)
    assert main(["encode-data", str(root), "--data", str(tmp_path / "digits"),
                 "--out", str(tmp_path / "lat6.npz")]) == 0
    run = tmp_path / "dmd2"
    assert main(["distill", "--method", "dmd2", "--teacher", str(root), "--data", str(tmp_path / "lat6.npz"),
                 "--prompts", str(prompts), "--iters", "1", "--batch-size", "2", "--out", str(run), "--no-progress",
                 "--set", "net.sigma_data=0.5", "--set", "run.ckpt_every=1", "--set", "run.sample_every=0"]) == 0
    ckpt = max((run / "checkpoints").glob("ckpt-*.pt"))
    assert main(["sample", str(ckpt), "--num-samples", "2", "--out", str(tmp_path / "s.npz"), "--decode"]) == 0
    assert arrays(tmp_path / "s.npz")["samples"].shape == (2, 1, 8, 8)
    assert main(["sample", str(ckpt), "--num-samples", "2", "--out", str(tmp_path / "spng")]) == 0
    assert Image.open(tmp_path / "spng" / "000001.png").size == (8, 8)

    # eval scores decoded images (here in the digits classifier's space)
    capsys.readouterr()
    assert main(["eval", str(root), "--prompts", str(prompts), "--steps", "2", "--num-samples", "20", "--data",
                 "digits"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["decoded_with"]["vae_class"] == "AutoencoderKL" and np.isfinite(m["proxy_fid"])


# ------------------------------------------------------------------------------------------------ bad inputs
def one_line_error(capsys, argv, *words):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffdistill: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def test_bad_inputs_are_one_line_user_errors(tmp_path, capsys):
    import shutil
    root = tmp_path / "sd"
    build("sd", root)
    p = tmp_path / "p.txt"
    p.write_text("a cat\n")
    out = str(tmp_path / "o.safetensors")
    data = tmp_path / "digits"
    digit_folder(data, n=2, caption_file=False)
    one_line_error(capsys, ["encode-data", str(root), "--data", str(data), "--out", str(tmp_path / "x.npz")],
                   "no captions")
    (data / "captions.jsonl").write_text(json.dumps({"file_name": "d000.png", "text": "a zero"}) + "\n")
    one_line_error(capsys, ["encode-data", str(root), "--data", str(data), "--out", str(tmp_path / "x.npz")],
                   "no caption for 'd001.png'")
    one_line_error(capsys, ["encode-prompts", str(root / "unet"), "--prompts", str(p), "--out", out],
                   "model_index.json")
    one_line_error(capsys, ["encode-prompts", str(root), "--prompts", str(tmp_path / "none.txt"), "--out", out],
                   "not found")
    one_line_error(capsys, ["encode-prompts", str(root), "--prompts", str(p), "--out", out, "--image-size", "16,16"],
                   "SDXL")
    shutil.move(str(root / "vae"), str(tmp_path / "vae_away"))
    one_line_error(capsys, ["encode-data", str(root), "--data", str(data), "--out", str(tmp_path / "x.npz")],
                   "vae", "missing")
    one_line_error(capsys, ["sample", str(root), "--prompts", out, "--out", str(tmp_path / "s.npz"), "--decode"],
                   "no VAE")
    shutil.rmtree(root / "text_encoder")
    one_line_error(capsys, ["encode-prompts", str(root), "--prompts", str(p), "--out", out],
                   "text_encoder", "missing")
    idx = json.loads((root / "model_index.json").read_text())
    for name, drop, words in (("DiTPipeline", ("text_encoder", "tokenizer"), ("no text encoder",)),
                              ("PixArtSigmaPipeline", (), ("not supported", "StableDiffusionPipeline"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps(
            {**{k: v for k, v in idx.items() if k not in drop}, "_class_name": name}))
        one_line_error(capsys, ["encode-prompts", str(tmp_path / name), "--prompts", str(p), "--out", out], *words)
    (root / "text_encoder").mkdir()   # there, but without weights
    one_line_error(capsys, ["encode-prompts", str(root), "--prompts", str(p), "--out", out],
                   "cannot load the text encoder")
