"""Figures of the paper's grids from the tidy results table (matplotlib, Agg); each AUC with its CI.

* :func:`plot_cutoff` - AUC vs Fourier cut-off for low- and high-pass, one line per class (Figure 6);
* :func:`plot_resolution` - AUC vs image resolution (Figure 7);
* :func:`plot_cell_maps` - 3x3 maps of AUC for drop-one and keep-one cells (Tables 7 and 8);
* :func:`plot_band_maps` - d1 x d2 maps for band-pass and notch (Supplemental Tables 7 and 8);
* :func:`plot_slice_position` - CT AUC by slice decile from one run's strata metrics (slice-wise results);
* :func:`plot_flow` - the exclusion flow (CONSORT figure) from a manifest's flow table.
* :func:`plot_external_matrix` - trained-on x tested-on heatmap of macro AUC with CIs and n (Table 4).

A grid with points missing (other shards not run, runs skipped or failed) says so under its panel title
(``notes``: "incomplete: 3 of 5 points, 2 not run yet").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_panel(ax, part: pd.DataFrame, x: str, *, title: str, xlabel: str, log: bool) -> None:
    colours = _plt().rcParams["axes.prop_cycle"].by_key()["color"]
    classes = sorted(c for c in part["class"].unique() if c != "macro")
    # two classes: both one-vs-rest AUCs equal the macro AUC (one line, as the tables show one column)
    lines = [("macro", f"{classes[0]} vs {classes[1]}")] if len(classes) == 2 else \
        [(c, c) for c in classes] + [("macro", "macro")]
    for k, (cls, name) in enumerate(lines):
        d = part[part["class"] == cls].sort_values(x)
        if d.empty:
            continue
        xs = d[x].astype(float).to_numpy()
        y = d["auc"].astype(float).to_numpy()
        lo = d["ci_lo"].astype(float).to_numpy()
        hi = d["ci_hi"].astype(float).to_numpy()
        style = {"color": "black", "lw": 2} if cls == "macro" else {"color": colours[k % len(colours)]}
        ax.plot(xs, y, marker="o", ms=3, label=name, **style)
        ax.fill_between(xs, lo, hi, alpha=0.15, color=style["color"])
    ref = part[(part["class"] == "macro")].sort_values(x) if "ref_auc" in part else part.iloc[:0]
    ref = ref[ref["ref_auc"].notna()] if len(ref) else ref
    if len(ref):  # what coarse intensity and shape give on the same perturbed images
        ax.plot(ref[x].astype(float), ref["ref_auc"].astype(float), color="grey", ls="--", marker="s", ms=2.5,
                lw=1, label="reference (32x32 thumbnails), macro")
    ax.axhline(0.5, color="grey", ls=":", lw=0.8)
    if log:  # ticks at the grid's own values, in plain numbers (not 3x10^1 minor labels that collide)
        ax.set_xscale("log")
        ticks = sorted(part[x].astype(float).unique())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7, rotation=45)
        ax.minorticks_off()
    ax.set(title=title, xlabel=xlabel, ylabel="AUC (95% CI band)", ylim=(0.3, 1.02))
    ax.legend(fontsize=7, loc="lower right")


def _titled(title: str, id_: str, notes: Mapping[str, str] | None) -> str:
    """A panel title with its grid's note under it ("incomplete: 3 of 5 points"), if any."""
    note = (notes or {}).get(id_, "")
    return f"{title}\n{note}" if note else title


