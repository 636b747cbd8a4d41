"""Tests for readingrace.imaging.cache: build, reopen, keys, failures, crash and race safety."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from readingrace.errors import ConfigError, ReadingRaceError
from readingrace.imaging import cache as cache_mod
from readingrace.imaging.cache import (
    ImageCache,
    build_cache,
    cache_key,
    open_cache,
)
from readingrace.imaging.io import load_image, resize

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_pngs(folder: Path, n: int, *, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        arr = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    return paths


def _expected(paths: list[str], size: int, mode: str = "stretch") -> np.ndarray:
    return np.stack([resize(load_image(p), size, mode=mode) for p in paths])


def _final_dirs(root: Path) -> list[Path]:
    return [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".tmp-")]


def _temp_dirs(root: Path) -> list[Path]:
    return [d for d in root.iterdir() if d.name.startswith(".tmp-")]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_build_and_reopen_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_pngs(tmp_path / "img", 5)
    root = tmp_path / "cache"
    built = build_cache(paths, size=16, cache_root=root, workers=1)
    assert isinstance(built, ImageCache)
    assert built.images.shape == (5, 16, 16) and built.images.dtype == np.float32
    assert isinstance(built.images, np.memmap) and not built.images.flags.writeable
    assert built.ok.tolist() == [True] * 5 and built.reasons == {}
    assert built.directory == root / built.key[:16] and len(built.key) == 64
    assert built.paths == paths
    np.testing.assert_array_equal(built.images, _expected(paths, 16))
    assert _temp_dirs(root) == []

    def boom(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoder called on a complete cache")

    monkeypatch.setattr(cache_mod, "_decode_one", boom)
    again = build_cache(paths, size=16, cache_root=root, workers=1)
    assert again.key == built.key and again.directory == built.directory
    np.testing.assert_array_equal(again.images, built.images)
    reopened = open_cache(built.directory)
    np.testing.assert_array_equal(reopened.images, built.images)
    assert (reopened.size, reopened.mode, reopened.dtype) == (16, "stretch", "float32")


def test_key_changes_with_file_and_settings(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path / "img", 3)
    base = cache_key(paths, size=16)
    assert cache_key(paths, size=16) == base
    assert cache_key(paths, size=32) != base
    assert cache_key(paths, size=16, mode="pad") != base
    assert cache_key(paths, size=16, dtype="float16") != base
    assert cache_key(paths, size=16, bit_depth=8) != base
    assert cache_key(paths[::-1], size=16) != base
    # a relative spelling of the same file gives the same key
    rel = [os.path.relpath(p) for p in paths]
    assert cache_key(rel, size=16) == base

    root = tmp_path / "cache"
    first = build_cache(paths, size=16, cache_root=root, workers=1)
    Image.fromarray(np.full((10, 10), 200, np.uint8) * np.eye(10, dtype=np.uint8)).save(paths[1])
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache_key(paths, size=16) != base
    second = build_cache(paths, size=16, cache_root=root, workers=1)
    assert second.key != first.key and second.directory != first.directory
    assert not np.array_equal(second.images[1], first.images[1])
    np.testing.assert_array_equal(second.images[0], first.images[0])
    resized = build_cache(paths, size=8, cache_root=root, workers=1)
    assert resized.images.shape == (3, 8, 8)
    assert len(_final_dirs(root)) == 3


def test_bad_images_recorded_others_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_pngs(tmp_path / "img", 4)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    flat = tmp_path / "flat.png"
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(flat)
    weird = paths[3]
    all_paths = paths[:2] + [str(tmp_path / "empty.png"), str(tmp_path / "missing.png"),
                             str(tmp_path / "text.png"), str(flat), paths[2], weird]

    original = cache_mod._decode_one

    def flaky(path: str, *args: object) -> np.ndarray:
        if path == weird:
            raise RuntimeError("decoder bug\nsecond line")
        return original(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_mod, "_decode_one", flaky)
    built = build_cache(all_paths, size=12, cache_root=tmp_path / "cache", workers=1)
    assert built.ok.tolist() == [True, True, False, False, False, False, True, False]
    assert built.reasons == {
        2: "empty file (0 bytes)",
        3: "file not found",
        4: "not a recognised image format (PNG, JPEG or DICOM)",
        5: "constant image",
        7: "unexpected RuntimeError: decoder bug",
    }
    assert built.n_failed == 5
    assert built.skipped()[0] == (all_paths[2], "empty file (0 bytes)")
    for i in (2, 3, 4, 5, 7):
        assert not built.images[i].any()  # zero slots
    np.testing.assert_array_equal(built.images[[0, 1, 6]], _expected(
        [all_paths[0], all_paths[1], all_paths[6]], 12))
    reopened = open_cache(built.directory)
    assert reopened.reasons == built.reasons and reopened.ok.tolist() == built.ok.tolist()


def test_parallel_equals_serial_and_float16(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path / "img", 40, seed=1)
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    paths.insert(17, str(tmp_path / "img" / "bad.png"))
    serial = build_cache(paths, size=24, mode="pad", cache_root=tmp_path / "a", workers=1)
    parallel = build_cache(paths, size=24, mode="pad", cache_root=tmp_path / "b", workers=2)
    assert parallel.key == serial.key
    np.testing.assert_array_equal(parallel.images, serial.images)
    assert parallel.reasons == serial.reasons == {17: "truncated file (unreadable PNG header)"}
    half = build_cache(paths, size=24, mode="pad", cache_root=tmp_path / "a", dtype="float16",
                       workers=2)
    assert half.images.dtype == np.float16 and half.key != serial.key
    np.testing.assert_allclose(half.images, serial.images, atol=1e-3)


def test_progress_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _write_pngs(tmp_path / "img", 3)
    built = build_cache(paths, size=8, cache_root=tmp_path / "cache", workers=1, progress=True)
    err = capsys.readouterr().err
    assert f"image cache {built.key[:16]}: 3/3 images (0 failed" in err


def test_leftover_temp_dir_ignored_and_cleaned(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path / "img", 3)
    root = tmp_path / "cache"
    root.mkdir()
    key = cache_key(paths, size=16)
    # a build killed after writing everything but before the rename: looks complete inside
    leftover = root / f".tmp-{key[:16]}-{socket.gethostname()}-{_dead_pid()}-dead"
    leftover.mkdir()
    np.save(leftover / "images.npy", np.full((3, 16, 16), 0.5, np.float32))
    (leftover / "index.json").write_text(json.dumps({"format": 1, "key": key}))
    # a foreign host's leftover is left alone (its process may still run)
    foreign = root / f".tmp-{key[:16]}-otherhost-1-abcd"
    foreign.mkdir()
    built = build_cache(paths, size=16, cache_root=root, workers=1)
    assert not leftover.exists() and foreign.exists()
    np.testing.assert_array_equal(built.images, _expected(paths, 16))  # not the 0.5 leftover
    with pytest.raises(ReadingRaceError, match="unfinished build"):
        open_cache(foreign)


_KILLED_BUILD = """
import sys, time
from readingrace.imaging import cache
original = cache._decode_one
def slow(*args):
    time.sleep(0.1)
    return original(*args)
