"""The README's picture: vanilla against distfd on the embedded model, same seeds, side by side.

python benchmarks/readme_picture.py            # writes docs/images/vanilla-vs-distfd.png

Each image is made by the command line, as a user would (DDIM-50 and the shipped key steps, the CLI's
defaults), e.g. ``distfd generate --mode off --seed 0 --prompt "..." --out v.png`` and the same
without ``--mode off``. The 32x32 images are enlarged (nearest neighbour) and labelled.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw, ImageFont

from distfd.cli import main as distfd_main

PROMPTS = (
    "a small red circle at the top left on a blue background",
    "a large green square in the centre on a black background",
    "a large yellow triangle at the bottom right on a white background",
)
ROWS = (("vanilla", ["--mode", "off"]), ("distfd", []))  # distfd: the CLI's default mode, parallel


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/images/vanilla-vs-distfd.png"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell", type=int, default=160, help="pixels per enlarged image")
    args = p.parse_args(argv)

    cell, pad, left, top = args.cell, 8, 80, 24
    sheet = Image.new("RGB", (left + len(PROMPTS) * (cell + pad), top + len(ROWS) * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(14)
    with tempfile.TemporaryDirectory() as tmp:
        for r, (label, extra) in enumerate(ROWS):
            y = top + r * (cell + pad)
            draw.text((6, y + cell // 2 - 8), label, fill="black", font=font)
            for c, prompt in enumerate(PROMPTS):
                out = Path(tmp) / f"{label}-{c}.png"
                argv_ = ["generate", *extra, "--seed", str(args.seed), "--prompt", prompt, "--out", str(out)]
                if distfd_main(argv_) != 0:
                    print("failed: distfd " + " ".join(argv_), file=sys.stderr)
                    return 1
                img = Image.open(out).convert("RGB").resize((cell, cell), Image.NEAREST)
                sheet.paste(img, (left + c * (cell + pad), y))
    draw.text((left, 4), f"same seed ({args.seed}), embedded model, DDIM-50", fill="black", font=font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