def plot_cutoff(tidy: pd.DataFrame, path: Path, *, notes: Mapping[str, str] | None = None) -> bool:
    """Figure 6: AUC vs cut-off ``d`` for C1-lowpass and C1-highpass (one panel each); ``notes`` (id -> text,
    e.g. "incomplete: 3 of 5 points") go under a panel's title."""
    ids = [i for i in ("C1-lowpass", "C1-highpass") if (tidy["id"] == i).any()]
    if not ids:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(ids), figsize=(5.2 * len(ids), 4), dpi=100, squeeze=False)
    for ax, id_ in zip(axes[0], ids):
        part = tidy[(tidy["id"] == id_) & (tidy["test_perturbation"] == "") & tidy["d"].notna()]
        kind = "low-pass (keep r < d)" if id_ == "C1-lowpass" else "high-pass (keep r >= d)"
        _line_panel(ax, part, "d", title=_titled(kind, id_, notes), xlabel="cut-off d (pixels at 224 px)", log=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_resolution(tidy: pd.DataFrame, path: Path, *, notes: Mapping[str, str] | None = None) -> bool:
    """Figure 7: AUC vs resolution (C2-resolution); ``notes`` as in :func:`plot_cutoff`."""
    part = tidy[(tidy["id"] == "C2-resolution") & (tidy["test_perturbation"] == "") & tidy["resolution"].notna()]
    if part.empty:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    _line_panel(ax, part, "resolution", title=_titled("AUC vs resolution", "C2-resolution", notes),
                xlabel="resolution (pixels per side)", log=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _matrix_panel(ax, values: np.ndarray, text: list[list[str]], *, title: str, xt: list, yt: list,
                  xlabel: str, ylabel: str):
    im = ax.imshow(values, vmin=0.5, vmax=1.0, cmap="viridis")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if text[i][j]:
                v = values[i, j]
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7,
                        color="white" if not np.isnan(v) and v < 0.8 else "black")
    ax.set_xticks(range(len(xt)), [str(x) for x in xt])
    ax.set_yticks(range(len(yt)), [str(y) for y in yt])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return im


def plot_cell_maps(tidy: pd.DataFrame, path: Path, *, cls: str = "macro", notes: Mapping[str, str] | None = None
                   ) -> bool:
    """Tables 7 and 8 as 3x3 maps: AUC (and CI) per dropped / kept cell; ``notes`` as in :func:`plot_cutoff`."""
    ids = [i for i in ("C4-drop", "C4-keep") if (tidy["id"] == i).any()]
    if not ids:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(ids), figsize=(4.8 * len(ids), 4.4), dpi=100, squeeze=False)
    im = None
    for ax, id_ in zip(axes[0], ids):
        part = tidy[(tidy["id"] == id_) & (tidy["class"] == cls) & (tidy["test_perturbation"] == "")]
        vals = np.full((3, 3), np.nan)
        text = [["" for _ in range(3)] for _ in range(3)]
        for _, r in part.iterrows():
            i, j = int(r["row"]), int(r["col"])
            vals[i, j] = r["auc"]
            ci = f"\n[{r['ci_lo']:.2f}, {r['ci_hi']:.2f}]" if pd.notna(r["ci_lo"]) else ""
            text[i][j] = f"{r['auc']:.2f}{ci}"
        what = "cell zeroed" if id_ == "C4-drop" else "only cell kept"
        im = _matrix_panel(ax, vals, text, title=_titled(f"{id_}: {what} ({cls} AUC)", id_, notes),
                           xt=[0, 1, 2], yt=[0, 1, 2], xlabel="column", ylabel="row")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="AUC")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_band_maps(tidy: pd.DataFrame, path: Path, *, cls: str = "macro", notes: Mapping[str, str] | None = None
                   ) -> bool:
    """Supplemental Tables 7 and 8 as d1 x d2 maps of AUC for band-pass and notch; ``notes`` as in
    :func:`plot_cutoff`."""
    ids = [i for i in ("C1-bandpass", "C1-notch") if (tidy["id"] == i).any()]
    if not ids:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(ids), figsize=(5 * len(ids), 4.4), dpi=100, squeeze=False)
    im = None
    for ax, id_ in zip(axes[0], ids):
        part = tidy[(tidy["id"] == id_) & (tidy["class"] == cls) & (tidy["test_perturbation"] == "")]
        d1s = sorted(part["d1"].dropna().astype(int).unique())
        d2s = sorted(part["d2"].dropna().astype(int).unique())
        vals = np.full((len(d1s), len(d2s)), np.nan)
        text = [["" for _ in d2s] for _ in d1s]
        for _, r in part.iterrows():
            i, j = d1s.index(int(r["d1"])), d2s.index(int(r["d2"]))
            vals[i, j] = r["auc"]
            text[i][j] = f"{r['auc']:.2f}"
        im = _matrix_panel(ax, vals, text, title=_titled(f"{id_} ({cls} AUC)", id_, notes), xt=d2s, yt=d1s,
                           xlabel="d2", ylabel="d1")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="AUC")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


SLICE_STRATUM = "slice_decile"


