"""Screenshot an HTML report in headless Chromium (Debian package ``chromium``), so that the
committed results show what a person sees: the issues ask for one PNG of each report
(<= 1 MB) under ``benchmarks/results/``.

    python benchmarks/screenshot.py benchmarks/results/cifar10-zoo/report.html \\
        benchmarks/results/report-cifar10-zoo.png --height 2400

The page is rendered from the file itself (the reports embed their plots and load nothing
from the network); a PNG over the size limit is stored with a 256-colour palette, then
scaled down until it fits; the blank page below the content is cropped.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

LIMIT = 1_000_000


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("error: no Chromium found; install it (Debian: apt-get install chromium)")


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 2400) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "shot.png"
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
                        f"--screenshot={raw}", html.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        img = Image.open(raw).convert("RGB")
        # crop the blank page below the content (the capture height is a guess)
        bbox = ImageOps.invert(img).getbbox()
        if bbox:
            img = img.crop((0, 0, img.width, min(img.height, bbox[3] + 24)))
        png.parent.mkdir(parents=True, exist_ok=True)
        tmp_png = png.with_suffix(".tmp.png")
        img.save(tmp_png, optimize=True)
        scale = 1.0
        while tmp_png.stat().st_size > LIMIT:
            small = img if scale == 1.0 else img.resize((int(img.width * scale), int(img.height * scale)),
                                                         Image.LANCZOS)
            small.quantize(256, dither=Image.Dither.NONE).save(tmp_png, optimize=True)
            scale *= 0.85
        tmp_png.replace(png)  # complete or absent
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400, help="page height to capture (px)")
    args = ap.parse_args()
    if not args.html.is_file():
        sys.exit(f"error: {args.html} does not exist")
    out = screenshot(args.html, args.png, args.width, args.height)
    print(f"{out}: {out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
