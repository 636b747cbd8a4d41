"""Bad image files: each is refused with an ImageReadError naming the file and a short reason (which
callers record as a skip), or, where the file is valid but unusual, decoded by the documented rule."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from readingrace.errors import ImageReadError
from readingrace.imaging.cache import build_cache
from readingrace.imaging.io import load_image

from .conftest import make_dicom, noise_png, write_png

pydicom = pytest.importorskip("pydicom")

GRID = np.array([[0, 1000, 2000], [3000, 4000, 4095]], dtype=np.uint16)


def reason_of(path: Path, **kwargs: object) -> str:
    """The ImageReadError's reason; also checks the error names the file."""
    with pytest.raises(ImageReadError) as info:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return info.value.reason


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


# -- files that are not images ------------------------------------------------------------------------
def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert reason_of(p) == "empty file (0 bytes)"


def test_missing_file(tmp_path: Path) -> None:
    assert reason_of(tmp_path / "absent.png") == "file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    d = tmp_path / "folder.png"
    d.mkdir()
    assert reason_of(d) == "not a regular file"


def test_text_file_named_png(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("patient list, not an image\n")
    assert reason_of(p) == "not a recognised image format (PNG, JPEG or DICOM)"


def test_text_file_without_extension(tmp_path: Path) -> None:
    p = tmp_path / "README"
    p.write_text("hello")
    assert reason_of(p) == "not a recognised image format (PNG, JPEG or DICOM)"


def test_corrupt_png_body(tmp_path: Path) -> None:
    data = bytearray(png_bytes())
    data[60:200] = b"\x00" * 140  # inside the compressed IDAT stream
    p = tmp_path / "corrupt.png"
    p.write_bytes(bytes(data))
    reason = reason_of(p)
    assert reason.startswith(("corrupt image", "truncated file")), reason


def test_png_signature_then_garbage(tmp_path: Path) -> None:
    p = tmp_path / "garbage.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert reason_of(p).startswith("truncated file")


def test_truncated_png(tmp_path: Path) -> None:
    p = tmp_path / "half.png"
    p.write_bytes(png_bytes()[: len(png_bytes()) // 2])
    assert reason_of(p).startswith("truncated file")


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = jpeg_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    assert reason_of(p).startswith("truncated file")


def test_constant_image(tmp_path: Path) -> None:
    p = write_png(tmp_path / "flat.png", np.full((8, 8), 77, dtype=np.uint8))
    assert reason_of(p) == "constant image"


# -- DICOM ----------------------------------------------------------------------------------------------
def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "nopix.dcm", GRID)
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p, enforce_file_format=True)
    assert reason_of(p) == "DICOM has no pixel data"


def test_dicom_compressed_without_transfer_syntax(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    p = make_dicom(tmp_path / "nots.dcm", GRID, meta=False)
    ds = pydicom.dcmread(p, force=True)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7fake\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(p, implicit_vr=True, little_endian=True)
    assert "no transfer syntax" in reason_of(p)


def test_dicom_uncompressed_without_transfer_syntax_loads(tmp_path: Path) -> None:
    """No file meta at all but plain pixels: read as implicit little endian (not a failure)."""
    p = make_dicom(tmp_path / "raw", GRID, meta=False)
    np.testing.assert_allclose(load_image(p), GRID / 65535.0, atol=1e-6)


def test_dicom_undecodable_compression(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    p = make_dicom(tmp_path / "jls.dcm", GRID)
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7fake\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(p, enforce_file_format=True)
    reason = reason_of(p)
    assert "needs a decoder" in reason and "pip install pylibjpeg" in reason


def test_dicom_truncated_pixel_data(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "cut.dcm", GRID)
    p.write_bytes(p.read_bytes()[:-5])
    assert reason_of(p).startswith("truncated DICOM pixel data")


def test_dicom_damaged_header(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "head.dcm", GRID)
    data = bytearray(p.read_bytes())
    p.write_bytes(bytes(data[:140]) + b"\xff" * 40)
    reason = reason_of(p)
    assert reason.startswith(("unreadable DICOM", "DICOM has no pixel data")), reason


def test_dicom_missing_slope_intercept_means_identity(tmp_path: Path) -> None:
    """No RescaleSlope/Intercept: the modality LUT is the identity (DICOM default), not an error."""
    p = make_dicom(tmp_path / "noslope.dcm", GRID, BitsStored=12)
    ds = pydicom.dcmread(p)
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    np.testing.assert_allclose(load_image(p), GRID / 4095.0, atol=1e-6)


def test_dicom_slope_without_intercept(tmp_path: Path) -> None:
    """A slope alone: intercept 0; scaling by the rescaled bit range keeps [0, 1]."""
    p = make_dicom(tmp_path / "slope.dcm", GRID, BitsStored=12, RescaleSlope=2)
    np.testing.assert_allclose(load_image(p), GRID / 4095.0, atol=1e-6)


def test_dicom_rgb_becomes_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = [255, 0, 0]
    rgb[1, 1] = [255, 255, 255]
    p = make_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    np.testing.assert_allclose(load_image(p), [[0.299, 0], [0, 1]], atol=1e-6)


def test_dicom_multiframe_needs_a_frame(tmp_path: Path) -> None:
    frames = np.stack([GRID, GRID[::-1]])
    p = make_dicom(tmp_path / "multi.dcm", frames)
    assert reason_of(p) == "multi-frame DICOM with 2 frames: pass frame=<0..1>"
    np.testing.assert_allclose(load_image(p, frame=1), GRID[::-1] / 65535.0, atol=1e-6)
    assert reason_of(p, frame=5) == "frame 5 out of range: the file has 2 frame(s)"


def test_dicom_zero_window_width(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "win.dcm", GRID, WindowCenter=100, WindowWidth=0)
    assert "window width 0 too small" in reason_of(p)


# -- unusual but valid PNG / JPEG ---------------------------------------------------------------------
def test_png_alpha_is_ignored(tmp_path: Path) -> None:
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = [200, 200, 200, 0]  # fully transparent: alpha must not matter
    rgba[0, 1] = [10, 10, 10, 255]
    p = write_png(tmp_path / "alpha.png", rgba)
    np.testing.assert_allclose(load_image(p), [[200 / 255, 10 / 255]], atol=1e-6)


def test_png_palette(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 255, 255, 255, 255] + [0] * 750)
    im.putdata([0, 1])
    p = tmp_path / "pal.png"
    im.save(p)
    np.testing.assert_allclose(load_image(p), [[0.114, 1.0]], atol=1e-6)


def test_png_16_bit_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 300, 65535]], dtype=np.uint16)
    p = write_png(tmp_path / "deep.png", arr)
    np.testing.assert_allclose(load_image(p), arr / 65535.0, atol=1e-7)


