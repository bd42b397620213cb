"""Visualisation helpers: PCA->RGB of a feature map, colour palettes, colour maps, captioned image grids."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pca_rgb(feat: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """First three principal components of a [C,h,w] map as an RGB image (min-max per channel)."""
    return co_pca_rgb([feat], size)[0]


def co_pca_rgb(feats: "list[torch.Tensor]", size: tuple[int, int] | None = None) -> "list[Image.Image]":
    """One PCA fitted on the cells of every [C,h,w] map (same grid), its first three components
    as RGB with one min-max per channel over all maps: SD-DINO's co-PCA visualisation, where
    the same colour means the same feature direction in every image."""
    from .fusion import co_pca

    maps = torch.stack([f.float().cpu() for f in feats])
    proj = co_pca(maps, 3)  # [B,k,h,w]
    b, _, h, w = proj.shape
    if proj.shape[1] < 3:
        proj = torch.cat([proj, proj.new_zeros(b, 3 - proj.shape[1], h, w)], 1)
    flat = proj.transpose(0, 1).flatten(1)
    lo, hi = flat.min(1).values.view(1, 3, 1, 1), flat.max(1).values.view(1, 3, 1, 1)
    imgs = ((proj - lo) / (hi - lo).clamp_min(1e-8) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    out = [Image.fromarray(im) for im in imgs]
    return [im.resize(size, Image.NEAREST) for im in out] if size else out


def palette(n: int, seed: int = 0) -> np.ndarray:
    """A fixed, well-spread colour palette [n,3] uint8 (index 0 is black)."""
    rng = np.random.default_rng(seed)
    pal = rng.integers(40, 256, size=(max(n, 1), 3), dtype=np.int64).astype(np.uint8)
    pal[0] = 0
    return pal


def colormap(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """A perceptual (turbo-like) colour map of a 2-D array -> [H,W,3] uint8, no matplotlib needed."""
    lo = float(np.nanmin(x)) if lo is None else lo
    hi = float(np.nanmax(x)) if hi is None else hi
    t = np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)
    # polynomial approximation of 'turbo' (Mikhailov 2019)
    r = 0.13572138 + t * (4.61539260 + t * (-42.66032258 + t * (132.13108234 + t * (-152.94239396 + t * 59.28637943))))
    g = 0.09140261 + t * (2.19418839 + t * (4.84296658 + t * (-14.18503333 + t * (4.27729857 + t * 2.82956604))))
    b = 0.10667330 + t * (12.64194608 + t * (-60.58204836 + t * (110.36276771 + t * (-89.90310912 + t * 27.34824973))))
    rgb = np.stack([r, g, b], -1)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def tile(images: "list[Image.Image]", ncols: int, captions: "list[str] | None" = None, scale: int = 1,
         pad: int = 4, caption_h: int = 12, colours: "list[tuple[int, int, int]] | None" = None,
         title: str | None = None) -> Image.Image:
    """Images on a white grid, ``ncols`` per row, each scaled by ``scale`` (nearest) with an optional caption.

    Cells take the size of the largest image; ``colours`` (one per image) tint the captions
    (e.g. green = right, red = wrong); ``title`` adds a line on top.
    """
    from PIL import ImageDraw

    if not images:
        raise ValueError("tile needs at least one image")
    ims = [im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST) if scale != 1
           else im.convert("RGB") for im in images]
    cw, ch = max(im.width for im in ims), max(im.height for im in ims)
    cap = caption_h if captions else 0
    top = caption_h + pad if title else 0
    ncols = max(1, min(ncols, len(ims)))
    nrows = -(-len(ims) // ncols)
    width = pad + ncols * (cw + pad)
    if title:  # widen the canvas so the title fits
        width = max(width, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title)) + 2 * pad)
    canvas = Image.new("RGB", (width, top + pad + nrows * (ch + cap + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad // 2), title, fill=(0, 0, 0))
    for i, im in enumerate(ims):
        x, y = pad + (i % ncols) * (cw + pad), top + pad + (i // ncols) * (ch + cap + pad)
        canvas.paste(im, (x, y))
        if captions and i < len(captions) and captions[i]:
            ink = colours[i] if colours and i < len(colours) else (0, 0, 0)
            draw.text((x, y + ch + 1), captions[i], fill=ink)
    return canvas
