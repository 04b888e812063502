"""Draw README's picture: the embedded LiteMedSAM's result from one box on a real HC18 ultrasound image.

Runs the real model on ``../shared/data`` (HC18 image ``--image``, box = the mask's tight box), then
saves the image with the box, the predicted contour and the reference contour to
``docs/images/example_hc18.png``. Usage, from the repository root:
``python docs/tools/make_figure.py [--image 010_HC]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="010_HC", help="HC18 image name (default 010_HC)")
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "images" / "example_hc18.png"))
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import dice
    from bench.data import hc18_case, require_data
    from MedFMSegmentLib.loading import load_model
    from MedFMSegmentLib.inference import SegmentationSession
    from MedFMSegmentLib.prompts import Prompts, mask_bbox

    require_data()
    image, truth = hc18_case(args.image)
    c0, r0, c1, r1 = (int(v) for v in mask_bbox(truth))
    session = SegmentationSession(load_model("litemedsam"), image)
    mask = session.segment(Prompts(box=(c0, r0, 0, c1, r1, 0)))[0]
    score = dice(mask, truth)

    fig, ax = plt.subplots(figsize=(6.4, 4.5), dpi=110)
    ax.imshow(image.array[0], cmap="gray")
    ax.add_patch(plt.Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, color="#ffd000", lw=1.5, label="box prompt"))
    ax.contour(truth, levels=[0.5], colors="#35c0ff", linewidths=1.2, linestyles="dashed")
    ax.contour(mask, levels=[0.5], colors="#ff3b3b", linewidths=1.8)
    ax.plot([], [], color="#ff3b3b", label=f"LiteMedSAM (Dice {score:.3f})")
    ax.plot([], [], color="#35c0ff", ls="--", label="reference annotation")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    ax.set_title(f"HC18 fetal-head ultrasound {args.image}: one box, embedded model, CPU", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, metadata={"Software": None})
    print(f"wrote {args.output} (Dice {score:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
