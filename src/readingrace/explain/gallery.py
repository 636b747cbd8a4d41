"""Grad-CAM galleries (experiment C3): PNG grids of images with heatmap overlays.

Titles name an image by its cache index (never a patient or image id from the source data).
Drawing uses matplotlib's Agg canvas directly (no pyplot state, safe in worker processes).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from readingrace.errors import ReadingRaceError
from readingrace.explain.gradcam import GradCAMExplainer
from readingrace.imaging.perturb import hot_box

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["gallery", "gallery_figure", "gradcam_galleries", "select_cases"]


def _as_array(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ReadingRaceError(f"gallery: {what} must have shape (N, H, W) or (N, 1, H, W), got {arr.shape}")
    return arr.astype(np.float32, copy=False)


#: Tile captions: font size (points), the height of one line (inches) and the characters per line that fit
#: a 2.4-inch tile; a longer line is wrapped, never drawn over its neighbours.
CAPTION_FONTSIZE = 7
CAPTION_LINE_IN = 0.15
CAPTION_CHARS = 40


def _wrap_caption(title: str) -> str:
    """A tile caption with each of its lines wrapped to :data:`CAPTION_CHARS`."""
    return "\n".join(part for line in title.split("\n")
                     for part in (textwrap.wrap(line, CAPTION_CHARS, break_on_hyphens=False) or [""]))


def gallery_figure(
    images: np.ndarray | torch.Tensor,
    heatmaps: np.ndarray | torch.Tensor | None,
    titles: Sequence[str],
    *,
    ncols: int = 6,
    alpha: float = 0.4,
    cmap: str = "jet",
    suptitle: str | None = None,
    dpi: int = 100,
    boxes: np.ndarray | torch.Tensor | None = None,
    outlines: np.ndarray | torch.Tensor | None = None,
) -> Figure:
    """The matplotlib Figure that :func:`gallery` saves (one axis per image, in order).

    ``boxes`` (N, 4) ``(y0, y1, x0, x1)``, end-exclusive pixel rows and columns as in
    :func:`~readingrace.imaging.perturb.hot_box`, are drawn as white rectangles along the pixel
    edges; an empty box (zero area) draws nothing. ``outlines`` (N, H, W) bool masks are drawn as
    red contours. Titles are the tiles' captions: a line wider than a tile is wrapped, and every row of
    tiles leaves room for the longest caption, so captions never cover a neighbouring image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    imgs = _as_array(images, "images")
    heats = None if heatmaps is None else _as_array(heatmaps, "heatmaps")
    n = len(imgs)
    if n == 0:
        raise ReadingRaceError("gallery: no images to draw")
    if heats is not None and heats.shape != imgs.shape:
        raise ReadingRaceError(f"gallery: heatmaps {heats.shape} do not match images {imgs.shape}; "
                               "compute the heat at the image size")
    box_arr = None
    if boxes is not None:
        box_arr = (boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)).astype(int)
        if box_arr.shape != (n, 4):
            raise ReadingRaceError(f"gallery: boxes must have shape ({n}, 4) (y0, y1, x0, x1), got {box_arr.shape}")
    masks = None
    if outlines is not None:
        masks = _as_array(outlines, "outlines") > 0.5
        if masks.shape != imgs.shape:
            raise ReadingRaceError(f"gallery: outlines {masks.shape} do not match images {imgs.shape}")
    if len(titles) != n:
        raise ReadingRaceError(f"gallery: {len(titles)} titles for {n} images")
    if ncols < 1:
        raise ReadingRaceError(f"gallery: ncols must be >= 1, got {ncols}")
    cols = min(ncols, n)
    rows = -(-n // cols)
    captions = [_wrap_caption(str(t)) for t in titles]
    n_lines = max(c.count("\n") + 1 for c in captions)  # each row keeps room for the longest caption
    row_in = 2.45 + CAPTION_LINE_IN * n_lines
    fig = Figure(figsize=(2.4 * cols, row_in * rows + (0.4 if suptitle else 0)), dpi=dpi)
    FigureCanvasAgg(fig)
    for k in range(rows * cols):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(imgs[k], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if heats is not None:
            ax.imshow(heats[k], cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha, interpolation="bilinear")
        if masks is not None and masks[k].any() and not masks[k].all():
            ax.contour(masks[k].astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
        if box_arr is not None:
            y0, y1, x0, x1 = (int(v) for v in box_arr[k])
            if y1 > y0 and x1 > x0:  # pixel i spans [i - 0.5, i + 0.5] in imshow's coordinates
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white",
                                       linewidth=1.2, gid="hot_box"))
        ax.set_title(captions[k], fontsize=CAPTION_FONTSIZE)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def gallery(
    images: np.ndarray | torch.Tensor,
    heatmaps: np.ndarray | torch.Tensor | None,
    titles: Sequence[str],
    path: str | Path,
    *,
    ncols: int = 6,
    alpha: float = 0.4,
    cmap: str = "jet",
    suptitle: str | None = None,
    dpi: int = 100,
    boxes: np.ndarray | torch.Tensor | None = None,
    outlines: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write a PNG grid of (N, H, W) images in [0, 1], each overlaid with its heatmap in [0, 1].

    ``heatmaps=None`` draws the images alone; ``boxes`` and ``outlines`` as in :func:`gallery_figure`.
    Returns the written path.
    """
    try:
        fig = gallery_figure(images, heatmaps, titles, ncols=ncols, alpha=alpha, cmap=cmap, suptitle=suptitle,
                             dpi=dpi, boxes=boxes, outlines=outlines)
    except ReadingRaceError as exc:
        raise ReadingRaceError(f"{exc} ({path})") from None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def select_cases(pred_table: pd.DataFrame, classes: Sequence[str], *, per_group: int = 6
                 ) -> dict[tuple[str, str], pd.DataFrame]:
    """Rows per (true class, ``correct`` / ``wrong``), most confident prediction first, at most ``per_group``.

    Adds ``predicted`` and ``confidence`` (the predicted class's probability) columns.
    """
    cols = [f"prob_{c}" for c in classes]
    missing = [c for c in ["label", *cols] if c not in pred_table.columns]
    if missing:
        raise ReadingRaceError(f"gradcam_galleries: the predictions table lacks column(s) {missing}")
    probs = pred_table[cols].to_numpy(dtype=float)
    table = pred_table.assign(predicted=np.asarray(classes, dtype=object)[probs.argmax(1)],
                              confidence=probs.max(1))
    table["label"] = table["label"].astype(str)
    out: dict[tuple[str, str], pd.DataFrame] = {}
    for c in classes:
        rows = table[table["label"] == str(c)]
        for outcome, keep in (("correct", rows["predicted"] == str(c)), ("wrong", rows["predicted"] != str(c))):
            chosen = rows[keep].sort_values("confidence", ascending=False, kind="stable").head(per_group)
            out[(str(c), outcome)] = chosen
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "class"


def gradcam_galleries(
    model: nn.Module,
    images: np.ndarray,
    pred_table: pd.DataFrame,
    classes: Sequence[str],
    out_dir: str | Path,
    *,
    per_group: int = 6,
    index: Sequence[int] | np.ndarray | None = None,
    layer: str | None = None,
    ncols: int = 6,
    box_threshold: float | None = None,
) -> list[Path]:
    """One Grad-CAM gallery PNG per class and outcome (correct / wrong); returns the files written.

    ``images`` is the (N, S, S) cache in [0, 1] at the model's input size; ``pred_table`` has
    ``label`` and ``prob_<class>`` columns and, unless ``index`` gives the rows' cache positions, a
    ``cache_index`` column (merge it from ``cohort.csv`` by ``image_id``). Each gallery shows up to
    ``per_group`` images of one true class, the most confident predictions first, with the
    Grad-CAM of the predicted class; titles give the cache index, true and predicted class and the
    confidence. A group with no image writes no file. With ``box_threshold`` (e.g. the run's
    ``evaluate.occlusion_threshold``) each image also shows the hot box that the occlusion test
    blanks: the bounding rectangle of heat >= ``box_threshold``
    (:func:`~readingrace.imaging.perturb.hot_box` of the same heat).
    """
    classes = [str(c) for c in classes]
    if index is None:
        if "cache_index" not in pred_table.columns:
            raise ReadingRaceError("gradcam_galleries: pass index= (cache positions of the table's rows) or add "
                                   "a cache_index column (from cohort.csv, merged by image_id)")
        positions = pred_table["cache_index"].to_numpy()
    else:
        positions = np.asarray(index)
        if len(positions) != len(pred_table):
            raise ReadingRaceError(f"gradcam_galleries: index has {len(positions)} entries for "
                                   f"{len(pred_table)} table rows")
    table = pred_table.reset_index(drop=True).assign(_pos=positions.astype(np.int64))
    groups = select_cases(table, classes, per_group=per_group)
    explain = GradCAMExplainer(model, layer)
    out_dir = Path(out_dir)
    written: list[Path] = []
    for (cls, outcome), rows in groups.items():
        if rows.empty:
            continue
        pos = rows["_pos"].to_numpy()
        x = torch.from_numpy(np.asarray(images[pos], dtype=np.float32)).unsqueeze(1)
        target = torch.as_tensor([classes.index(p) for p in rows["predicted"]])
        heat, _ = explain(x, target, pos)
        boxes = None
        if box_threshold is not None:
            boxes = hot_box(heat.cpu(), threshold=box_threshold, image_size=tuple(heat.shape[-2:]))
        titles = [f"#{p} true {cls} / pred {pr} ({conf:.2f})"
                  for p, pr, conf in zip(pos, rows["predicted"], rows["confidence"], strict=True)]
        path = out_dir / f"gradcam_{_slug(cls)}_{outcome}.png"
        note = "" if box_threshold is None else f"; box: heat >= {box_threshold:g}"
        gallery(x[:, 0], heat, titles, path, ncols=ncols, boxes=boxes,
                suptitle=f"true {cls}, {outcome} predictions (Grad-CAM of the predicted class{note})")
        written.append(path)
    return written
