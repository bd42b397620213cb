"""Sharded feature outputs: safetensors shards of N images, a JSONL index per shard, one merged index.

One file per image does not scale to millions of images (inode counts, small-file I/O on
shared filesystems). With ``--shard-size N`` a run writes instead, in its output folder::

    plan.json                      what the run is (shard size, item count, key hash, settings)
    shard-000000.safetensors       tensors of N images, named "<image key>/<output key>"
    shard-000000.jsonl             one line per image: key, shard file, tensor names, metadata
    ...
    index.jsonl                    all shard lines in key order, written once every shard is done

Layout rules that make runs exact and restartable:

* **Numbering.** Keys are sorted; shard ``k`` holds keys ``[k*N, (k+1)*N)``. Shard numbers and
  contents never depend on the world size (:mod:`difffeat.distributed` assigns shard ``k`` to
  rank ``k % world_size``), and no rank, host or time is written anywhere, so every file,
  the merged index included, is byte-identical on 1 or many GPUs.
* **Atomicity.** Each shard is written by its rank through a temporary file and
  ``os.replace``: first the ``.safetensors``, then the ``.jsonl``, whose existence marks the
  shard finished. A kill leaves at most a hidden ``.shard-*.tmp`` file, removed at the
  next start by the shard's owner.
* **Resume.** A rerun with the same inputs and settings skips finished shards; ``plan.json``
  refuses a rerun into the same folder with other inputs or settings (``--overwrite`` allows
  it in one process only: ranks never wait for each other, so a fast rank could otherwise
  merge a slow rank's old shards).
* **Merge.** :func:`merge_index` checks that every shard is there and that every key occurs
  exactly once (count, order and a SHA-256 of the key list), then writes ``index.jsonl``.

safetensors stores file metadata in a hash map whose order changes between processes, so
shard files carry exactly one metadata entry (``difffeat``, a sorted JSON string) to stay
byte-stable.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from .distributed import DistInfo, dist_info, shard_items
from .errors import BadInputError, DiffFeatError
from .io import atomic_path, json_default

FORMAT = "difffeat-shards/1"
PLAN = "plan.json"
INDEX = "index.jsonl"


def _dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default)


@dataclass(frozen=True)
class Shard:
    """One shard of the plan: its number and its (sorted) image keys."""

    index: int
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}"


def plan_shards(keys: Iterable[str], shard_size: int) -> list[Shard]:
    """Sort ``keys`` and cut them into shards of ``shard_size`` (the last may be shorter)."""
    if shard_size < 1:
        raise BadInputError(f"shard size must be >= 1, got {shard_size}")
    ordered = sorted(keys)
    dup = next((a for a, b in zip(ordered, ordered[1:]) if a == b), None)
    if dup is not None:
        raise BadInputError(f"image key {dup!r} occurs twice; keys must be unique")
    return [Shard(i // shard_size, tuple(ordered[i : i + shard_size])) for i in range(0, len(ordered), shard_size)]


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-256 of the sorted key list (one key per line); identifies a run's inputs."""
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class Record:
    """What a run computes for one image: its tensors and metadata, or the error it raised."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class ShardWriter:
    """Writes this rank's shards of a plan atomically and knows which are finished.

    Args:
        out_dir: output folder (shared by all ranks).
        keys: every image key of the run (all ranks pass the same list).
        shard_size: images per shard.
        run_meta: settings common to all images (model, layers, ...); stored in ``plan.json``
            and in every shard's header. A rerun with other settings is refused.
        info: this process's rank; default :func:`difffeat.distributed.dist_info`.
        overwrite: redo this rank's shards even if finished.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        keys: Iterable[str],
        shard_size: int,
        run_meta: Mapping[str, Any] | None = None,
        info: DistInfo | None = None,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.info = info or dist_info()
        self.overwrite = overwrite
        self.shards = plan_shards(keys, shard_size)
        self.mine = shard_items(self.shards, self.info.rank, self.info.world_size)
        self.run_meta = json.loads(_dumps(dict(run_meta or {})))
        self.plan = {
            "format": FORMAT,
            "shard_size": shard_size,
            "num_items": sum(len(s.keys) for s in self.shards),
            "num_shards": len(self.shards),
            "keys_sha256": keys_digest(k for s in self.shards for k in s.keys),
            "meta": self.run_meta,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._check_plan()
        self._remove_stale_tmp()
        if self.pending():  # an old merged index no longer describes the folder
            with contextlib.suppress(FileNotFoundError):
                (self.out_dir / INDEX).unlink()

    def _check_plan(self) -> None:
        path = self.out_dir / PLAN
        old = json.loads(path.read_text()) if path.exists() else self.plan
        if old != self.plan:
            diff = ", ".join(sorted(k for k in set(old) | set(self.plan) if old.get(k) != self.plan.get(k)))
            if not self.overwrite:
                raise BadInputError(f"{self.out_dir} holds a run with other inputs or settings ({diff} differ); "
                                    f"use another output folder or --overwrite")
            if self.info.world_size > 1:  # ranks do not wait for each other: a fast one could merge old shards
                raise BadInputError(f"{self.out_dir} holds a run with other inputs or settings ({diff} differ); "
                                    f"--overwrite on several processes could mix old and new shards: delete it first")
        elif path.exists():
            return
        # Every rank writes the same bytes, so concurrent replaces are harmless.
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.plan, indent=2, sort_keys=True) + "\n")

    def _remove_stale_tmp(self) -> None:
        """Delete temporary files a killed run left for shards this rank owns."""
        mine = {s.name for s in self.mine}
        for entry in os.scandir(self.out_dir):
            if entry.name.startswith(".shard-") and entry.name.endswith(".tmp"):
                if entry.name[1:].split(".", 1)[0] in mine:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def done(self, shard: Shard) -> bool:
        """A shard is finished when its index (written after its tensors) exists."""
        return (self.out_dir / f"{shard.name}.jsonl").exists() and (self.out_dir / f"{shard.name}.safetensors").exists()

    def pending(self) -> list[Shard]:
        """This rank's shards still to compute, in order."""
        return list(self.mine) if self.overwrite else [s for s in self.mine if not self.done(s)]

    def write(self, shard: Shard, records: Mapping[str, Record]) -> None:
        """Write one finished shard (see :func:`write_shard`)."""
        write_shard(self.out_dir, shard, records, self.run_meta)


