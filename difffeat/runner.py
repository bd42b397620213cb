"""The one folder runner: every command that works through many inputs runs on it.

A :class:`Job` says what to do; :func:`run` does the rest, once for every command:

* **rank sharding** — the item list is cut into consecutive *units* (a batch, a shard, a
  block of pairs); unit ``j`` goes to rank ``j % world_size`` (:mod:`difffeat.distributed`);
* **resume** — a unit whose items are all ``done`` is skipped, one ``resuming:`` line says
  how many; a unit with some items done is computed whole (the same batch as an
  uninterrupted run, hence byte-identical outputs) and the job's sink skips writing the
  items already written;
* **failures** — an item whose ``load`` raises :class:`DiffFeatError` is reported in one
  line and skipped; a failing batch is retried item by item to find the culprit; the run
  ends with one error counting the failures (non-zero exit), every other output written;
* **out of memory** — a CUDA OOM inside a batch retries that batch at half the size once;
  if that fails too, its items fail with a one-line hint and the run goes on at the
  smaller size;
* **progress** — one bar on rank 0 (hidden with ``DIFFFEAT_NO_PROGRESS=1``);
* **the output folder** — before any work: writability and free space for the expected
  output size (:func:`preflight`), an exclusive lock (:class:`OutputLock`) and removal of
  temporary files that killed runs left (:func:`difffeat.io.remove_stale_temps`).

Sinks (what ``process`` writes through) are the job's: per-item files written atomically
(:mod:`difffeat.pipeline`), CSV rows (:class:`CsvSink`), shards (:mod:`difffeat.shards`).
"""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import torch

from .distributed import DistInfo, dist_info, progress_bar, rank_units
from .errors import BadInputError, DiffFeatError, OutOfMemoryError
from .io import FolderRun, atomic_path, remove_stale_temps

T = TypeVar("T")
LOCK_NAME = ".difffeat.lock"
MIN_FREE = 16 << 20  # bytes kept free on top of the expected outputs


def _never(item: Any) -> bool:
    return False


def _same(item: Any) -> Any:
    return item


@dataclass
class Job(Generic[T]):
    """What a folder run does.

    Args:
        items: every input of the run in a deterministic order (all ranks pass the same list).
        process: called with a list of loaded items (``load``'s results); writes their outputs.
            A :class:`DiffFeatError` fails the batch (then retried one by one).
        done: whether an item's output is finished (it is then not recomputed).
        load: reads one item (e.g. decodes its image); a :class:`DiffFeatError` fails that item.
        name: how an item is named in messages.
        on_fail: told about each failed item (e.g. to record the error in a shard).
        on_unit: called after each computed unit with its items (e.g. to write a shard).
        unit: items per rank unit (default: the batch size). ``split="blocks"`` instead cuts
            the list into one contiguous block per rank (neighbouring pairs share images).
    """

    items: Sequence[T]
    process: Callable[[list[Any]], None]
    done: Callable[[T], bool] = _never
    load: Callable[[T], Any] = _same
    name: Callable[[T], str] = str
    on_fail: Callable[[T, str], None] | None = None
    on_unit: Callable[[Sequence[T]], None] | None = None
    unit: int | None = None
    split: str = "strided"


@dataclass
class _Progress:
    """The failure book-keeping of a run plus its bar."""

    run: FolderRun
    bar: Any


def run(job: Job[T], *, out: str | os.PathLike | None = None, batch_size: int = 1, overwrite: bool = False,
        desc: str = "images", unit_name: str = "img", bytes_per_item: int = 0, info: DistInfo | None = None,
        echo: Callable[[str], Any] | None = None, single_raises: bool = False, lock: bool = True,
        out_is_file: bool = False, resume_note: bool = True) -> FolderRun:
    """Run ``job`` over this rank's share of its items; see the module docstring.

    ``out`` is the output folder (or, with ``out_is_file``, an output file such as a CSV): it is
    checked, locked and cleaned before the first item. ``bytes_per_item`` estimates one
    item's output for the free-space check. With ``single_raises`` a run of one item raises
    that item's own error instead of the count.
    """
    info = info or dist_info()
    say = echo or (lambda m: _write(m))
    units = rank_units(job.items, job.unit or batch_size, info, blocks=job.split == "blocks")
    flags = [[False] * len(u) if overwrite else [bool(job.done(it)) for it in u] for u in units]
    pending = [(u, f) for u, f in zip(units, flags) if not all(f)]
    res = FolderRun(echo=say)
    res.skipped = sum(sum(f) for f in flags)
    todo = sum(len(f) - sum(f) for _, f in pending)
    guard = output_guard(out, info, todo * bytes_per_item, out_is_file) if out is not None and lock \
        else contextlib.nullcontext()
    with guard:
        if res.skipped and info.is_main and resume_note:
            total = sum(len(u) for u in units)
            where = "" if info.world_size == 1 else f" on rank 0 of {info.world_size}"
            _write(f"resuming: {res.skipped} of {total} {desc}{where} already done (use --overwrite to redo)")
        state = _Progress(res, progress_bar(todo, desc, info, unit=unit_name))
        size = [max(1, batch_size)]
        for u, f in pending:
            _run_unit(job, u, f, size, state, single_raises and len(job.items) == 1)
            if job.on_unit is not None:
                job.on_unit(u)
        state.bar.close()
    return res


