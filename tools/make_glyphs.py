"""Glyphs: notMNIST-style letters A-J rendered from the fonts of Debian font packages, split by font family.

Rebuild the committed set (needs the fonts; CI does not, it reads the .npz):

    apt-get install fonts-urw-base35 fonts-texgyre fonts-liberation2 fonts-freefont-ttf \\
        fonts-crosextra-carlito fonts-crosextra-caladea fonts-open-sans fonts-lato fonts-roboto-unhinted \\
        fonts-cantarell fonts-linuxlibertine fonts-ebgaramond fonts-comic-neue fonts-inconsolata fonts-dejavu-extra
    python tools/make_glyphs.py build benchmarks/data/glyphs.npz

Write it as an ImageFolder tree (train/ and test/, one folder per letter) for `--data DIR`:

    python tools/make_glyphs.py folder benchmarks/data/glyphs.npz OUT

Every font file (every family and style: Bold, Italic... are separate fonts) gives one image of each
letter: the glyph's ink cropped, centred in a square with a 10 % margin, resized to 28x28 (white on
black, uint8). Fonts whose ten letters are not ten distinct glyphs (symbol and dingbat fonts) and
duplicate (family, style) pairs (the same font shipped as Type 1 and OpenType) are left out. Whole
families go to the test split (a seeded 25 % of them), so the test letters come from unseen typefaces.
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np

LETTERS = "ABCDEFGHIJ"
SIDE = 28


def _font_files() -> list[str]:
    out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, check=True).stdout
    return sorted({f for f in out.splitlines() if f.lower().endswith((".ttf", ".otf", ".t1", ".pfb"))})


def _render(path: str) -> tuple[tuple[str, str], np.ndarray] | None:
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.truetype(path, 96)
    except OSError:
        return None
    name = font.getname()
    glyphs = []
    for ch in LETTERS:
        im = Image.new("L", (192, 192), 0)
        ImageDraw.Draw(im).text((40, 20), ch, font=font, fill=255)
        box = im.getbbox()
        if box is None:
            return None
        im = im.crop(box)
        side = int(max(im.size) * 1.2)  # a 10 % margin on each side of the longer dimension
        sq = Image.new("L", (side, side), 0)
        sq.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
        glyphs.append(np.asarray(sq.resize((SIDE, SIDE), Image.Resampling.LANCZOS)))
    arr = np.stack(glyphs)
    if len({g.tobytes() for g in arr}) < len(LETTERS):  # a symbol font maps several letters to one box
        return None
    return name, arr


def build(out: Path, test_fraction: float = 0.25, seed: int = 0) -> dict:
    fonts: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
    for path in _font_files():
        r = _render(path)
        if r is None or any(w in r[0][0] for w in ("Symbol", "Dingbat", "Math")):
            continue
        fonts.setdefault(r[0], (path, r[1]))  # the first file of a (family, style) pair
    keys = sorted(fonts)
    families = sorted({fam for fam, _ in keys})
    rng = np.random.default_rng(seed)
    test_fams = set(rng.permutation(families)[: max(1, round(test_fraction * len(families)))].tolist())
    images = np.concatenate([fonts[k][1] for k in keys])  # (fonts * 10, 28, 28)
    labels = np.tile(np.arange(len(LETTERS)), len(keys))
    font_idx = np.repeat(np.arange(len(keys)), len(LETTERS))
    in_test = np.array([keys[i][0] in test_fams for i in font_idx])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images, labels=labels, font=font_idx, in_test=in_test,
                        fonts=np.array([f"{fam} {style}" for fam, style in keys]),
                        families=np.array([fam for fam, _ in keys]),
                        files=np.array([Path(fonts[k][0]).name for k in keys]))
    return {"fonts": len(keys), "families": len(families), "test_families": sorted(test_fams),
            "images": len(labels), "test_images": int(in_test.sum()), "bytes": out.stat().st_size}


def write_folder(npz: Path, out: Path) -> Path:
    """``out/train|test/<letter>/<font>.png`` from the committed arrays."""
    from PIL import Image

    d = np.load(npz)
    for img, lab, f, test in zip(d["images"], d["labels"], d["font"], d["in_test"]):
        folder = out / ("test" if test else "train") / LETTERS[int(lab)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{int(f):03d}.png")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out")
    f = sub.add_parser("folder")
    f.add_argument("npz")
    f.add_argument("out")
    args = p.parse_args()
    if args.cmd == "build":
        print(build(Path(args.out)))
    else:
        print(write_folder(Path(args.npz), Path(args.out)))


if __name__ == "__main__":
    main()