def write_shard(out_dir: str | os.PathLike, shard: Shard, records: Mapping[str, Record], run_meta: Mapping[str, Any]) -> None:
    """Write a shard: tensors first, then its JSONL index, each atomically.

    ``records`` holds a :class:`Record` for every key of the shard. Any process may call
    this for a shard it was given (a rank, a Ray actor); the bytes depend only on the shard
    and its records.
    """
    from safetensors.torch import save

    if set(records) != set(shard.keys):
        raise ValueError(f"{shard.name}: records for {len(records)} keys, the shard has {len(shard.keys)}")
    tensors: dict[str, torch.Tensor] = {}
    lines = []
    for key in shard.keys:
        rec = records[key]
        line: dict[str, Any] = {"key": key, "shard": f"{shard.name}.safetensors"}
        if rec.error is not None:
            line["error"] = rec.error
        else:
            names = {name: f"{key}/{name}" for name in rec.tensors}
            for name, tname in names.items():
                if tname in tensors:
                    raise ValueError(f"{shard.name}: tensor name {tname!r} is ambiguous")
                tensors[tname] = rec.tensors[name].detach().contiguous().cpu()
            line["tensors"] = names
            line["meta"] = rec.meta
        lines.append(_dumps(line) + "\n")
    header = {"difffeat": _dumps({"format": FORMAT, "shard": shard.index, "run": dict(run_meta)})}
    out_dir = Path(out_dir)
    with atomic_path(out_dir / f"{shard.name}.safetensors") as tmp:
        tmp.write_bytes(save(tensors, metadata=header))
    with atomic_path(out_dir / f"{shard.name}.jsonl") as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")


@dataclass(frozen=True)
class Merged:
    """Result of :func:`merge_index`."""

    path: Path
    num_items: int
    failed: tuple[str, ...]  # keys whose record is an error


