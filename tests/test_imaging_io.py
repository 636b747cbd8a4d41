"""Tests for readingrace.imaging.io: decoding rules for PNG / JPEG / DICOM, errors, resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from readingrace.errors import ImageReadError
from readingrace.imaging.io import image_shape, is_dicom, load_image, read_dicom, resize

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ------------------------------------------------------------------------------------------------
# fixtures built in code
# ------------------------------------------------------------------------------------------------
def make_dicom(
    path: Path,
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    file_meta: bool = True,
    **elements: object,
) -> Path:
    """Write a CR DICOM with the given stored pixel values (uint8/uint16/int16)."""
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    if arr.ndim == 3 and photometric == "RGB":
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = arr.shape[:2]
    else:
        ds.SamplesPerPixel = 1
        ds.Rows, ds.Columns = arr.shape[-2:]
        if arr.ndim == 3:
            ds.NumberOfFrames = arr.shape[0]
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    if file_meta:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    return path


def write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(path, format="PNG")
    return path


GRID12 = np.array([[0, 1000, 2000], [3000, 4000, 4095]], dtype=np.uint16)


# ------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------
def test_dicom_no_window_scales_by_stored_bit_range(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a.dcm", GRID12, bits_stored=12)
    out = load_image(path)
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, (GRID12 / 4095.0).astype(np.float32))


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "m1.dcm", GRID12, bits_stored=12, photometric="MONOCHROME1")
    np.testing.assert_array_equal(load_image(path), (1.0 - GRID12 / 4095.0).astype(np.float32))


def test_dicom_rescale_slope_intercept_in_float(tmp_path: Path) -> None:
    stored = np.array([[0, 3, 2047], [2048, 4000, 4095]], dtype=np.uint16)
    path = make_dicom(
        tmp_path / "ct.dcm", stored, bits_stored=12, RescaleSlope=0.5, RescaleIntercept=-1024
    )
    hu, ds = read_dicom(path)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, stored * 0.5 - 1024)  # -1022.5 keeps its half
    assert hu[0, 1] == -1022.5
    assert ds.Modality == "CR"
    # no window: the stored range 0..4095 maps through the rescale to -1024..1023.5
    expected = ((stored * 0.5 - 1024) - (-1024)) / (4095 * 0.5)
    np.testing.assert_allclose(load_image(path), expected, rtol=0, atol=1e-7)


def test_dicom_signed_pixels_no_window(tmp_path: Path) -> None:
    stored = np.array([[-2048, -1], [0, 2047]], dtype=np.int16)
    path = make_dicom(tmp_path / "s.dcm", stored, bits_stored=12)
    np.testing.assert_allclose(load_image(path), (stored + 2048) / 4095.0, atol=1e-7)


def test_dicom_window_applied_and_clipped(tmp_path: Path) -> None:
    stored = np.array([[0, 100, 149], [150, 200, 4095]], dtype=np.uint16)
    path = make_dicom(
        tmp_path / "w.dcm", stored, bits_stored=12, WindowCenter=150.5, WindowWidth=101
    )
    out = load_image(path)
    # linear DICOM window: y = (x - (c - 0.5)) / (w - 1) + 0.5 = (x - 150) / 100 + 0.5, clipped
    expected = np.clip((stored.astype(np.float64) - 150) / 100 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-7)
    assert out[0, 0] == 0.0 and out[1, 2] == 1.0 and out[1, 0] == 0.5


def test_dicom_window_after_rescale_and_window_index(tmp_path: Path) -> None:
    stored = np.array([[0, 1024, 1064], [1100, 2048, 4095]], dtype=np.uint16)
    path = make_dicom(
        tmp_path / "ct_win.dcm",
        stored,
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=[40.5, 500.5],
        WindowWidth=[401, 2001],
    )
    hu = stored.astype(np.float64) - 1024
    first = np.clip((hu - 40) / 400 + 0.5, 0, 1)
    second = np.clip((hu - 500) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(load_image(path), first, atol=1e-7)
    np.testing.assert_allclose(load_image(path, window_index=1), second, atol=1e-7)
    with pytest.raises(ImageReadError, match="window_index 2"):
        load_image(path, window_index=2)


def test_dicom_voi_lut_sequence_used_before_window(tmp_path: Path) -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor
    item.add_new(0x00283006, "OW", np.array([0, 65535, 32768, 13107], "<u2").tobytes())
    path = make_dicom(
        tmp_path / "voi.dcm", stored, bits_stored=12, WindowCenter=1, WindowWidth=2,
        VOILUTSequence=[item],
    )
    expected = np.array([[0, 65535], [32768, 13107]]) / 65535.0
    np.testing.assert_allclose(load_image(path), expected, atol=1e-7)


def test_dicom_without_file_meta_loads_as_implicit_little_endian(tmp_path: Path) -> None:
    plain = make_dicom(tmp_path / "plain.dcm", GRID12, bits_stored=12)
    for name in ("raw.dcm", "raw_no_extension"):
        path = make_dicom(tmp_path / name, GRID12, bits_stored=12, file_meta=False)
        assert path.read_bytes()[128:132] != b"DICM"
        np.testing.assert_array_equal(load_image(path), load_image(plain))


def test_dicom_rgb_becomes_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = [255, 0, 0]
    rgb[0, 1] = [0, 255, 0]
    rgb[1, 0] = [0, 0, 255]
    rgb[1, 1] = [255, 255, 255]
    path = make_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    np.testing.assert_allclose(load_image(path), [[0.299, 0.587], [0.114, 1.0]], atol=1e-6)


def test_dicom_multiframe_needs_frame(tmp_path: Path) -> None:
    frames = np.stack([GRID12, 4095 - GRID12]).astype(np.uint16)
    path = make_dicom(tmp_path / "mf.dcm", frames, bits_stored=12)
    with pytest.raises(ImageReadError, match="2 frames"):
        load_image(path)
    np.testing.assert_allclose(load_image(path, frame=1), (4095 - GRID12) / 4095.0, atol=1e-7)
    with pytest.raises(ImageReadError, match="frame 5 out of range"):
        load_image(path, frame=5)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "nopix.dcm", GRID12, bits_stored=12)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert info.value.reason == "DICOM has no pixel data"
    assert info.value.path == str(path)


def test_dicom_compressed_without_decoder(tmp_path: Path) -> None:
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder plugin is installed")
    path = make_dicom(tmp_path / "jls.dcm", GRID12, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7fake\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="JPEG-LS Lossless.*needs a decoder.*pylibjpeg"):
        load_image(path)


def test_dicom_truncated_pixel_data(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "t.dcm", GRID12, bits_stored=12)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ImageReadError, match="truncated DICOM pixel data"):
        load_image(path)


def test_dicom_constant_after_window(tmp_path: Path) -> None:
    stored = np.array([[0, 10], [20, 30]], dtype=np.uint16)
    path = make_dicom(tmp_path / "c.dcm", stored, WindowCenter=3000, WindowWidth=100)
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert info.value.reason == "constant image"


# ------------------------------------------------------------------------------------------------
# PNG / JPEG
# ------------------------------------------------------------------------------------------------
def test_png_16bit_keeps_full_range(tmp_path: Path) -> None:
    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    values[0, 0], values[-1, -1] = 0, 65535
    path = write_png(tmp_path / "a16.png", values)
    out = load_image(path)
    np.testing.assert_array_equal(out, (values / 65535.0).astype(np.float32))
    assert out.max() == 1.0 and np.unique(out).size == 256


def test_png_16bit_declared_12bit(tmp_path: Path) -> None:
    values = np.array([[0, 2048], [4095, 5000]], dtype=np.uint16)
    path = write_png(tmp_path / "a12.png", values)
    out = load_image(path, bit_depth=12)
    np.testing.assert_allclose(out, [[0, 2048 / 4095], [1, 1]], atol=1e-7)  # 5000 clipped


def test_png_8bit(tmp_path: Path) -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = write_png(tmp_path / "a8.png", values)
    np.testing.assert_array_equal(load_image(path), (values / 255.0).astype(np.float32))
    with pytest.raises(ImageReadError, match="exceeds the file's 8-bit"):
        load_image(path, bit_depth=12)


def test_png_non_square_keeps_hw(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 256, size=(30, 50), dtype=np.uint8)
    path = write_png(tmp_path / "wide.png", values)
    assert load_image(path).shape == (30, 50)
    assert image_shape(path) == (30, 50)


def test_png_rgba_luminance_ignores_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 3] = [[0, 10], [128, 255]]  # alpha must not matter
    rgba[0, 0, :3] = [255, 0, 0]
    rgba[0, 1, :3] = [0, 255, 0]
    rgba[1, 0, :3] = [0, 0, 255]
    rgba[1, 1, :3] = [100, 100, 100]
    path = write_png(tmp_path / "rgba.png", rgba)
    expected = [[0.299, 0.587], [0.114, 100 / 255]]
    np.testing.assert_allclose(load_image(path), expected, atol=1e-6)


def test_png_palette_via_palette(tmp_path: Path) -> None:
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2])
    path = tmp_path / "pal.png"
    im.save(path)
    assert Image.open(path).mode == "P"
    expected = [[0.299, 0.114, (0.299 * 10 + 0.587 * 20 + 0.114 * 30) / 255]]
    np.testing.assert_allclose(load_image(path), expected, atol=1e-6)


def test_jpeg_exif_rotation_transposes(tmp_path: Path) -> None:
    values = np.zeros((20, 40), dtype=np.uint8)
    values[:, :20] = 250  # left half bright
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    Image.fromarray(values).save(path, format="JPEG", quality=95, exif=exif)
    out = load_image(path)
    assert out.shape == (40, 20)
    assert image_shape(path) == (40, 20)
    # after a clockwise rotation the former left half is on top
    assert out[:15].mean() > 0.9 and out[25:].mean() < 0.1


def test_jpeg_scaled_by_255(tmp_path: Path) -> None:
    values = np.tile(np.array([0, 255], dtype=np.uint8).repeat(8), (16, 1))
    path = tmp_path / "g.jpg"
    Image.fromarray(values).save(path, format="JPEG", quality=100)
    out = load_image(path)
    assert out.min() < 0.02 and out.max() > 0.98


# ------------------------------------------------------------------------------------------------
# bad files
# ------------------------------------------------------------------------------------------------
def _reason(path: Path, **kwargs: object) -> str:
    with pytest.raises(ImageReadError) as info:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    assert info.value.path == str(path)
    return info.value.reason


def test_missing_file(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.png") == "file not found"


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _reason(path) == "empty file (0 bytes)"


def test_non_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("patient list, not an image\n" * 20)
    assert _reason(path) == "not a recognised image format (PNG, JPEG or DICOM)"


def test_truncated_png(tmp_path: Path) -> None:
    values = np.random.default_rng(1).integers(0, 256, size=(64, 64), dtype=np.uint8)
    path = write_png(tmp_path / "cut.png", values)
    path.write_bytes(path.read_bytes()[:200])
    assert _reason(path).startswith("truncated file")


def test_truncated_jpeg(tmp_path: Path) -> None:
    values = np.random.default_rng(2).integers(0, 256, size=(64, 64), dtype=np.uint8)
    path = tmp_path / "cut.jpg"
    Image.fromarray(values).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:300])
    assert _reason(path).startswith("truncated file")


def test_constant_png(tmp_path: Path) -> None:
    path = write_png(tmp_path / "flat.png", np.full((8, 8), 77, dtype=np.uint8))
    assert _reason(path) == "constant image"


def test_bad_bit_depth(tmp_path: Path) -> None:
    path = write_png(tmp_path / "a.png", np.arange(16, dtype=np.uint8).reshape(4, 4))
    assert "bit_depth must be" in _reason(path, bit_depth=0)


def test_is_dicom_by_content_and_extension(tmp_path: Path) -> None:
    dcm = make_dicom(tmp_path / "x.img", GRID12, bits_stored=12)
    png = write_png(tmp_path / "y.png", np.arange(4, dtype=np.uint8).reshape(2, 2))
    assert is_dicom(dcm) and not is_dicom(png)
    assert is_dicom(tmp_path / "missing.DCM")
    np.testing.assert_array_equal(load_image(dcm), (GRID12 / 4095.0).astype(np.float32))
    assert image_shape(dcm) == (2, 3)


# ------------------------------------------------------------------------------------------------
# resize
# ------------------------------------------------------------------------------------------------
def test_resize_stretch_shape_range_dtype() -> None:
    img = np.random.default_rng(3).random((300, 200)).astype(np.float32)
    out = resize(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert abs(out.mean() - img.mean()) < 0.01
    assert resize(img, (32, 48)).shape == (32, 48)


def test_resize_is_antialiased() -> None:
    checker = (np.indices((256, 256)).sum(axis=0) % 2).astype(np.float32)
    out = resize(checker, 32)
    np.testing.assert_allclose(out, 0.5, atol=0.02)  # aliasing would give 0/1 patterns


def test_resize_matches_torch_antialias() -> None:
    # reference: torch.nn.functional.interpolate(x, size, mode="bilinear", antialias=True,
    # align_corners=False) on this input, torch 2.13 (hard-coded to keep torch out of this file)
    img = np.arange(48, dtype=np.float32).reshape(8, 6) ** 2 / 47**2
    ref_3x2 = [[0.042089, 0.062758], [0.244131, 0.297323], [0.620988, 0.706702]]
    ref_5x4 = [
        [0.00767, 0.012227, 0.018707, 0.026735],
        [0.071695, 0.087811, 0.106193, 0.12578],
        [0.213728, 0.241839, 0.272572, 0.304153],
        [0.437245, 0.477351, 0.520435, 0.564012],
        [0.725477, 0.777142, 0.832128, 0.887264],
    ]
    np.testing.assert_allclose(resize(img, (3, 2)), ref_3x2, atol=2e-6)
    np.testing.assert_allclose(resize(img, (5, 4)), ref_5x4, atol=2e-6)


def test_resize_pad_geometry() -> None:
    img = np.ones((50, 100), dtype=np.float32)  # wide: padded above and below
    out = resize(img, 100, mode="pad")
    assert out.shape == (100, 100)
    np.testing.assert_array_equal(out[:24], 0.0)
    np.testing.assert_array_equal(out[76:], 0.0)
    np.testing.assert_array_equal(out[26:74], 1.0)
    tall = resize(np.ones((100, 50), dtype=np.float32), 100, mode="pad")
    np.testing.assert_array_equal(tall, out.T)
    same = resize(img, 100)  # stretch fills everything
    np.testing.assert_allclose(same, 1.0)


def test_resize_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        resize(np.zeros((4, 4), np.float32), 2, mode="crop")
    with pytest.raises(ValueError, match="positive"):
        resize(np.zeros((4, 4), np.float32), 0)


# ------------------------------------------------------------------------------------------------
# real data (skips when ../shared/data is absent)
# ------------------------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_real_nih_png_decodes() -> None:
    folder = SHARED_DATA / "nih-cxr14-sample" / "images"
    if not folder.is_dir():
        pytest.skip("shared data not available")
    paths = sorted(folder.glob("*.png"))[:5]
    for path in paths:
        out = load_image(path)
        assert out.shape == (256, 256) and out.dtype == np.float32
        assert 0.0 <= out.min() < out.max() <= 1.0
        ref = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
        np.testing.assert_allclose(out, ref, atol=1 / 255 + 1e-6)


def test_png_cut_inside_header(tmp_path: Path) -> None:
    path = write_png(tmp_path / "h.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    data = path.read_bytes()
    path.write_bytes(data[:10])
    assert _reason(path) == "truncated file (unreadable PNG header)"
    path.write_bytes(data[:20])
    assert _reason(path).startswith("truncated file")


def test_dicom_with_png_name_still_loads(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "really_dicom.png", GRID12, bits_stored=12)
    np.testing.assert_array_equal(load_image(path), (GRID12 / 4095.0).astype(np.float32))