cache._decode_one = slow
cache.build_cache(sys.argv[2:], size=16, cache_root=sys.argv[1], workers=1)
"""


def test_killed_build_never_looks_complete(tmp_path: Path) -> None:
    paths = _write_pngs(tmp_path / "img", 40)
    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(root), *paths])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if root.is_dir() and any((d / "images.npy").exists() for d in _temp_dirs(root)):
                break
            assert proc.poll() is None, "the build finished before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("the build never started writing")
        time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert _final_dirs(root) == []
    assert len(_temp_dirs(root)) == 1
    built = build_cache(paths, size=16, cache_root=root, workers=1)
    assert _temp_dirs(root) == [] and _final_dirs(root) == [built.directory]
    assert built.ok.all()
    np.testing.assert_array_equal(built.images[-1], _expected(paths[-1:], 16)[0])


def test_concurrent_builds_of_same_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_pngs(tmp_path / "img", 4)
    root = tmp_path / "cache"
    barrier = threading.Barrier(2, timeout=30)
    original = cache_mod._decode_all

    def decode_then_meet(*args: object, **kwargs: object) -> dict[int, str]:
        result = original(*args, **kwargs)  # type: ignore[arg-type]
        barrier.wait()  # both builds have decoded: they race to publish
        return result

    monkeypatch.setattr(cache_mod, "_decode_all", decode_then_meet)
    renames: list[str] = []
    real_rename = os.rename

    def recording_rename(src: str, dst: str) -> None:
        try:
            real_rename(src, dst)
        except OSError:
            renames.append("lost")
            raise
        renames.append("won")

    monkeypatch.setattr(os, "rename", recording_rename)
    results: list[ImageCache] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(build_cache(paths, size=16, cache_root=root, workers=1))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(renames) == ["lost", "won"]  # the loser opened the winner's cache
    assert len(results) == 2 and results[0].directory == results[1].directory
    assert _final_dirs(root) == [results[0].directory] and _temp_dirs(root) == []
    np.testing.assert_array_equal(results[1].images, _expected(paths, 16))


def test_open_cache_rejects_incomplete(tmp_path: Path) -> None:
    folder = tmp_path / "half"
    folder.mkdir()
    np.save(folder / "images.npy", np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ReadingRaceError, match="not a complete cache"):
        open_cache(folder)
    paths = _write_pngs(tmp_path / "img", 2)
    built = build_cache(paths, size=8, cache_root=tmp_path / "cache", workers=1)
    np.save(built.directory / "images.npy", np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ReadingRaceError, match="inconsistent"):
        open_cache(built.directory)


def test_empty_path_list(tmp_path: Path) -> None:
    built = build_cache([], size=8, cache_root=tmp_path / "cache", workers=1)
    assert built.images.shape == (0, 8, 8) and built.ok.shape == (0,)
    assert open_cache(built.directory).paths == []


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 0}, {"size": 8.0}, {"size": 8, "mode": "crop"}, {"size": 8, "dtype": "uint8"},
     {"size": 8, "bit_depth": 20}, {"size": 8, "workers": 0}],
)
def test_bad_settings(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="image cache"):
        build_cache(["x.png"], cache_root=tmp_path, **kwargs)  # type: ignore[arg-type]


@pytest.mark.shared_data
def test_real_nih_sample_cache(tmp_path: Path) -> None:
    folder = SHARED_DATA / "nih-cxr14-sample" / "images"
    if not folder.is_dir():
        pytest.skip("shared data not available")
    paths = [str(p) for p in sorted(folder.glob("*.png"))[:40]]
    built = build_cache(paths, size=64, cache_root=tmp_path, workers=2)
    assert built.ok.all() and built.images.shape == (40, 64, 64)
    np.testing.assert_array_equal(built.images[[0, 39]], _expected([paths[0], paths[39]], 64))
    assert 0.2 < float(built.images.mean()) < 0.8