def merge_index(out_dir: str | os.PathLike, allow_incomplete: bool = False) -> Merged | None:
    """Verify every shard of the run in ``out_dir`` and write ``index.jsonl``.

    The index is the shards' lines concatenated in shard order, so it is sorted by key
    and byte-identical however many ranks wrote the shards. Raises :class:`DiffFeatError`
    if a shard is missing or a key is missing, repeated or foreign to the plan; with
    ``allow_incomplete`` a run whose shards are not all written yet returns None instead.
    """
    out_dir = Path(out_dir)
    if not (out_dir / PLAN).exists():
        raise BadInputError(f"{out_dir} has no {PLAN}; it is not a sharded output folder")
    plan = json.loads((out_dir / PLAN).read_text())
    names = [f"shard-{i:06d}" for i in range(plan["num_shards"])]
    missing = [n for n in names if not ((out_dir / f"{n}.jsonl").exists() and (out_dir / f"{n}.safetensors").exists())]
    if missing:
        if allow_incomplete:
            return None
        raise DiffFeatError(
            f"{len(missing)} of {len(names)} shards are not written yet (first: {missing[0]}); "
            f"rerun the same command to finish them"
        )
    chunks, keys, failed = [], [], []
    for n in names:
        text = (out_dir / f"{n}.jsonl").read_text(encoding="utf-8")
        for raw in text.splitlines():
            line = json.loads(raw)
            if line["shard"] != f"{n}.safetensors":
                raise DiffFeatError(f"{n}.jsonl lists {line['key']!r} in {line['shard']}; the folder is corrupt")
            if keys and line["key"] <= keys[-1]:
                raise DiffFeatError(f"key {line['key']!r} is repeated or out of order in {n}.jsonl; the folder is corrupt")
            keys.append(line["key"])
            if "error" in line:
                failed.append(line["key"])
        chunks.append(text)
    if len(keys) != plan["num_items"] or keys_digest(keys) != plan["keys_sha256"]:
        raise DiffFeatError(
            f"the shards hold {len(keys)} keys that do not match the {plan['num_items']} planned in {PLAN}; "
            f"rerun with --overwrite"
        )
    with atomic_path(out_dir / INDEX) as tmp:
        tmp.write_text("".join(chunks), encoding="utf-8")
    return Merged(out_dir / INDEX, len(keys), tuple(failed))


class ShardedFeatures(Mapping[str, dict[str, torch.Tensor]]):
    """Read a merged sharded output: ``feats[key] -> {output key: Tensor}``.

    Tensors are read lazily from the memory-mapped shard; ``meta(key)`` gives the image's
    metadata and ``run_meta`` the settings of the run.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        path = self.out_dir / INDEX
        if not path.exists():
            raise BadInputError(f"{path} does not exist; finish the run (rerun the same command) first")
        self._lines = {}
        with open(path, encoding="utf-8") as f:
            for raw in f:
                line = json.loads(raw)
                self._lines[line["key"]] = line
        self.run_meta = json.loads((self.out_dir / PLAN).read_text())["meta"]

    def __getitem__(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        line = self._lines[key]
        if "error" in line:
            raise BadInputError(f"{key} failed during extraction: {line['error']}")
        with safe_open(str(self.out_dir / line["shard"]), framework="pt") as f:
            return {name: f.get_tensor(tname) for name, tname in line["tensors"].items()}

    def meta(self, key: str) -> dict[str, Any]:
        return dict(self._lines[key].get("meta", {}))

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines)

    def __len__(self) -> int:
        return len(self._lines)


@dataclass(frozen=True)
class ShardRun:
    """Summary of one rank's part of a sharded run."""

    computed: int  # images computed by this rank in this call
    skipped: int  # images of this rank's finished shards
    merged: Merged | None  # set by the rank that found every shard finished


