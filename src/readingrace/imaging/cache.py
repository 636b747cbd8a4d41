"""Preprocess once, reuse forever: a content-addressed, memory-mapped cache of resized images.

:func:`build_cache` decodes and resizes every image once (in parallel) into one ``images.npy``
array of shape (N, S, S) and writes ``index.json`` (paths, ok flags, skip reasons, settings) last.
The cache's folder name is derived from a SHA-256 *key* over the format version, every resolved
path with its size and modification time, and the settings, so a changed file or setting gives a
new cache and an unchanged one is reopened without decoding anything.

Crash and concurrency safety: the build writes into a private temporary folder next to the final
one, fsyncs everything, and renames the folder into place in one atomic step. A killed build
leaves only a ``.tmp-*`` folder, which is never opened and is removed by a later build on the same
host once its process is gone. When two processes build the same key at once, the loser of the
rename discards its copy and opens the winner's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from readingrace.errors import ConfigError, ImageReadError, ReadingRaceError, RunError
from readingrace.imaging.io import load_image, resize

__all__ = [
    "CACHE_FORMAT_VERSION",
    "ImageCache",
    "build_cache",
    "cache_key",
    "open_cache",
]

#: Bump when the stored layout or the decoding rules change: old caches then get new keys.
CACHE_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
IMAGES_NAME = "images.npy"
_TMP_PREFIX = ".tmp-"
_DTYPES = ("float32", "float16")
_MODES = ("stretch", "pad")
_MIN_PARALLEL = 32  # fewer images than this are decoded in the calling process
_MAX_CHUNK = 256


@dataclass
class ImageCache:
    """A built cache: ``images[i]`` is ``paths[i]`` decoded and resized (zeros if not ``ok[i]``)."""

    key: str
    directory: Path
    images: np.ndarray  # np.memmap (N, S, S), read-only
    ok: np.ndarray  # bool (N,)
    reasons: dict[int, str]  # index -> skip reason, for the images that failed
    paths: list[str]
    size: int = 0
    mode: str = "stretch"
    dtype: str = "float32"
    bit_depth: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_failed(self) -> int:
        """Number of images that could not be decoded."""
        return int((~self.ok).sum())

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every failed image, in index order."""
        return [(self.paths[i], self.reasons.get(i, "failed")) for i in np.flatnonzero(~self.ok)]


# ------------------------------------------------------------------------------------------------
# the key
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _real_dir(directory: str) -> str:
    return os.path.realpath(directory)


def _resolve(path: str) -> str:
    """os.path.realpath, with the parent folder's resolution cached (one lstat per file)."""
    absolute = os.path.abspath(path)
    parent, name = os.path.split(absolute)
    resolved = os.path.join(_real_dir(parent), name)
    try:
        if os.path.islink(resolved):
            resolved = os.path.realpath(resolved)
    except OSError:
        pass
    return resolved


def cache_key(
    paths: Sequence[str | os.PathLike[str]],
    *,
    size: int,
    mode: str = "stretch",
    dtype: str = "float32",
    bit_depth: int | None = None,
) -> str:
    """SHA-256 content address of a cache: format version, each resolved path with its file size
    and mtime_ns (a missing file counts as such), and the settings."""
    h = hashlib.sha256()
    header = {"format": CACHE_FORMAT_VERSION, "size": int(size), "mode": mode, "dtype": dtype,
              "bit_depth": bit_depth, "n": len(paths)}
    h.update(json.dumps(header, sort_keys=True).encode())
    for p in paths:
        resolved = _resolve(os.fspath(p))
        try:
            st = os.stat(resolved)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\n{resolved}\t{stamp}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------