def test_png_declared_bit_depth_too_high(tmp_path: Path) -> None:
    p = noise_png(tmp_path / "eight.png")
    assert reason_of(p, bit_depth=12) == "declared bit_depth 12 exceeds the file's 8-bit depth"


def test_jpeg_exif_rotation_applied(tmp_path: Path) -> None:
    arr = np.zeros((10, 30), dtype=np.uint8)
    arr[:, :15] = 250
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(p, format="JPEG", quality=95, exif=exif)
    out = load_image(p)
    assert out.shape == (30, 10)
    assert out[:12].mean() > 0.9 and out[18:].mean() < 0.1


# -- through the cache: the bad image is recorded, the others survive ------------------------------------
def test_cache_records_skips_and_keeps_good_images(tmp_path: Path) -> None:
    good = [noise_png(tmp_path / f"ok{i}.png", seed=i) for i in range(3)]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    flat = write_png(tmp_path / "flat.png", np.zeros((8, 8), dtype=np.uint8))
    text = tmp_path / "text.png"
    text.write_text("no")
    paths = [good[0], empty, good[1], flat, text, good[2], tmp_path / "gone.png"]
    cache = build_cache(paths, size=8, cache_root=tmp_path / "cache", workers=1)
    assert cache.ok.tolist() == [True, False, True, False, False, True, False]
    assert cache.reasons == {1: "empty file (0 bytes)", 3: "constant image",
                             4: "not a recognised image format (PNG, JPEG or DICOM)", 6: "file not found"}
    assert [p for p, _ in cache.skipped()] == [str(paths[i]) for i in (1, 3, 4, 6)]
    assert float(np.abs(cache.images[1]).max()) == 0.0  # a failed slot is zeros, never stale pixels
    for i in (0, 2, 5):
        assert float(np.ptp(cache.images[i])) > 0.1