def run_sharded(
    out_dir: str | os.PathLike,
    keys: Iterable[str],
    compute: Callable[[list[str]], Mapping[str, Record]],
    *,
    shard_size: int,
    batch_size: int,
    run_meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    info: DistInfo | None = None,
    desc: str = "images",
    bytes_per_item: int = 0,
    load: Callable[[str], Any] | None = None,
) -> ShardRun:
    """Compute this rank's pending shards batch by batch, write them, and merge if all are done.

    ``compute(batch)`` returns a :class:`Record` for every key of the batch (``batch`` holds the
    keys, or what ``load(key)`` returned for them; a key whose ``load`` raises
    :class:`DiffFeatError` is reported in one line and recorded as an error). Batches never
    cross a shard boundary (shard ``k`` is always computed as the same batches), which keeps
    outputs byte-identical across world sizes. No rank waits for another: whichever rank
    finds every shard finished writes the index (identical bytes if two do at once).
    """
    from .runner import Job, output_guard, run

    info = info or dist_info()
    keys = list(keys)
    with output_guard(out_dir, info, len(keys) * bytes_per_item):  # before the plan is read or written
        writer = ShardWriter(out_dir, keys, shard_size, run_meta, info, overwrite)
        shard_of = {k: s for s in writer.shards for k in s.keys}
        finished = {s.name for s in writer.mine} - {s.name for s in writer.pending()}
        records: dict[str, Record] = {}

        def write(unit: Sequence[str]) -> None:
            shard = shard_of[unit[0]]
            writer.write(shard, {k: records.pop(k) for k in shard.keys})

        job: Job[str] = Job([k for s in writer.shards for k in s.keys], lambda b: records.update(compute(list(b))),
                            done=lambda k: shard_of[k].name in finished, unit=shard_size, on_unit=write,
                            on_fail=lambda k, msg: records.__setitem__(k, Record(error=msg)))
        if load is not None:
            job.load = load
        res = run(job, batch_size=batch_size, overwrite=overwrite, desc=desc, info=info)
        return ShardRun(res.done + len(res.failed), res.skipped, merge_index(out_dir, allow_incomplete=True))


def extract_folder_sharded(
    ex: Any,
    images: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int,
    batch_size: int = 4,
    save_dtype: str = "fp16",
    overwrite: bool = False,
    info: DistInfo | None = None,
) -> ShardRun:
    """``difffeat extract --shard-size N``: the features of every image under ``images`` in shards.

    Image keys are paths relative to ``images`` (POSIX separators). Per-image metadata is what
    :func:`difffeat.pipeline.extract_folder` stores (image path, original and input size); the
    extractor's settings are stored once, in ``plan.json`` and the shard headers. An unreadable
    image is recorded as an ``error`` line and the run goes on; the rank that merges the index
    then raises one :class:`DiffFeatError` counting the failures (non-zero exit, outputs kept).
    """
    from .io import list_images, load_image
    from .pipeline import SAVE_DTYPES, Item, feature_bytes, group_by_size, working_side

    root, out_dir = Path(images), Path(out_dir)
    paths = {(p.name if root.is_file() else p.relative_to(root).as_posix()): p for p in list_images(root)}
    key_of = {p: k for k, p in paths.items()}
    dtype, side = SAVE_DTYPES[save_dtype], working_side(ex)

    def load(key: str) -> Item:
        return Item(paths[key], out_dir, load_image(paths[key], max_side=side))

    def compute(items: list[Item]) -> dict[str, Record]:
        out: dict[str, Record] = {}
        for its, x in group_by_size(items, lambda im: ex.prepare([im])[0]):
            feats = ex(x)
            for i, it in enumerate(its):
                meta = {"image": str(it.path), "original_size": list(it.size),
                        "input_size": [int(x.shape[-1]), int(x.shape[-2])]}
                out[key_of[it.path]] = Record({k: v[i].to(dtype) for k, v in feats.items()}, meta)
        return out

    run_meta = dict(ex.metadata(), save_dtype=save_dtype)
    res = run_sharded(out_dir, paths, compute, shard_size=shard_size, batch_size=batch_size, run_meta=run_meta,
                      overwrite=overwrite, info=info, load=load, bytes_per_item=feature_bytes(ex, save_dtype))
    if res.merged is not None and res.merged.failed:
        first = res.merged.failed[0]
        raise DiffFeatError(
            f"{len(res.merged.failed)} of {res.merged.num_items} images failed (first: {first}); the others were written. "
            f"See the 'error' lines of {INDEX}; to retry, fix the images, delete their shards' .jsonl files and rerun"
        )
    return res