def _write(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


Loaded = tuple  # (item, loaded value, finished before this run)


def _run_unit(job: Job[T], unit: Sequence[T], done: Sequence[bool], size: list[int], st: _Progress,
              raise_first: bool) -> None:
    """Process the unit in batches of ``size[0]`` items (which OOM may halve), each loaded just
    before it runs (a shard's images are never all in memory at once).

    Items finished before (``done``) are loaded and computed with their batch, so the others
    see the batch an uninterrupted run had; the job's sink does not rewrite them.
    """
    i = 0
    while i < len(unit):
        n = size[0]
        batch: list[Loaded] = []
        for it, was in zip(unit[i : i + n], done[i : i + n]):
            try:
                batch.append((it, job.load(it), was))
            except DiffFeatError as e:
                if raise_first:
                    raise
                if not was:
                    _fail(job, st, it, str(e))
        i += n
        if batch:
            _run_batch(job, batch, size, st, raise_first)


def _fail(job: Job[T], st: _Progress, item: T, message: str) -> None:
    name = job.name(item)
    st.run.fail(name, message if name in message else f"{name}: {message}")
    if job.on_fail is not None:
        job.on_fail(item, message)
    st.bar.update(1)


def _finished(st: _Progress, batch: Sequence[Loaded]) -> None:
    new = sum(1 for _, _, was in batch if not was)
    st.run.done += new
    st.bar.update(new)


def _run_batch(job: Job[T], batch: list[Loaded], size: list[int], st: _Progress, raise_first: bool) -> None:
    """Process one batch; a DiffFeatError is retried item by item, an OOM at half size once."""
    try:
        job.process([v for _, v, _ in batch])
    except torch.cuda.OutOfMemoryError:
        _empty_cache()
        _oom(job, batch, size, st)
        return
    except DiffFeatError as e:
        if raise_first:
            raise
        if len(batch) == 1:
            if not batch[0][2]:
                _fail(job, st, batch[0][0], str(e))
            return
        for one in batch:
            _run_batch(job, [one], size, st, raise_first)
        return
    _finished(st, batch)


def _oom(job: Job[T], batch: list[Loaded], size: list[int], st: _Progress) -> None:
    """Retry an out-of-memory batch at half size (once); what still fails gets the hint."""
    half = max(1, len(batch) // 2)
    hint = OutOfMemoryError(f"out of GPU memory at batch size {half}: lower -b/--batch-size, --max-batch "
                            f"or --resolution, or use --dtype bf16")
    if len(batch) == 1:
        _fail(job, st, batch[0][0], str(hint))
        return
    if half < size[0]:
        size[0] = half
        _write(f"note: out of GPU memory at batch size {len(batch)}; retrying at {half} and going on at that size")
    for k in range(0, len(batch), half):
        part = batch[k : k + half]
        try:
            job.process([v for _, v, _ in part])
        except torch.cuda.OutOfMemoryError:
            _empty_cache()
            for it, _, was in part:
                if not was:
                    _fail(job, st, it, str(hint))
            continue
        except DiffFeatError:
            for one in part:
                _run_batch(job, [one], [1], st, False)
            continue
        _finished(st, part)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the output folder
@contextlib.contextmanager
def output_guard(out: str | os.PathLike, info: DistInfo | None = None, bytes_needed: int = 0,
                 is_file: bool = False) -> Iterator[None]:
    """Preflight, lock and clean the output folder ``out`` (or a file's folder) during a run."""
    out = Path(out)
    folder = out.parent if is_file else out
    preflight(folder, bytes_needed)
    with OutputLock(folder / (f".{out.name}.lock" if is_file else LOCK_NAME), info):
        remove_stale_temps(folder, f".{out.stem}*.tmp" if is_file else "**/.*.tmp")
        yield


def preflight(folder: str | os.PathLike, bytes_needed: int = 0) -> None:
    """Fail in one line, before any work, if ``folder`` cannot take the run's outputs.

    Checks, in order: the nearest existing ancestor is writable (``os.access``), a probe file
    can really be created (read-only mounts, quotas), and the free space covers
    ``bytes_needed`` plus a margin.
    """
    folder = Path(folder)
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise BadInputError(f"cannot write to {folder}: {anc} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write to {folder}: {anc} is read-only for this user; choose another -o")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ".difffeat-probe") as tmp:
            tmp.write_bytes(b"")
        os.unlink(folder / ".difffeat-probe")
    except OSError as e:
        raise BadInputError(f"cannot write to {folder}: {e.strerror or e}; choose another -o") from None
    free = shutil.disk_usage(folder).free
    if free < bytes_needed + MIN_FREE:
        raise BadInputError(f"not enough free space in {folder}: the outputs need about "
                            f"{_mb(bytes_needed + MIN_FREE)}, {_mb(free)} are free")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class OutputLock:
    """An advisory lock on an output folder (``fcntl.flock``), holding the holder's pid.

    One process runs (``LOCK_EX``) on a folder at a time; a second is refused in one line
    naming the holder. The ranks of one data-parallel run share the folder: each holds the
    folder lock shared (``LOCK_SH``) plus its own rank lock exclusively, so a second run of
    either kind is still refused. The kernel drops the lock when its process dies (even by
    ``kill -9``), so a stale lock file is simply taken over. The lock file stays in place.
    """

    def __init__(self, path: str | os.PathLike, info: DistInfo | None = None) -> None:
        self.path, self.info = Path(path), info or dist_info()
        self._fds: list[int] = []

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return self
        world = self.info.world_size
        targets = [(self.path, fcntl.LOCK_EX if world == 1 else fcntl.LOCK_SH)]
        if world > 1:
            targets.append((self.path.with_name(f"{self.path.name}.rank{self.info.rank}-of-{world}"), fcntl.LOCK_EX))
        try:
            for p, mode in targets:
                self._take(fcntl, p, mode, write_pid=mode == fcntl.LOCK_EX)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _take(self, fcntl: Any, path: Path, mode: int, write_pid: bool) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "a data-parallel run"
            os.close(fd)
            folder = self.path.parent
            raise BadInputError(f"another difffeat run (pid {holder}) is writing to {folder}; "
                                f"wait for it to finish or use another -o") from None
        self._fds.append(fd)
        if write_pid:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def __exit__(self, *exc: Any) -> None:
        for fd in reversed(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)  # closing releases the flock
        self._fds.clear()


# --------------------------------------------------------------------------- CSV rows
class CsvSink:
    """Rows of a CSV keyed by one column, appended as items finish, crash-safe and ordered.

    Each row is appended and ``fsync``'d. After a kill the file may end in a cut line:
    :meth:`rows` drops it (and any malformed line), so that item counts as not done and is
    redone. :meth:`compact` rewrites the file atomically with each key once, in the run's
    input order, which is what a finished run leaves.
    """

    def __init__(self, path: str | os.PathLike, fields: Sequence[str], key: str,
                 valid: Callable[[dict[str, str]], bool] | None = None) -> None:
        self.path, self.fields, self.key = Path(path), list(fields), key
        self.valid = valid or (lambda row: all(row.get(f) not in (None, "") for f in (key,)))

    def rows(self, path: Path | None = None) -> dict[str, dict[str, str]]:
        """The complete, valid rows of ``path`` (default: the sink's file), keyed (last wins)."""
        path = Path(path or self.path)
        if not path.exists():
            return {}
        text = path.read_text(encoding="utf-8", errors="replace")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a line cut by a kill
        lines = text.splitlines(keepends=True)
        reader = csv.DictReader(lines)
        if lines and reader.fieldnames != self.fields:
            raise BadInputError(f"{path} is not a difffeat CSV with columns {','.join(self.fields)} "
                                f"(found {reader.fieldnames}); choose another -o")
        out: dict[str, dict[str, str]] = {}
        for r in reader:
            if None in r or any(r.get(f) is None for f in self.fields):
                continue
            if self.valid(r):
                out[r[self.key]] = {f: r[f] for f in self.fields}
        return out

    def repair(self, path: Path | None = None) -> None:
        """Cut a partial last line left by a kill, so the next append starts a fresh line."""
        path = Path(path or self.path)
        if not path.exists() or path.stat().st_size == 0:
            return
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, row: dict[str, Any], path: Path | None = None) -> None:
        """Append one row (header first if the file is new) and flush it to disk."""
        path = Path(path or self.path)
        new = not path.exists() or path.stat().st_size == 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow({k: row[k] for k in self.fields})
            f.flush()
            os.fsync(f.fileno())

    def compact(self, order: Sequence[str], parts: Sequence[Path] = ()) -> int:
        """Rewrite the CSV atomically: the rows of it and ``parts``, each key once, in ``order``.

        Keys without a row are left out; ``parts`` are deleted once the CSV is in place.
        Returns the number of rows written.
        """
        rows = self.rows()
        for p in parts:
            rows.update(self.rows(p))
        n = 0
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                for k in order:
                    if k in rows:
                        w.writerow(rows[k])
                        n += 1
        for p in parts:
            p.unlink(missing_ok=True)
        return n


__all__ = ["CsvSink", "Job", "OutputLock", "output_guard", "preflight", "run"]