def _validate(size: Any, mode: str, dtype: str, bit_depth: Any, workers: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"image cache: size must be a positive integer, got {size!r}")
    if mode not in _MODES:
        raise ConfigError(f"image cache: mode must be one of {_MODES}, got {mode!r}")
    if dtype not in _DTYPES:
        raise ConfigError(f"image cache: dtype must be one of {_DTYPES}, got {dtype!r}")
    if bit_depth is not None and (not isinstance(bit_depth, int) or not 1 <= bit_depth <= 16):
        raise ConfigError(f"image cache: bit_depth must be 1..16 or None, got {bit_depth!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"image cache: workers must be a positive integer, got {workers!r}")


def _decode_one(path: str, size: int, mode: str, bit_depth: int | None) -> np.ndarray:
    """Decode and resize one image (module level so tests can replace it)."""
    return resize(load_image(path, bit_depth=bit_depth), size, mode=mode)


def _decode_into(
    out: np.ndarray, start: int, paths: Sequence[str], size: int, mode: str,
    bit_depth: int | None,
) -> dict[int, str]:
    """Fill ``out[start:start + len(paths)]``; return {index: reason} for the failed images."""
    reasons: dict[int, str] = {}
    for offset, path in enumerate(paths):
        i = start + offset
        try:
            out[i] = _decode_one(path, size, mode, bit_depth)
        except ImageReadError as exc:
            reasons[i] = exc.reason
        except Exception as exc:  # noqa: BLE001 - one odd file must not kill a 300k-image build
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            reasons[i] = f"unexpected {type(exc).__name__}: {text}".rstrip(": ")
    return reasons


def _decode_chunk(
    images_file: str, start: int, paths: list[str], size: int, mode: str, bit_depth: int | None,
) -> dict[int, str]:
    """Worker: open the shared memmap and fill one chunk in place (no pixels are pickled)."""
    out = np.load(images_file, mmap_mode="r+")
    try:
        return _decode_into(out, start, paths, size, mode, bit_depth)
    finally:
        out.flush()
        del out


def _chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


class _Progress:
    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self.done = self.failed = 0
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, failed: int, *, final: bool = False) -> None:
        self.done += done
        self.failed += failed
        now = time.monotonic()
        if self.enabled and (final or now - self.last >= 2.0):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(
                f"image cache {self.label}: {self.done}/{self.total} images "
                f"({self.failed} failed, {rate:.0f}/s)",
                file=sys.stderr,
                flush=True,
            )


def _decode_all(
    images_file: Path, out: np.ndarray, paths: list[str], *, size: int, mode: str,
    bit_depth: int | None, workers: int, progress: _Progress,
) -> dict[int, str]:
    n = len(paths)
    reasons: dict[int, str] = {}
    if workers <= 1 or n < _MIN_PARALLEL:
        chunk = max(1, min(_MAX_CHUNK, n))
        for start, stop in _chunks(n, chunk):
            got = _decode_into(out, start, paths[start:stop], size, mode, bit_depth)
            reasons.update(got)
            progress.update(stop - start, len(got))
        return reasons
    out.flush()
    # small chunks keep all workers busy to the end; large ones amortise the per-task overhead
    chunk = max(8, min(_MAX_CHUNK, math.ceil(n / (workers * 8))))
    todo = iter(_chunks(n, chunk))
    try:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: dict[Any, int] = {}

            def refill() -> None:
                # at most 2 chunks per worker in flight: memory stays flat for huge lists
                while len(pending) < 2 * workers:
                    nxt = next(todo, None)
                    if nxt is None:
                        return
                    start, stop = nxt
                    fut = pool.submit(_decode_chunk, str(images_file), start, paths[start:stop],
                                      size, mode, bit_depth)
                    pending[fut] = stop - start

            try:
                refill()
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        count = pending.pop(fut)
                        got = fut.result()
                        reasons.update(got)
                        progress.update(count, len(got))
                    refill()
            except BaseException:
                # Ctrl-C or a failure: do not start the queued chunks before giving up
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool as exc:
        raise RunError(
            f"image cache: a decoding worker process died ({exc}); a decoder may have crashed "
            "on one file or the machine ran out of memory: retry with fewer workers"
        ) from None
    return reasons


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _tmp_name(key: str) -> str:
    host = socket.gethostname().replace(os.sep, "_") or "host"
    return f"{_TMP_PREFIX}{key[:16]}-{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _clean_stale_temps(root: Path) -> list[Path]:
    """Remove temporary folders of builds on this host whose process no longer runs."""
    host = socket.gethostname().replace(os.sep, "_") or "host"
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(_TMP_PREFIX) or not entry.is_dir():
            continue
        try:
            head, pid_text, _token = entry.name.rsplit("-", 2)
            pid = int(pid_text)
        except ValueError:
            continue
        if not head.endswith(f"-{host}") or pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def build_cache(
    paths: Sequence[str | os.PathLike[str]],
    *,
    size: int,
    cache_root: Path | str,
    mode: str = "stretch",
    dtype: str = "float32",
    bit_depth: int | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> ImageCache:
    """Decode and resize every image once into a memory-mapped (N, size, size) array, or reopen it.

    Images that cannot be decoded are recorded in ``reasons`` with ``ok[i] = False`` and a zero
    slot; this never raises for one bad image. ``workers`` defaults to ``min(4, os.cpu_count())``.
    """
    _validate(size, mode, dtype, bit_depth, workers)
    size = int(size)
    str_paths = [os.fspath(p) for p in paths]
    key = cache_key(str_paths, size=size, mode=mode, dtype=dtype, bit_depth=bit_depth)
    root = Path(cache_root)
    final = root / key[:16]
    if final.exists():
        return open_cache(final, expect_key=key)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"image cache: cannot create cache folder {root}: {exc.strerror}") from None
    _clean_stale_temps(root)

    tmp = root / _tmp_name(key)
    n = len(str_paths)
    try:
        tmp.mkdir()
        images_file = tmp / IMAGES_NAME
        out = np.lib.format.open_memmap(images_file, mode="w+", dtype=dtype, shape=(n, size, size))
        n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        prog = _Progress(progress, n, key[:16])
        reasons = _decode_all(images_file, out, str_paths, size=size, mode=mode,
                              bit_depth=bit_depth, workers=n_workers, progress=prog)
        prog.update(0, 0, final=True)
        out.flush()
        del out
        _fsync_path(images_file)
        ok = np.ones(n, dtype=bool)
        ok[list(reasons)] = False
        index = {
            "format": CACHE_FORMAT_VERSION,
            "key": key,
            "size": size,
            "mode": mode,
            "dtype": dtype,
            "bit_depth": bit_depth,
            "n": n,
            "n_failed": len(reasons),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "paths": str_paths,
            "ok": ok.astype(int).tolist(),
            "reasons": {str(i): r for i, r in sorted(reasons.items())},
        }
        with open(tmp / INDEX_NAME, "w", encoding="utf-8") as f:  # written last
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp, directory=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INDEX_NAME).is_file():
                raise
            # another process published the same key first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _fsync_path(root, directory=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise RunError(
                f"image cache: writing {tmp} failed ({exc.strerror or exc}); check free disk "
                "space and write permission of the cache folder"
            ) from exc
        raise
    return open_cache(final, expect_key=key)


