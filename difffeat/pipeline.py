"""Image-folder runs: the per-image-file sink of :mod:`difffeat.runner`.

``run_folder`` lists the images, maps each to its output file inside the output folder
(:func:`difffeat.io.output_path`: never outside it), and hands the folder to the one
runner, which skips finished images (resume), reads each image through the guarded loader
(a bad one is reported in one line and skipped), batches the rest for a task callback,
shows progress and counts failures; at the end one :class:`DiffFeatError` with the failure
count makes the exit code non-zero while every output that was written is kept. Outputs
are written atomically by the callbacks through :mod:`difffeat.io`, the primary output
last, so an interrupted run never leaves a half-written or falsely finished file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .errors import BadInputError, DiffFeatError
from .io import FolderRun, list_images, load_image, original_size, output_path, save_features, save_png
from .runner import Job, run


@dataclass
class Item:
    """One input image of a folder run."""

    path: Path
    out: Path  # the primary output; its existence marks the item finished
    image: Image.Image | None = None
    written: bool = False  # finished by an earlier run: computed with its batch, not written again
    error: str | None = None  # why it cannot run at all (e.g. its output name clashes)

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the image file (the loaded image may be reduced, see :func:`load_image`)."""
        return original_size(self.image)  # type: ignore[arg-type]


def folder_items(inputs: str | os.PathLike, out_dir: str | os.PathLike, suffix: str) -> list[Item]:
    """One :class:`Item` per image under ``inputs``, its output under ``out_dir``.

    Two images that would write the same output (``a.png`` and ``a.jpg``) are both kept
    out with one line each, rather than one silently replacing the other.
    """
    root, out_dir = Path(inputs), Path(out_dir)
    items, owner = [], {}
    for p in list_images(root):
        try:
            out = output_path(out_dir, root, p, suffix)
        except DiffFeatError as e:
            items.append(Item(p, out_dir / f".invalid{len(items)}", error=str(e)))
            continue
        it = Item(p, out)
        if out in owner:
            msg = f"{p} and {owner[out].path} both map to {out}; rename one"
            it.error = owner[out].error = msg
        owner.setdefault(out, it)
        items.append(it)
    return items


def run_folder(
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    suffix: str,
    process: Callable[[list[Item]], None],
    batch_size: int = 4,
    overwrite: bool = False,
    desc: str = "images",
    echo: Callable[[str], Any] | None = None,
    max_side: int | None = None,
    bytes_per_item: int = 0,
) -> FolderRun:
    """Run ``process`` over batches of readable, unfinished images under ``inputs``.

    ``process`` gets :class:`Item` s with their image loaded; it must not write the outputs
    of items marked ``written`` (finished by an earlier, interrupted run). ``max_side``
    lets the loader reduce huge images (see :func:`difffeat.io.load_image`).
    """

    def load(it: Item) -> Item:
        if it.error is not None:
            raise BadInputError(it.error)
        it.image = load_image(it.path, max_side=max_side)
        it.written = not overwrite and it.out.exists()
        return it

    job = Job(folder_items(inputs, out_dir, suffix), process, done=lambda it: it.error is None and it.out.exists(),
              load=load, name=lambda it: it.name)
    res = run(job, out=out_dir, batch_size=batch_size, overwrite=overwrite, desc=desc, echo=echo,
              bytes_per_item=bytes_per_item)
    res.finish(desc)
    return res


