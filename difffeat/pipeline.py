"""Folder runs shared by every command that reads an image folder.

``run_folder`` lists the images, skips those whose outputs exist (resume), reads each
image (a corrupt one is reported in one line and skipped), groups the rest into batches,
hands each batch to a task callback, shows a progress bar, and at the end raises one
:class:`DiffFeatError` with the failure count (so the exit code is non-zero) while keeping
every output that was written. Outputs are written atomically by the callbacks through
:mod:`difffeat.io`, so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from .errors import DiffFeatError
from .distributed import dist_info, progress_bar, rank_share
from .io import FolderRun, list_images, load_image, output_path, save_features, save_png


@dataclass
class Item:
    """One input image of a folder run."""

    path: Path
    out: Path  # the primary output; its existence marks the item finished
    image: Image.Image | None = None

    @property
    def name(self) -> str:
        return str(self.path)


def run_folder(
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    suffix: str,
    process: Callable[[list[Item]], None],
    batch_size: int = 4,
    overwrite: bool = False,
    desc: str = "images",
    echo: Callable[[str], Any] | None = None,
) -> FolderRun:
    """Run ``process`` over batches of readable, unfinished images under ``inputs``."""
    root, out_dir = Path(inputs), Path(out_dir)
    info = dist_info()
    files = rank_share(list_images(root), batch_size, info)  # this rank's batches (all of them on one process)
    run = FolderRun(echo=echo or (lambda m: tqdm.write(m, file=__import__("sys").stderr)))
    todo = []
    for p in files:
        out = output_path(out_dir, root, p, suffix)
        if out.exists() and not overwrite:
            run.skipped += 1
        else:
            todo.append(Item(p, out))
    if run.skipped and info.is_main:
        tqdm.write(f"resuming: {run.skipped} of {len(files)} {desc} already done (use --overwrite to redo)")
    bar = progress_bar(len(todo), desc, info)
    batch: list[Item] = []

    def flush() -> None:
        if not batch:
            return
        try:
            process(batch)
            run.done += len(batch)
        except DiffFeatError as e:
            if len(batch) == 1:
                run.fail(batch[0].name, f"{batch[0].name}: {e}")
            else:  # find the culprit: retry one by one
                for it in batch:
                    with run.item(it.name):
                        process([it])
        bar.update(len(batch))
        batch.clear()

    for it in todo:
        try:
            it.image = load_image(it.path)
        except DiffFeatError as e:
            run.fail(it.name, str(e))
            bar.update(1)
            continue
        batch.append(it)
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.close()
    run.finish(desc)
    return run


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
                meta = dict(meta_common, image=str(it.path), original_size=list(it.image.size),  # type: ignore[union-attr]
                            input_size=[int(x.shape[-1]), int(x.shape[-2])])
                tensors = {k: v[i].to(SAVE_DTYPES[save_dtype]) for k, v in feats.items()}
                if viz_key is not None:
                    save_png(it.out.with_suffix(".png"), pca_rgb(feats[viz_key][i], size=it.image.size))  # type: ignore[union-attr]
                save_features(it.out, tensors, meta)  # written last: marks the image finished

    return run_folder(images, out_dir, ".safetensors", process, batch_size=batch_size, overwrite=overwrite, desc="images")
