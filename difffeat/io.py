"""Image and feature I/O.

Reading: image folders (recursive), EXIF orientation, and every PIL mode a user's
archive contains (RGBA/LA/P with transparency are composited on white; CMYK, 16-bit
and grayscale are converted to 8-bit RGB).

Writing: one safetensors file per image with string metadata, written atomically
(temporary file + ``os.replace``), never overwriting unless asked.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadInputError, DiffFeatError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
ResizePolicy = Literal["resize", "pad", "crop", "snap", "none"]


# --------------------------------------------------------------------------- reading
def list_images(root: str | os.PathLike) -> list[Path]:
    """All images under ``root`` (recursive), sorted by relative path. A single file is allowed.

    Every entry named like an image is listed, including directories, dangling links, FIFOs
    and device files: :func:`load_image` then refuses each in one line (never opening a
    FIFO), so a folder run reports them instead of silently dropping them. A directory named
    like an image is also searched like any other; symbolic links to directories are not
    followed (no loops).
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        if root.is_symlink() or root.exists():
            return [root]  # a dangling link, FIFO or device given directly: load_image says which
        raise BadInputError(f"no such image file or folder: {root}")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise BadInputError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}")
    return files


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB, honouring EXIF orientation.

    16-bit grayscale ("I;16", "I") is rescaled from its full range, transparency is
    composited on white, CMYK/YCbCr/LAB go through PIL's converters.
    """
    if img.getexif().get(0x0112, 1) != 1:  # no full-size copy when there is nothing to rotate
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img if img.mode == "RGB" else img.convert("RGB")


#: PIL's own bomb limit: it raises DecompressionBombError above twice ``Image.MAX_IMAGE_PIXELS``.
DEFAULT_MAX_PIXELS = 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)
_max_pixels: list[int | None] = [None]  # set by --max-pixels; else DIFFFEAT_MAX_PIXELS, else the default
REDUCE_GAP = 4  # huge images are reduced by an integer factor to >= REDUCE_GAP x the working size


def set_max_pixels(n: int | None) -> None:
    """Set the pixel limit of :func:`load_image` (``--max-pixels``; None restores PIL's bomb limit)."""
    if n is not None and n < 1:
        raise BadInputError(f"--max-pixels must be >= 1, got {n}")
    _max_pixels[0] = None if n is None else int(n)


def pixel_limit() -> int:
    """The pixel limit in force: ``--max-pixels``, else ``DIFFFEAT_MAX_PIXELS``, else PIL's bomb limit."""
    if _max_pixels[0] is not None:
        return _max_pixels[0]
    env = os.environ.get("DIFFFEAT_MAX_PIXELS", "").strip()
    if not env:
        return DEFAULT_MAX_PIXELS
    if not env.isdigit() or int(env) < 1:
        raise BadInputError(f"DIFFFEAT_MAX_PIXELS={env!r} is not a positive integer")
    return int(env)


def check_regular_file(path: Path) -> None:
    """Raise one line unless ``path`` is a regular file (after links); never opens it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        what = "a dangling symbolic link" if path.is_symlink() else "missing"
        raise BadInputError(f"image not found: {path} ({what})") from None
    except OSError as e:
        raise BadInputError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device file" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise BadInputError(f"skipped {path}: {kind}, not an image file")


def load_image(path: str | os.PathLike, max_side: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Read one image as 8-bit RGB; any failure is one :class:`BadInputError` line.

    The guarded loader every command uses. The header's pixel count is checked against
    ``max_pixels`` (default: PIL's DecompressionBombError limit, ``--max-pixels`` to raise
    it) *before* anything is decoded. With ``max_side`` (4 x the working resolution is what
    the folder runs pass), an image whose longer side exceeds it is decoded reduced by an
    integer factor: JPEG in the DCT (``Image.draft``), other formats with ``Image.reduce``
    before any mode conversion, so no second full-size copy is made. Pillow documents such a
    reduction to >= 3x the final size as indistinguishable from a direct resize. The size
    before reduction (after EXIF orientation) is :func:`original_size` of the result.
    """
    path = Path(path)
    check_regular_file(path)
    limit = max_pixels or pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is ours, checked below
            with open(path, "rb") as fh:
                with _pil_limit(limit):
                    im = Image.open(fh)  # reads the header only
                w, h = im.size
                if w * h > limit:
                    raise BadInputError(f"{path} claims {w}x{h} = {w * h} pixels, over the limit of {limit} "
                                        f"(a decompression bomb or a huge scan: raise it with --max-pixels)")
                return _decode(im, (w, h), max_side)
    except DiffFeatError:
        raise
    except Image.DecompressionBombError as e:
        raise BadInputError(f"{path}: {e} (raise the limit with --max-pixels)") from None
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises is a per-file error
        msg = "cannot identify image file" if isinstance(e, UnidentifiedImageError) else (str(e).splitlines() or [""])[0]
        raise BadInputError(f"cannot read image {path}: {type(e).__name__}: {msg}") from None


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_limit(limit: int) -> Iterator[None]:
    """Let our header check (not PIL's) decide while a file is opened (header only, fast).

    PIL's own check is disabled for this moment only, under a lock so that concurrent
    loaders (the explore server) serialise their opens; decoding happens after it is back.
    """
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _decode(im: Image.Image, size: tuple[int, int], max_side: int | None) -> Image.Image:
    """Decode ``im`` (reduced when its longer side is over ``max_side``) and convert to RGB."""
    factor = max(1, max(size) // max_side) if max_side else 1
    if factor > 1 and im.format == "JPEG":
        im.draft("RGB" if im.mode in ("RGB", "YCbCr") else im.mode, (-(-size[0] // factor), -(-size[1] // factor)))
        factor = max(1, max(im.size) // max_side)  # what the DCT scaling left to do
    im.load()
    if factor > 1:
        try:
            im = im.reduce(factor)
        except ValueError:  # modes reduce() does not take (e.g. 16-bit): convert first
            im = to_rgb(im).reduce(factor)
    orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    out = to_rgb(im)
    out.info["original_size"] = (size[1], size[0]) if orientation in (5, 6, 7, 8) else size
    return out


def original_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) of the file an image was loaded from (before any reduction of :func:`load_image`)."""
    return tuple(img.info.get("original_size", img.size))  # type: ignore[return-value]


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float Tensor [3,H,W] in [0,1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float Tensor [3,H,W] in [0,1] -> PIL RGB."""
    arr = (x.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


# --------------------------------------------------------------------------- resizing
@dataclass(frozen=True)
class Prepared:
    """A prepared image tensor plus what is needed to map results back to the original."""

    image: torch.Tensor  # [3,H,W] in [0,1]
    original_size: tuple[int, int]  # (W, H) before preparation
    content_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the original content inside `image`


def snap(v: int, multiple: int) -> int:
    """Round ``v`` to the nearest positive multiple of ``multiple``."""
    return max(multiple, int(round(v / multiple)) * multiple)


def prepare_image(
    img: Image.Image,
    size: int | tuple[int, int] | None,
    policy: ResizePolicy = "resize",
    multiple: int = 8,
    pad_value: int = 0,
) -> Prepared:
    """Resize one image for a backbone.

    Policies:
      * ``resize``: bicubic resize to ``size`` (an int gives a square), ignoring aspect ratio
        (the DIFT protocol).
      * ``pad``: LANCZOS-resize the longer side to ``size`` keeping aspect, centre it on a
        square canvas of ``pad_value`` (the SD-DINO / GeoAware-SC protocol, their
        ``utils_correspondence.resize``).
      * ``crop``: centre-crop the largest square, then resize it bilinearly (no antialias,
        half-pixel centres, unquantised) to ``size`` (DiffSeg's ``process_image``:
        ``tf.image.resize`` of the crop); :func:`centre_square` gives the crop's box.
      * ``snap``: keep the aspect ratio; scale so the longer side is ``size`` (or keep the
        native size if ``size`` is None) and snap both sides to ``multiple``.
      * ``none``: no change except snapping to ``multiple`` (errors if not a multiple).
    """
    w, h = img.size
    if policy == "resize":
        if size is None:
            raise BadInputError("resize policy 'resize' needs a size")
        tw, th = (size, size) if isinstance(size, int) else size
        out = img.resize((tw, th), Image.BICUBIC)
        return Prepared(pil_to_tensor(out), (w, h), (0, 0, tw, th))
    if policy == "pad":
        if size is None:
            raise BadInputError("resize policy 'pad' needs a size")
        s = size if isinstance(size, int) else max(size)
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (s, s), (pad_value,) * 3)
        ox, oy = (s - nw) // 2, (s - nh) // 2
        canvas.paste(img.resize((nw, nh), Image.LANCZOS), (ox, oy))
        return Prepared(pil_to_tensor(canvas), (w, h), (ox, oy, ox + nw, oy + nh))
    if policy == "crop":
        return _centre_crop_bilinear(img, size)
    if policy == "snap":
        scale = 1.0 if size is None else (size if isinstance(size, int) else max(size)) / max(w, h)
        nw, nh = snap(round(w * scale), multiple), snap(round(h * scale), multiple)
        out = img if (nw, nh) == (w, h) else img.resize((nw, nh), Image.BICUBIC)
        return Prepared(pil_to_tensor(out), (w, h), (0, 0, nw, nh))
    if policy == "none":
        if w % multiple or h % multiple:
            raise BadInputError(f"image size {w}x{h} is not a multiple of {multiple}; use --resize snap")
        return Prepared(pil_to_tensor(img), (w, h), (0, 0, w, h))
    raise BadInputError(f"unknown resize policy {policy!r}; valid: resize, pad, crop, snap, none")


def centre_square(w: int, h: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the centred ``min(w, h)`` square, offsets rounded down."""
    c = min(w, h)
    x0, y0 = (w - c) // 2, (h - c) // 2
    return x0, y0, x0 + c, y0 + c


def _centre_crop_bilinear(img: Image.Image, size: int | tuple[int, int] | None) -> Prepared:
    """The ``crop`` policy: :func:`centre_square`, then bilinear to ``size`` x ``size``."""
    if size is None:
        raise BadInputError("resize policy 'crop' needs a size")
    s = size if isinstance(size, int) else max(size)
    box = centre_square(*img.size)
    x = pil_to_tensor(img.crop(box))
    if x.shape[-1] != s:
        x = torch.nn.functional.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False)[0]
    return Prepared(x, img.size, (0, 0, s, s))


def image_key(image: torch.Tensor) -> str:
    """A content hash of a prepared image (quantised to 8 bits), used to seed per-image noise.

    Hashing content (not a file name or batch index) makes an image's noise, and so its
    features, independent of batch composition and of where the file lives. The hash is
    taken over a 64x64 area-downsampled copy plus the full size: cheap on large images,
    and images that agree at that scale merely share their noise (harmless).
    """
    x = image.detach().float()
    small = torch.nn.functional.adaptive_avg_pool2d(x.unsqueeze(0), (64, 64))[0] if x.shape[-1] > 64 or x.shape[-2] > 64 else x
    q = (small.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().contiguous()
    h = hashlib.sha1(str(tuple(image.shape)).encode())
    h.update(q.numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- writing
_TMP_TAG = f"{hashlib.sha1(os.uname().nodename.encode()).hexdigest()[:6]}-{{pid}}" if hasattr(os, "uname") else "h-{pid}"
_TMP_RE = re.compile(r"^\..+\.([0-9a-f]{6}|h)-(\d+)\.[A-Za-z0-9_]+\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    On error the temporary file is removed, so a crash never leaves a half-written output.
    A ``kill -9`` cannot run that clean-up: the temporary name carries the host and pid
    (``.NAME.HOST-PID.RANDOM.tmp``) so that the next run removes it
    (:func:`remove_stale_temps`) once that process is gone, and it is never taken for an output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TMP_TAG.format(pid=os.getpid())}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, pattern: str = "**/.*.tmp") -> int:
    """Delete the temporary files of :func:`atomic_path` under ``folder`` whose writer is dead.

    Only files made on this host by a process that no longer exists are removed, so a
    concurrent rank's (or another host's) write in progress is never touched. ``pattern``
    (a glob under ``folder``) narrows the search. Returns the count.
    """
    folder, here, n = Path(folder), _TMP_TAG.split("-")[0], 0
    if not folder.is_dir():
        return 0
    for p in folder.glob(pattern):
        m = _TMP_RE.match(p.name)
        if m and m.group(1) == here and not pid_alive(int(m.group(2))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n


def save_features(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, object]
) -> None:
    """Write tensors to a safetensors file atomically with JSON-encoded metadata values."""
    from safetensors.torch import save_file

    # one metadata key with sorted JSON: safetensors' header order is then byte-stable across runs
    meta = {"difffeat": json.dumps(metadata, sort_keys=True, default=json_default)}
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=meta)


def load_features(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read a file written by :func:`save_features`; metadata values are JSON-decoded."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise BadInputError(f"feature file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise BadInputError(f"cannot read feature file {path}: {e}") from None
    if "difffeat" in meta_raw:
        return tensors, json.loads(meta_raw["difffeat"])
    meta: dict[str, object] = {}
    for k, v in meta_raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def save_json(path: str | os.PathLike, obj: object) -> None:
    """Write JSON atomically (indent 2)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=json_default) + "\n")


def save_png(path: str | os.PathLike, img: Image.Image | np.ndarray) -> None:
    """Write a PNG atomically. uint16 arrays become 16-bit PNGs, uint8 arrays 8-bit."""
    if isinstance(img, np.ndarray):
        if img.dtype == np.uint16:
            img = Image.fromarray(img)  # mode I;16
        else:
            img = Image.fromarray(img)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def json_default(o: object) -> object:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def output_path(out_dir: Path, root: Path, image: Path, suffix: str) -> Path:
    """Mirror ``image``'s path relative to ``root`` inside ``out_dir`` with a new suffix."""
    rel = image.name if Path(root).is_file() else Path(image).relative_to(root).as_posix()
    return inside(out_dir, str(Path(rel).with_suffix("")) + suffix)


def inside(out_dir: str | os.PathLike, rel: str) -> Path:
    """``out_dir / rel``, refusing in one line any name that would land outside ``out_dir``.

    Absolute names and ``..`` components are refused, and so is a folder on the way that is
    a symbolic link leading out of ``out_dir`` (the final file is replaced, not followed, by
    :func:`atomic_path`).
    """
    out_dir = Path(out_dir)
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise BadInputError(f"output name {rel!r} would leave the output folder {out_dir}")
    target = out_dir.joinpath(*parts)
    real_out, real_parent = os.path.realpath(out_dir), os.path.realpath(target.parent)
    if real_parent != real_out and not real_parent.startswith(real_out.rstrip(os.sep) + os.sep):
        raise BadInputError(f"output {target} would be written outside {out_dir} (through a symbolic link)")
    return target


class FolderRun:
    """Book-keeping for a folder run: skipped, done and failed files, one line per failure.

    Usage::

        run = FolderRun()
        for path in files:
            with run.item(path):
                ...            # a DiffFeatError here is reported and counted, the run goes on
        run.finish()           # raises DiffFeatError (non-zero exit) if anything failed
    """

    def __init__(self, echo=print) -> None:  # type: ignore[no-untyped-def]
        self.done = 0
        self.skipped = 0
        self.failed: list[tuple[str, str]] = []
        self._echo = echo

    @contextlib.contextmanager
    def item(self, name: object) -> Iterator[None]:
        try:
            yield
        except DiffFeatError as e:
            self.failed.append((str(name), str(e)))
            self._echo(f"error: {e}")
        else:
            self.done += 1

    def fail(self, name: object, message: str) -> None:
        self.failed.append((str(name), message))
        self._echo(f"error: {message}")

    def finish(self, what: str = "images") -> None:
        if self.failed:
            raise DiffFeatError(
                f"{len(self.failed)} of {self.done + len(self.failed) + self.skipped} {what} failed "
                f"(first: {self.failed[0][0]}); the others were written"
            )


def chunked(seq: Sequence, n: int) -> Iterator[Sequence]:  # type: ignore[type-arg]
    """Consecutive slices of ``seq`` of length ``n`` (the last may be shorter)."""
    for i in range(0, len(seq), max(1, n)):
        yield seq[i : i + n]
