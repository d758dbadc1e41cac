"""Re-create the static files of the bad-input corpus (they are committed; run this only to rebuild them).

    python tests/bad_inputs/make_corpus.py

Checkpoints (a real teacher, truncated / bit-flipped copies, a student of another method, a conditional teacher)
depend on the checkpoint format, so tests/test_bad_inputs.py makes them at test time instead.
"""

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def main():
    rng = np.random.default_rng(0)
    gray = lambda s: Image.fromarray(rng.integers(0, 256, (s, s), dtype=np.uint8), "L")  # noqa: E731
    rgb = lambda s: Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8), "RGB")  # noqa: E731
    for d in ("mixed_size", "mixed_channels", "not_an_image", "empty_folder"):
        (HERE / d).mkdir(exist_ok=True)
    gray(8).save(HERE / "mixed_size/a.png")
    gray(6).save(HERE / "mixed_size/b.png")
    gray(8).save(HERE / "mixed_channels/a.png")
    rgb(8).save(HERE / "mixed_channels/b.png")
    (HERE / "not_an_image/broken.png").write_bytes(b"this is not a PNG file\n")
    (HERE / "empty_folder/.keep").write_text("an image folder with no images (hidden files are ignored)\n")
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    np.savez(HERE / "empty.npz", x=np.zeros((0, 1, 8, 8), dtype=np.uint8))
    np.savez(HERE / "labels_negative.npz", x=u8(4, 1, 8, 8), labels=np.array([-1, 0, 1, 2]))
    np.savez(HERE / "labels_12_classes.npz", x=u8(12, 1, 8, 8), labels=np.arange(12))
    np.savez(HERE / "unlabelled_8x8.npz", x=u8(4, 1, 8, 8))
    np.savez(HERE / "rgb_8x8.npz", x=u8(4, 3, 8, 8))
    np.savez(HERE / "gray_16x16.npz", x=u8(4, 1, 16, 16))
    nan = rng.uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    nan[2, 0, 3, 3] = np.nan
    np.savez(HERE / "nan_8x8.npz", x=nan)
    (HERE / "garbage.pt").write_bytes(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
    (HERE / "garbage.safetensors").write_bytes(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
    import torch
    torch.save({"weights": torch.zeros(3)}, HERE / "not_a_checkpoint.pt")  # a torch file, but not diffdistill's
    (HERE / "broken.yaml").write_text("run: [steps: 10\n")
    (HERE / "list.yaml").write_text("- run\n- data\n")
    (HERE / "typo_section.yaml").write_text("mehtod:\n  lr: 1.0e-4\n")
    (HERE / "lr_fast.yaml").write_text("method:\n  lr: fast\n")
    (HERE / "folder.safetensors").mkdir(exist_ok=True)
    (HERE / "folder.safetensors/.keep").write_text("a folder whose name looks like an output file\n")


if __name__ == "__main__":
    main()