def slice_position_table(metrics: dict, *, stratum: str = SLICE_STRATUM) -> pd.DataFrame:
    """AUC with its CI per slice decile and class (+ ``macro``) from a run's ``metrics["strata"][stratum]``.

    Columns ``decile, class, auc, ci_lo, ci_hi, n_images``, sorted by decile; empty when the run was not
    evaluated by that stratum. A decile with one class has no AUC (NaN).
    """
    levels = (metrics.get("strata") or {}).get(stratum) or {}
    rows = []
    for level, block in levels.items():
        try:
            decile = int(float(level))
        except ValueError:
            continue
        entries = [(c, pc.get("auc"), pc.get("auc_ci")) for c, pc in (block.get("per_class") or {}).items()]
        entries.append(("macro", block.get("macro_auc"), block.get("macro_auc_ci")))
        for cls, auc, ci in entries:
            lo, hi = ci if ci and len(ci) == 2 else (None, None)
            rows.append({"decile": decile, "class": str(cls), "auc": auc, "ci_lo": lo, "ci_hi": hi,
                         "n_images": block.get("n_images")})
    out = pd.DataFrame(rows, columns=["decile", "class", "auc", "ci_lo", "ci_hi", "n_images"])
    for c in ("auc", "ci_lo", "ci_hi"):
        out[c] = pd.to_numeric(out[c], errors="coerce")
    return out.sort_values(["decile", "class"], kind="stable").reset_index(drop=True)


def plot_slice_position(metrics: dict, path: Path, *, title: str = "", stratum: str = SLICE_STRATUM) -> bool:
    """The paper's CT "slice-wise results": AUC per class and macro against slice decile, 95% CI bars.

    Decile 0 is the most inferior tenth of each series (:mod:`readingrace.cohort.sources.ct`). Returns
    False (nothing written) when the run has no ``stratum`` metrics.
    """
    table = slice_position_table(metrics, stratum=stratum)
    if table.empty or table["auc"].notna().sum() == 0:
        return False
    plt = _plt()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    classes = sorted(c for c in table["class"].unique() if c != "macro") + ["macro"]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    width = 0.5 / max(len(classes), 1)
    for k, cls in enumerate(classes):
        d = table[table["class"] == cls]
        x = d["decile"].to_numpy(float) + (k - (len(classes) - 1) / 2) * width  # side by side, not on top
        y = d["auc"].to_numpy(float)
        err = np.vstack([y - d["ci_lo"].to_numpy(float), d["ci_hi"].to_numpy(float) - y])
        style = {"color": "black", "lw": 2} if cls == "macro" else {"color": colours[k % len(colours)], "lw": 1}
        ax.errorbar(x, y, yerr=np.where(np.isnan(err), 0.0, err), marker="o", ms=3, capsize=2, label=cls, **style)
    ax.axhline(0.5, color="grey", ls=":", lw=0.8)
    ax.set_xticks(range(10))
    ax.set(title=title or "AUC by slice position", xlabel="slice decile (0 = most inferior, 9 = most superior)",
           ylabel="AUC (95% CI)", ylim=(0.0, 1.02), xlim=(-0.6, 9.6))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def flow_steps(flow: pd.DataFrame) -> tuple[tuple[int, int], pd.DataFrame, list[str]]:
    """A manifest's flow table as the CONSORT figure draws it: the starting (images, patients), the steps
    that removed something, and the names of the steps that removed nothing."""
    flow = flow.reset_index(drop=True)
    if len(flow) and int(flow.loc[0, "images_before"]) == 0:  # a "read the metadata" step starts the flow
        start = flow.loc[0, ["images_after", "patients_after"]].tolist()
        flow = flow.iloc[1:].copy()
        if len(flow):
            flow.iloc[0, flow.columns.get_loc("images_before")] = start[0]
            flow.iloc[0, flow.columns.get_loc("patients_before")] = start[1]
    if flow.empty:
        return (0, 0), flow, []
    first = (int(flow.iloc[0]["images_before"]), int(flow.iloc[0]["patients_before"]))
    removed_any = (flow["images_before"].astype(int) != flow["images_after"].astype(int)) | (
        flow["patients_before"].astype(int) != flow["patients_after"].astype(int))
    return first, flow[removed_any], [str(s) for s in flow.loc[~removed_any, "step"]]


