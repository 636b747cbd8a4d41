"""Decode PNG / JPEG / DICOM files to float32 (H, W) arrays in [0, 1], and resize them.

Rules (SPEC "Image handling"):

* PNG: 8-bit / 255, 16-bit / 65535 (a declared ``bit_depth`` such as 12 overrides: / (2**12 - 1),
  clipped); palette, RGB and RGBA images become ITU-R 601 luminance (alpha ignored). Pillow's
  clipping ``convert("L")`` is never applied to 16-bit data.
* JPEG: / 255 after the EXIF orientation is applied.
* DICOM (recognised by its ``DICM`` preamble or a ``.dcm`` / ``.dicom`` extension): modality LUT
  (rescale slope / intercept in float), then the VOI LUT or window (the first unless
  ``window_index`` says otherwise), then scaled to [0, 1] by the window bounds (by the stored bit
  range when there is no window), then MONOCHROME1 is inverted.

Anything that cannot be decoded, and a constant image, raises :class:`ImageReadError` with a short
reason that callers record as a skip. This module does not import torch, so decoding worker
processes start quickly.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from readingrace.errors import ImageReadError

__all__ = ["load_image", "read_dicom", "image_shape", "resize", "is_dicom", "LUMA_601"]

#: ITU-R BT.601 luma weights for R, G, B.
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)

_DICOM_SUFFIXES = {".dcm", ".dicom"}
_PILLOW_SUFFIXES = {".png", ".jpg", ".jpeg"}
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_DECODER_HINT = (
    "install a decoder plugin (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, "
    "or python-gdcm) or convert the files to an uncompressed transfer syntax"
)

PathLike = str | os.PathLike[str]


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def load_image(
    path: PathLike,
    *,
    bit_depth: int | None = None,
    window_index: int = 0,
    frame: int | None = None,
) -> np.ndarray:
    """Decode one image file to a float32 array of shape (H, W) with values in [0, 1].

    ``bit_depth`` overrides the container depth of single-channel PNG / JPEG files (e.g. 12 for
    12-bit data stored in 16-bit PNGs); DICOM files use their own header. ``window_index`` selects
    the DICOM window / VOI LUT; ``frame`` selects a frame of a multi-frame DICOM.
    Raises :class:`ImageReadError` when the file cannot be decoded or is constant.
    """
    if bit_depth is not None and not (isinstance(bit_depth, int) and 1 <= bit_depth <= 16):
        raise ImageReadError(path, f"bit_depth must be an integer from 1 to 16, got {bit_depth!r}")
    p = _check_file(path)
    # known Pillow suffixes skip the preamble read; a mislabelled DICOM still loads via the fallback
    if p.suffix.lower() not in _PILLOW_SUFFIXES and is_dicom(p):
        image = _load_dicom(p, window_index=window_index, frame=frame)
    else:
        try:
            image = _load_pillow(p, bit_depth=bit_depth)
        except _NotAPillowImage:
            # a DICOM file without preamble or extension (raw implicit little endian)
            image = _try_headerless_dicom(p, window_index=window_index, frame=frame)
    return _finish(p, image)


def read_dicom(path: PathLike, *, frame: int | None = None) -> tuple[np.ndarray, Any]:
    """A DICOM's pixels after the modality LUT (e.g. Hounsfield units for CT), and its dataset.

    The array is float32 of shape (H, W) (RGB data is reduced to luminance); no window, scaling or
    MONOCHROME1 inversion is applied. Multi-frame files need ``frame``.
    """
    p = _check_file(path)
    ds = _read_dataset(p)
    return _modality_pixels(p, ds, frame=frame).astype(np.float32), ds


def image_shape(path: PathLike) -> tuple[int, int]:
    """Return (H, W) of an image without decoding its pixels (EXIF orientation included)."""
    p = _check_file(path)
    if is_dicom(p):
        ds = _read_dataset(p, stop_before_pixels=True)
        try:
            return int(ds.Rows), int(ds.Columns)
        except AttributeError:
            raise ImageReadError(p, "DICOM has no Rows/Columns") from None
    try:
        with Image.open(p) as im:
            w, h = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(p, f"not a readable image ({_short(exc)})") from None
    return (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)


def resize(image: np.ndarray, size: int | tuple[int, int], *, mode: str = "stretch") -> np.ndarray:
    """Anti-aliased bilinear resize of an (H, W) image to ``size`` (an int means square).

    ``mode="stretch"`` resizes directly; ``mode="pad"`` first pads the image with zeros, centred,
    to the target's aspect ratio (a square for an int size), so the anatomy keeps its proportions.
    The filter equals ``torch.nn.functional.interpolate(mode="bilinear", antialias=True,
    align_corners=False)`` (to ~1e-6). Returns float32 clipped to [0, 1].
    """
    if image.ndim != 2:
        raise ValueError(f"resize expects an (H, W) image, got shape {image.shape}")
    th, tw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    th, tw = int(th), int(tw)
    if th < 1 or tw < 1:
        raise ValueError(f"resize target must be positive, got {size!r}")
    if mode not in ("stretch", "pad"):
        raise ValueError(f"resize mode must be 'stretch' or 'pad', got {mode!r}")
    img = np.asarray(image, dtype=np.float32)
    if mode == "pad":
        img = _pad_to_aspect(img, th / tw)
    if img.shape != (th, tw):
        pil = Image.fromarray(np.ascontiguousarray(img))  # mode "F"
        img = np.asarray(pil.resize((tw, th), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(img, 0.0, 1.0)


def is_dicom(path: PathLike) -> bool:
    """True when the file has the DICOM ``DICM`` preamble or a .dcm / .dicom extension."""
    p = Path(path)
    if p.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# ------------------------------------------------------------------------------------------------
# common helpers
# ------------------------------------------------------------------------------------------------
class _NotAPillowImage(Exception):
    """Pillow does not recognise the file format (the file may still be a headerless DICOM)."""


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_file(path: PathLike) -> Path:
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageReadError(p, "file not found") from None
    except OSError as exc:
        raise ImageReadError(p, f"cannot access file ({_short(exc)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(p, "not a regular file")
    if st.st_size == 0:
        raise ImageReadError(p, "empty file (0 bytes)")
    return p


def _finish(path: Path, image: np.ndarray) -> np.ndarray:
    """Validate a decoded image: 2-D, finite, not constant; return float32 clipped to [0, 1]."""
    if image.ndim != 2 or image.size == 0:
        raise ImageReadError(path, f"decoded to an unexpected shape {image.shape}")
    image = image.astype(np.float32, copy=False)
    lo, hi = float(image.min()), float(image.max())  # NaN propagates through min / max
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageReadError(path, "decoded pixels contain NaN or infinity")
    if lo < 0.0 or hi > 1.0:
        image = np.clip(image, 0.0, 1.0)
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    if hi <= lo:
        raise ImageReadError(path, "constant image")
    return image


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luminance of an (..., 3+) array; channels past the third (alpha) are ignored."""
    rgb = rgb.astype(np.float64, copy=False)
    # explicit weighted sum (no BLAS call: safe in forked worker processes)
    return rgb[..., 0] * LUMA_601[0] + rgb[..., 1] * LUMA_601[1] + rgb[..., 2] * LUMA_601[2]