# ------------------------------------------------------------------------------------------------
# opening
# ------------------------------------------------------------------------------------------------
def open_cache(directory: Path | str, *, expect_key: str | None = None) -> ImageCache:
    """Open a complete cache folder read-only (memory-mapped); nothing is decoded."""
    d = Path(directory)
    fix = f"delete the folder {d} and build the cache again"
    if d.name.startswith(_TMP_PREFIX):
        raise ReadingRaceError(f"image cache: {d} is an unfinished build, not a cache; {fix}")
    try:
        with open(d / INDEX_NAME, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise ReadingRaceError(
            f"image cache: {d} is not a complete cache (no {INDEX_NAME}); {fix}"
        ) from None
    except (OSError, ValueError) as exc:
        raise ReadingRaceError(f"image cache: unreadable {d / INDEX_NAME} ({exc}); {fix}") from None
    try:
        version = index["format"]
        key = index["key"]
        paths = list(index["paths"])
        ok = np.asarray(index["ok"], dtype=bool)
        reasons = {int(i): str(r) for i, r in index["reasons"].items()}
        size, mode, dtype = int(index["size"]), str(index["mode"]), str(index["dtype"])
        bit_depth = index.get("bit_depth")
    except (KeyError, TypeError, ValueError) as exc:
        raise ReadingRaceError(
            f"image cache: {d / INDEX_NAME} lacks or mangles {exc}; {fix}"
        ) from None
    if version != CACHE_FORMAT_VERSION:
        raise ReadingRaceError(
            f"image cache: {d} has format {version}, this version reads "
            f"{CACHE_FORMAT_VERSION}; {fix}"
        )
    if expect_key is not None and key != expect_key:
        raise ReadingRaceError(
            f"image cache: {d} holds key {key[:16]}..., not {expect_key[:16]}...; {fix}"
        )
    try:
        images = np.load(d / IMAGES_NAME, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ReadingRaceError(
            f"image cache: cannot map {d / IMAGES_NAME} ({exc}); {fix}"
        ) from None
    n = len(paths)
    if images.shape != (n, size, size) or str(images.dtype) != dtype or ok.shape != (n,):
        raise ReadingRaceError(
            f"image cache: {d} is inconsistent (images {images.shape} {images.dtype}, "
            f"{n} paths, size {size}, dtype {dtype}); {fix}"
        )
    return ImageCache(
        key=key, directory=d, images=images, ok=ok, reasons=reasons, paths=paths, size=size,
        mode=mode, dtype=dtype, bit_depth=bit_depth,
        info={k: index.get(k) for k in ("created", "n_failed")},
    )