def group_by_size(items: Sequence[Item], prepare: Callable[[Image.Image], torch.Tensor]) -> list[tuple[list[Item], torch.Tensor]]:
    """Prepare each image and group those of equal prepared size into stackable batches."""
    groups: dict[tuple[int, ...], tuple[list[Item], list[torch.Tensor]]] = {}
    for it in items:
        x = prepare(it.image)  # type: ignore[arg-type]
        g = groups.setdefault(tuple(x.shape), ([], []))
        g[0].append(it)
        g[1].append(x)
    return [(its, torch.stack(xs)) for its, xs in groups.values()]


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def extract_folder(
    ex: Any,
    images: str | os.PathLike,
    out_dir: str | os.PathLike,
    batch_size: int = 4,
    save_dtype: str = "fp16",
    viz_key: str | None = None,
    overwrite: bool = False,
    prompts: Callable[[Item], str] | None = None,
) -> FolderRun:
    """``difffeat extract``: one ``.safetensors`` per image (+ optional PCA PNG)."""
    from .viz import pca_rgb

    if viz_key is not None and viz_key not in ex.keys:
        raise DiffFeatError(f"--viz key {viz_key!r} is not an output; outputs: {', '.join(ex.keys)}")
    meta_common = ex.metadata()

    def process(items: list[Item]) -> None:
        for its, x in group_by_size(items, lambda im: ex.prepare([im])[0]):
            kw = {"prompts": [prompts(it) for it in its]} if prompts else {}
            feats = ex(x, **kw)
            for i, it in enumerate(its):
                if it.written:
                    continue
                meta = dict(meta_common, image=str(it.path), original_size=list(it.size),
                            input_size=[int(x.shape[-1]), int(x.shape[-2])])
                tensors = {k: v[i].to(SAVE_DTYPES[save_dtype]) for k, v in feats.items()}
                if viz_key is not None:
                    save_png(it.out.with_suffix(".png"), pca_rgb(feats[viz_key][i], size=it.size))
                save_features(it.out, tensors, meta)  # written last: marks the image finished

    return run_folder(images, out_dir, ".safetensors", process, batch_size=batch_size, overwrite=overwrite,
                      desc="images", max_side=working_side(ex), bytes_per_item=feature_bytes(ex, save_dtype))


def extract_images(ex: Any, images: str | os.PathLike, out_dir: str | os.PathLike, run: Any, *,
                   latent: str | None = None, save_dtype: str = "fp16", viz_key: str | None = None,
                   shard_size: int | None = None, model: str | None = None) -> FolderRun:
    """``difffeat extract``: per-image files, or shards of ``shard_size`` images with a JSONL
    index. ``run`` holds ``batch_size`` and ``overwrite`` (:class:`difffeat.options.FolderOptions`)."""
    if not ex.per_image:
        raise BadInputError(f"{model} fits its co-PCA on each image pair, so per-image features would depend "
                            "on the batch; use `difffeat correspond`, or extract its sources (e.g. -m sd15, -m dinov2-b) apart")
    if latent is not None and hasattr(ex, "latent"):
        ex.latent = latent
    if shard_size is not None:
        from .shards import extract_folder_sharded

        return extract_folder_sharded(ex, images, out_dir, shard_size=shard_size, batch_size=run.batch_size,
                                      save_dtype=save_dtype, overwrite=run.overwrite)
    return extract_folder(ex, images, out_dir, batch_size=run.batch_size, save_dtype=save_dtype, viz_key=viz_key,
                          overwrite=run.overwrite)


def working_side(ex: Any) -> int | None:
    """How large an image the loader must keep for ``ex`` (4x its input size), or None (native size)."""
    from .io import REDUCE_GAP

    res = getattr(ex, "resolution", None)
    if not res or getattr(ex, "resize", None) == "snap":
        return None
    return REDUCE_GAP * int(res if isinstance(res, int) else max(res))


def feature_bytes(ex: Any, save_dtype: str = "fp16") -> int:
    """An estimate of one image's feature file (for the free-space check); 0 if unknown."""
    res = getattr(ex, "resolution", None)
    if not isinstance(res, int):
        return 0
    per = torch.tensor([], dtype=SAVE_DTYPES[save_dtype]).element_size()
    total = 0
    for f in getattr(ex, "feature_info", []) or []:
        stride, ch = int(f.get("stride") or 1), int(f.get("channels") or 0)
        total += ch * max(1, res // stride) ** 2 * per
    return total + 4096