def plot_flow(flow: pd.DataFrame, path: Path, *, title: str = "") -> bool:
    """CONSORT-style flow: one box per step that removed images (images and patients remaining), the
    exclusion at the side; steps that removed nothing are listed in one line under the last box."""
    (n_images, n_patients), flow, kept_all = flow_steps(flow)
    if not n_images and flow.empty:
        return False
    plt = _plt()
    n = len(flow)
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.9 * (n + 1) + (0.5 if kept_all else 0)), dpi=100)
    ax.set_axis_off()
    ax.set_xlim(0, 10)
    ax.set_ylim(-(n + 0.5 + (0.6 if kept_all else 0)), 1)
    box = {"boxstyle": "round", "fc": "#eef3fb", "ec": "#2b5b9b"}
    ax.text(3, 0.3, f"{n_images:,} images ({n_patients:,} patients)",
            ha="center", va="center", bbox=box, fontsize=8)
    for k, (_, s) in enumerate(flow.iterrows(), 1):
        y = -k + 0.3
        ax.annotate("", xy=(3, y + 0.25), xytext=(3, y + 0.75), arrowprops={"arrowstyle": "->"})
        ax.text(3, y, f"{int(s['images_after']):,} images ({int(s['patients_after']):,} patients)", ha="center",
                va="center", bbox=box, fontsize=8)
        images = int(s["images_before"]) - int(s["images_after"])
        patients = int(s["patients_before"]) - int(s["patients_after"])
        ax.text(6.0, y + 0.5, f"excluded by '{s['step']}':\n{images:,} images ({patients:,} patients)", ha="left",
                va="center", fontsize=7, bbox={"boxstyle": "round", "fc": "#fff4e5", "ec": "#b36b00"})
    if kept_all:
        ax.text(0.2, -(n + 0.4), "no exclusions by: " + "; ".join(f"'{k}'" for k in kept_all), ha="left", va="center", fontsize=7,
                wrap=True, color="#444444")
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_external_matrix(cells: list[dict], path: Path) -> bool:
    """Table 4 as a heatmap: rows trained on, columns tested on, macro AUC with its CI and n (test images) in
    each cell; the diagonal (each run's own internal test) outlined and marked "internal", as is a cell whose
    test images are all the row model's internal test images ("internal test of ROW")."""
    from readingrace.experiments.external import matrix_order
    from readingrace.experiments.external import only_internal_test

    if not cells:
        return False
    rows, cols = matrix_order(cells)
    vals = np.full((len(rows), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in rows]
    for c in cells:
        i, j = rows.index(c["trained_on"]), cols.index(c["tested_on"])
        if c.get("status") == "done" and c.get("macro_auc") is not None:
            vals[i, j] = float(c["macro_auc"])
            lo, hi = (list(c.get("macro_auc_ci") or [None, None]) + [None, None])[:2]
            ci = f"\n[{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
            text[i][j] = (f"{c['macro_auc']:.2f}{ci}" + ("\ninternal" if c.get("internal") else "")
                          + (f"\ninternal test of {c['trained_on']}" if only_internal_test(c) else "")
                          + (f"\nn = {c['n_images']}" if c.get("n_images") is not None else "")
                          + (f"\n{c['seen_left_out']} seen left out" if c.get("seen_left_out") else ""))
        else:
            text[i][j] = "n/a" + ("" if c.get("status") == "done" else f"\n({c.get('status')})")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(cols), 1.2 + 1.1 * len(rows)), dpi=100)
    im = _matrix_panel(ax, vals, text, title="External validation: macro AUC [95% CI]", xt=cols, yt=rows,
                       xlabel="tested on", ylabel="trained on")
    for c in cells:
        if c.get("internal") or only_internal_test(c):
            i, j = rows.index(c["trained_on"]), cols.index(c["tested_on"])
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2, ls="--"))
    fig.colorbar(im, ax=ax, shrink=0.8, label="macro AUC (colours clipped to 0.5-1)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def family_figures(tidy: pd.DataFrame, out: Path, *, notes: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Every grid figure the results allow, written into ``out``; returns {name: path}. ``notes`` (experiment
    id -> "incomplete: k of n points") go under the panel titles of the grids they name."""
    out = Path(out)
    made: dict[str, Path] = {}
    for name, fn in (("C1-cutoff", plot_cutoff), ("C1-band", plot_band_maps), ("C2-resolution", plot_resolution),
                     ("C4-cells", plot_cell_maps)):
        path = out / f"{name}.png"
        if fn(tidy, path, notes=notes):
            made[name] = path
    return made
