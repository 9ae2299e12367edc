"""Pictures for people: clean images next to their triggered versions (PNG, PIL only)."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .utils import atomic_write_bytes


def _to_pil(x: torch.Tensor, scale: int) -> Image.Image:
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if arr.shape[0] == 1:
        arr = arr.repeat(3, 1, 1)
    im = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), "RGB")
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def trigger_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]], scale: int = 4,
                 amplify: float = 5.0) -> Image.Image:
    """One row per (label, clean image, triggered image): clean | triggered | |difference| x amplify."""
    _, c0, _ = rows[0]
    tile = c0.shape[-1] * scale
    label_w, pad = 120, 6
    header = 18
    grid = Image.new("RGB", (label_w + 3 * (tile + pad), header + len(rows) * (tile + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for k, title in enumerate(("clean", "triggered", f"|diff| x{amplify:g}")):
        draw.text((label_w + k * (tile + pad), 2), title, fill="black")
    for r, (label, clean, trig) in enumerate(rows):
        y = header + r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), label, fill="black")
        diff = ((trig - clean).abs() * amplify).clamp(0, 1)
        for k, img in enumerate((clean, trig, diff)):
            grid.paste(_to_pil(img, scale), (label_w + k * (tile + pad), y))
    return grid


def save_png(image: Image.Image, path: str | Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