def _pad_to_aspect(img: np.ndarray, aspect: float) -> np.ndarray:
    """Zero-pad (centred) to height / width == ``aspect``."""
    h, w = img.shape
    if h / w > aspect:
        new_h, new_w = h, max(w, int(round(h / aspect)))
    else:
        new_h, new_w = max(h, int(round(w * aspect))), w
    if (new_h, new_w) == (h, w):
        return img
    top, left = (new_h - h) // 2, (new_w - w) // 2
    out = np.zeros((new_h, new_w), dtype=img.dtype)
    out[top : top + h, left : left + w] = img
    return out


# ------------------------------------------------------------------------------------------------
# PNG / JPEG (Pillow)
# ------------------------------------------------------------------------------------------------
def _load_pillow(path: Path, *, bit_depth: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                fmt = im.format or "image"
                if im.getexif().get(_EXIF_ORIENTATION, 1) not in (None, 1):
                    im = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        kind = _magic_kind(path)
        if kind is not None:
            raise ImageReadError(path, f"truncated file (unreadable {kind} header)") from None
        raise _NotAPillowImage() from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"image too large ({_short(exc)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = _short(exc)
        reason = "truncated file" if "truncat" in msg.lower() else "corrupt image"
        raise ImageReadError(path, f"{reason} ({msg})") from None
    return _pillow_to_float(path, im, fmt, bit_depth=bit_depth)


def _magic_kind(path: Path) -> str | None:
    """'PNG' / 'JPEG' when the file starts with that format's signature, else None."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    return None


def _pillow_to_float(path: Path, im: Image.Image, fmt: str, *, bit_depth: int | None) -> np.ndarray:
    mode = im.mode
    if mode in ("L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "1"):
        if mode == "LA":
            arr = np.asarray(im)[..., 0]
        elif mode == "1":
            arr = np.asarray(im, dtype=np.uint8)
        else:
            arr = np.asarray(im)
        native = {"L": 8, "LA": 8, "1": 1}.get(mode, 16)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageReadError(path, f"{fmt} mode 'I' values outside 0..65535; declare the data")
        depth = native if bit_depth is None else bit_depth
        if depth > native:
            raise ImageReadError(
                path, f"declared bit_depth {bit_depth} exceeds the file's {native}-bit depth"
            )
        scaled = np.divide(arr, np.float32(2**depth - 1), dtype=np.float32)
        return scaled if depth == native else np.minimum(scaled, np.float32(1.0))
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGBA" if mode == "PA" else "RGB")
        mode = im.mode
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        if bit_depth is not None and bit_depth != 8:
            raise ImageReadError(path, f"declared bit_depth {bit_depth} for an 8-bit {mode} image")
        return _luminance(np.asarray(im)) / 255.0
    raise ImageReadError(path, f"unsupported {fmt} pixel mode {mode!r}")


# ------------------------------------------------------------------------------------------------
# DICOM (pydicom)
# ------------------------------------------------------------------------------------------------
def _read_dataset(path: Path, *, stop_before_pixels: bool = False) -> Any:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd but readable headers
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # noqa: BLE001 - damaged headers raise many different types
        raise ImageReadError(path, f"unreadable DICOM ({_short(exc)})") from None
    return ds


def _try_headerless_dicom(path: Path, *, window_index: int, frame: int | None) -> np.ndarray:
    """Last resort for files Pillow does not know: accept them only if they parse with pixels."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        looks_dicom = "PixelData" in ds and "Rows" in ds and "Columns" in ds
    except Exception:  # noqa: BLE001 - any parse failure means "not an image"
        looks_dicom = False
    if not looks_dicom:
        raise ImageReadError(path, "not a recognised image format (PNG, JPEG or DICOM)")
    return _dicom_to_float(path, ds, window_index=window_index, frame=frame)


def _load_dicom(path: Path, *, window_index: int, frame: int | None) -> np.ndarray:
    return _dicom_to_float(path, _read_dataset(path), window_index=window_index, frame=frame)


def _ensure_transfer_syntax(path: Path, ds: Any) -> None:
    """Give a dataset without (0002,0010) the syntax it was read with, when that is knowable."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    elem = ds["PixelData"] if "PixelData" in ds else None
    if elem is not None and (
        elem.is_undefined_length or bytes(elem.value[:4] or b"") == b"\xfe\xff\x00\xe0"
    ):
        raise ImageReadError(
            path,
            "DICOM has compressed (encapsulated) pixel data but no transfer syntax: "
            "cannot tell which decoder to use",
        )
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is None:
        raise ImageReadError(path, "DICOM has no transfer syntax and its encoding is unknown")
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _decode_dicom_pixels(path: Path, ds: Any, *, frame: int | None) -> np.ndarray:
    """Decoded stored values of one frame: (H, W) or (H, W, samples)."""
    from pydicom.pixels import pixel_array

    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM has no pixel data")
    _ensure_transfer_syntax(path, ds)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 and frame is None:
        raise ImageReadError(
            path, f"multi-frame DICOM with {n_frames} frames: pass frame=<0..{n_frames - 1}>"
        )
    if frame is not None and not 0 <= frame < n_frames:
        raise ImageReadError(path, f"frame {frame} out of range: the file has {n_frames} frame(s)")
    tsyntax = ds.file_meta.TransferSyntaxUID
    if tsyntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            available = get_decoder(tsyntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ImageReadError(
                path,
                f"compressed transfer syntax {tsyntax.name} ({tsyntax}) needs a decoder: "
                + _DECODER_HINT,
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=frame if n_frames > 1 else None)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged data
        msg = _short(exc)
        low = msg.lower()
        if "less than expected" in low or "truncat" in low or "not enough" in low:
            raise ImageReadError(path, f"truncated DICOM pixel data ({msg})") from None
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({msg})") from None
    if arr.ndim == 3 and n_frames > 1 and int(ds.get("SamplesPerPixel", 1)) == 1:
        arr = arr[0]  # defensive: a (1, H, W) stack
    return arr


def _stored_range(ds: Any, arr: np.ndarray) -> tuple[float, float]:
    """Range of stored values implied by BitsStored / PixelRepresentation."""
    if np.issubdtype(arr.dtype, np.floating):
        return float(np.min(arr)), float(np.max(arr))
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or arr.dtype.itemsize * 8)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _is_color(ds: Any, arr: np.ndarray) -> bool:
    return int(ds.get("SamplesPerPixel", 1) or 1) > 1 or arr.ndim == 3


def _modality_pixels(path: Path, ds: Any, *, frame: int | None) -> np.ndarray:
    """Pixels after the modality LUT (float64); colour data reduced to luminance."""
    arr = _decode_dicom_pixels(path, ds, frame=frame)
    if _is_color(ds, arr):
        return _color_to_luminance(path, ds, arr)
    return _apply_modality(ds, arr)[0]


def _apply_modality(ds: Any, arr: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Modality LUT or rescale (float); also returns the output range of the stored bit range."""
    from pydicom.pixels import apply_modality_lut

    lo, hi = _stored_range(ds, arr)
    if ds.get("ModalityLUTSequence"):
        out = apply_modality_lut(arr, ds).astype(np.float64)
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return out, (0.0, float(2**bits - 1))
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    out = arr.astype(np.float64) * slope + intercept
    a, b = lo * slope + intercept, hi * slope + intercept
    return out, (min(a, b), max(a, b))


def _color_to_luminance(path: Path, ds: Any, arr: np.ndarray) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        return _luminance(arr) / float(2 ** (8 * arr.dtype.itemsize) - 1)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ImageReadError(path, f"unsupported DICOM colour layout {arr.shape} ({photometric})")
    return _luminance(arr)


def _window_values(ds: Any, index: int) -> tuple[float, float] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    from pydicom.multival import MultiValue

    centers, widths = ds["WindowCenter"].value, ds["WindowWidth"].value

    def pick(v: Any, what: str) -> float | None:
        vals = list(v) if isinstance(v, (MultiValue, list, tuple)) else [v]
        vals = [x for x in vals if x not in (None, "")]
        if not vals:
            return None
        if index >= len(vals):
            raise IndexError(f"window_index {index} but the file has {len(vals)} {what} value(s)")
        return float(vals[index])

    c, w = pick(centers, "WindowCenter"), pick(widths, "WindowWidth")
    return None if c is None or w is None else (c, w)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3 windowing with output range [0, 1]."""
    if function == "LINEAR":
        # y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped: equal to the standard's piecewise rule
        return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    # SIGMOID
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))


def _dicom_to_float(path: Path, ds: Any, *, window_index: int, frame: int | None) -> np.ndarray:
    arr = _decode_dicom_pixels(path, ds, frame=frame)
    if _is_color(ds, arr):
        lum = _color_to_luminance(path, ds, arr)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
            return lum
        lo, hi = _stored_range(ds, arr)
        return (lum - lo) / (hi - lo)

    x, (lo, hi) = _apply_modality(ds, arr)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()

    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        from pydicom.pixels import apply_voi

        if window_index >= len(voi_seq):
            raise ImageReadError(
                path, f"window_index {window_index} but the file has {len(voi_seq)} VOI LUT(s)"
            )
        # the LUT is indexed by (integer) modality output values
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = apply_voi(np.rint(x).astype(np.int64), ds, window_index).astype(np.float64)
        bits = int(voi_seq[window_index].LUTDescriptor[2])
        y /= float(2**bits - 1)
    else:
        try:
            window = _window_values(ds, window_index)
        except (IndexError, ValueError, TypeError) as exc:
            raise ImageReadError(path, f"bad DICOM window ({_short(exc)})") from None
        if window is not None:
            center, width = window
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
            if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
                raise ImageReadError(path, f"unsupported VOI LUT Function {function!r}")
            min_width = 1.0 if function == "LINEAR" else 0.0
            if width <= min_width:
                raise ImageReadError(
                    path, f"window width {width:g} too small for the {function} window"
                )
            y = _window(x, center, width, function)
        else:
            if hi <= lo:
                raise ImageReadError(path, "DICOM stored bit range is empty")
            y = (x - lo) / (hi - lo)
    y = np.clip(y, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        y = 1.0 - y
    return y
