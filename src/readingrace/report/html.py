"""The study report: one self-contained HTML page (figures embedded as data URIs) and a Markdown twin.

Built from run folders and/or suite folders (:mod:`readingrace.report.collect`); never trains.
Sections: cohort (Table 1, exclusion flow), one section per experiment family with the paper's
table layout (each AUC with its 95% CI, linked to its run folder) and figures, ROC and training
curves, Grad-CAM galleries when present, disease runs (per-finding AUCs, subgroup tables), methods
generated from the resolved configs, provenance. Patient identifiers never appear: the cohort is
summarised, never listed. A file in the report folder that readingrace did not write is never replaced.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import os
import re
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from readingrace.experiments.rundir import write_atomic
from readingrace.report.collect import (
    REPORT_HTML_MARK,
    REPORT_MD_MARK,
    STRATA_SUFFIX,
    TEST_TIME_SUFFIX,
    Collected,
    RunRecord,
    collect,
    experiment_tables,
    findings_text,
    install,
    per_finding_table,
    staging,
    write_collected,
)
from readingrace.report.markdown import (
    cohort_table,
    demographics_table,
    fmt,
    fmt_ci,
    md_table,
    metrics_table,
    skips_text,
)

FAMILIES = {
    "A": ("A: detecting the attribute from images across modalities", "Tables 3-5"),
    "B": ("B: confounders (BMI, density, disease, bone density, age and sex)", "Table 6, Supplemental Tables 9-13"),
    "C1": ("C1: frequency-domain filters", "Figure 6, Supplemental Tables 5-8"),
    "C2": ("C2: resolution and image quality", "Figure 7, Supplemental Tables 14-15"),
    "C3": ("C3: localisation (Grad-CAM)", "Supplemental Tables 16-18"),
    "C4": ("C4: 3x3 patches", "Tables 7 and 8"),
    "runs": ("Results", ""),  # runs outside the paper suite (readingrace run / disease / demo)
}
#: A run title longer than this (a config's description) is shown once, under the heading, not in it.
HEADING_TITLE_MAX = 80
#: What a grid table's point columns mean, by experiment id prefix (said under the table).
POINT_LEGENDS = {
    "C1": ("d, d1, d2: radii in pixels of the centred 2-D spectrum at the paper's reference size 224 (strict <); "
           "a run at another size uses the same cut-off in cycles per pixel (radius x size / 224)."),
    "C2-resolution": "resolution: pixels per side the images were downsampled to (anti-aliased) before training.",
    "C4": "row, col: the cell of the 3x3 grid (0, 0 = top left); drop = the cell set to 0, keep = only the cell, "
          "resized to the full image.",
}

FAMILY_FIGURES = {"C1": ["C1-cutoff", "C1-band"], "C2": ["C2-resolution"], "C4": ["C4-cells"]}
PACKAGES = ("readingrace", "torch", "monai", "lightning", "numpy", "pandas", "scikit-learn", "scipy", "statsmodels")
GALLERY_GLOBS = ("gradcam*.png", "gallery*.png", "explain/*.png", "gradcam/*.png")

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f2f4f8}img{max-width:100%;border:1px solid #ddd;margin:0.4em 0}code{background:#f4f4f4}
section{margin-top:2em}details{margin:0.5em 0}.note{color:#555;font-size:0.9em}"""


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(df: pd.DataFrame, links: dict[tuple[int, str], str] | None = None) -> str:
    links = links or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for i, row in enumerate(df.itertuples(index=False)):
        cells = []
        for c, v in zip(df.columns, row):
            text = html.escape("" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
            href = links.get((i, str(c)))
            cells.append(f'<td><a href="{html.escape(href)}">{text}</a></td>' if href else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


_MD_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _inline(text: str) -> str:
    """Escape, then render the `code` spans and [text](href) links of project-written Markdown."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if k % 2 else _MD_LINK.sub(r'<a href="\2">\1</a>', p)
                   for k, p in enumerate(parts))


def rebase_links(text: str, base: str) -> str:
    """Markdown written inside a run folder, with its relative links made relative to the report (``base``
    is the run folder as seen from the report); absolute links and anchors are kept."""
    def fix(m: re.Match) -> str:
        href = m.group(2)
        keep = href.startswith(("#", "/")) or re.match(r"[a-z][a-z0-9+.-]*:", href)
        return m.group(0) if keep else f"[{m.group(1)}]({base}/{href})"

    return _MD_LINK.sub(fix, text)


def markdown_blocks_html(text: str, *, heading: str = "h4") -> str:
    """HTML for the Markdown the project writes itself (``confounders.md``): headings, pipe tables as
    ``<table>``, bullet lists, paragraphs. Not a general Markdown renderer."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif line.startswith("# "):  # the document's title: a note under the report's own heading
            out.append(f"<p class='note'>{_inline(line[2:].strip())}</p>")
            i += 1
        elif line.startswith("#"):
            out.append(f"<{heading}>{_inline(line.lstrip('#').strip())}</{heading}>")
            i += 1
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            header, body = _md_cells(block[0]), [_md_cells(b) for b in block[1:]]
            body = [r for r in body if not all(set(c) <= set("-: ") for c in r)]  # the |---| rule
            width = len(header)
            body = [(r + [""] * width)[:width] for r in body]
            out.append(_html_table(pd.DataFrame(body, columns=header)))
        elif line.lstrip().startswith("- "):
            items = []
            while i < len(lines) and lines[i].lstrip().startswith("- "):
                items.append(f"<li>{_inline(lines[i].lstrip()[2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("#", "|", "- ")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


_MD_HEADING = re.compile(r"^(#{1,6})(\s.*)?$")


def _demote_markdown(text: str, levels: int = 2) -> str:
    """Headings of an embedded Markdown document moved ``levels`` down, to sit under the report's own; never
    below ``######`` (Markdown has six levels: a deeper one would render as text)."""
    def demote(line: str) -> str:
        m = _MD_HEADING.match(line)
        return "#" * min(len(m.group(1)) + levels, 6) + (m.group(2) or "") if m else line

    return "\n".join(demote(line) for line in text.splitlines())


def _slice_figure(r: RunRecord, out: Path) -> Path | None:
    """The run's AUC by slice position (CT, stratum ``slice_decile``) drawn into ``out``, if it has one."""
    from readingrace.report.figures import SLICE_STRATUM, plot_slice_position

    if SLICE_STRATUM not in (r.metrics.get("strata") or {}):
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{r.id}-{r.dataset}-{r.run_dir.name}")
    png = out / f"slice-position-{safe}.png"
    return png if plot_slice_position(r.metrics, png, title=f"{r.id} ({r.dataset}): AUC by slice position") else None


def _run_links(table: pd.DataFrame, tidy: pd.DataFrame, id_: str, out: Path) -> dict[tuple[int, str], str]:
    """(row, column) -> relative link to the run folder of that number: the run of ``id_`` whose values match the
    row's in every column the table shares with ``tidy`` (a test-time table: its test-time rows). A row that
    matches no run, or several, gets no link (never a wrong one)."""
    test_time = "test_perturbation" in table.columns
    part = tidy[(tidy["id"] == id_) & ((tidy["test_perturbation"] != "") if test_time
                                       else (tidy["test_perturbation"] == ""))]
    keys = [c for c in table.columns if c in part.columns and c != "class"]
    links = {}
    for i, row in table.reset_index(drop=True).iterrows():
        sel = part
        for k in keys:
            sel = sel[sel[k].map(_key) == _key(row[k])]
        if sel["run_dir"].nunique() != 1:
            continue
        run_dir = sel["run_dir"].iloc[0]
        rel = os.path.relpath(run_dir, out)
        target = f"{rel}/report.md" if (Path(run_dir) / "report.md").exists() else rel
        for c in table.columns:
            if c not in keys:
                links[(i, str(c))] = target
    return links


def point_order(point: dict[str, Any]) -> tuple:
    """Sort key of a grid point in the grid's own order: d = 1, 5, 10, ... (not 1, 10, 100, ...)."""
    parts = []
    for k, v in point.items():  # the grid's own key order (row before col)
        try:
            parts.append((k, 0, float(v), ""))
        except (TypeError, ValueError):
            parts.append((k, 1, 0.0, str(v)))
    return tuple(parts)


def _key(v: Any) -> str:
    """Compare grid values across tables: 2, 2.0 and "2" are the same point."""
    try:
        f = float(v)
        return str(int(f)) if f == int(f) else str(f)
    except (TypeError, ValueError, OverflowError):
        return str(v)


def _versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _commit() -> str:
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, check=False,
                             capture_output=True, text=True, timeout=10)
        return res.stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def methods_text(runs: list[RunRecord]) -> str:
    """A methods paragraph from the resolved configs (models, sizes, splits, seeds, software)."""
    if not runs:
        return "No finished runs."
    cfgs = [r.config for r in runs if r.config]
    pick = lambda f: sorted({str(f(c)) for c in cfgs})
    models = pick(lambda c: c["model"]["name"])
    sizes = [str(v) for v in sorted({c["image"]["size"] for c in cfgs})]
    ratios = [_per_run(cfgs, lambda c: c["split"]["ratios"])]
    seeds = [_per_run(cfgs, lambda c: ", ".join(str(s) for s in c["train"]["seeds"]))]
    epochs = [_per_run(cfgs, lambda c: c["train"]["max_epochs"])]
    boot = [_per_run(cfgs, lambda c: c["evaluate"]["n_bootstrap"])]
    weights = sorted({Path(c["model"]["weights"]).name if c["model"].get("weights") else "random initialisation"
                      for c in cfgs})
    aug = pick(lambda c: augmentation_text(c["train"]["augment"]))
    v = _versions()
    return (f"We trained {len(runs)} model(s) to predict {_trained_for(runs)} from images of {_datasets_text(runs)}. "
            f"Architectures: {', '.join(models)} ({', '.join(weights)}), input {', '.join(sizes)} px, "
            f"augmentation: {'; '.join(aug)}. Patients were split (by patient, stratified by the target) with ratios "
            f"{', '.join(ratios)} and split seed {_per_run(cfgs, lambda c: c['split']['seed'])}; training seed(s) "
            f"{', '.join(seeds)}; Adam (lr {_per_run(cfgs, lambda c: c['train']['lr'])}), at most {', '.join(epochs)} "
            f"epochs with early stopping on validation loss (patience "
            f"{_per_run(cfgs, lambda c: c['train']['early_stopping_patience'])}), the best checkpoint tested. "
            f"One-vs-rest ROC-AUC per class on the held-out test split with 95% confidence intervals by "
            f"patient-clustered bootstrap ({', '.join(boot)} replicates). "
            + (("Disease models: per-finding ROC-AUC, and per group the AUC, TPR, FPR and underdiagnosis rate at one "
                "threshold per finding chosen on the validation split, with patient-clustered bootstrap CIs and "
                "between-group differences. ") if any(r.kind == "disease" for r in runs) else "")
            + f"Software: readingrace {v['readingrace']}, "
            f"torch {v['torch']}, MONAI {v['monai']}, Lightning {v['lightning']}, scikit-learn {v['scikit-learn']}."
            + (" Beside each CNN, a reference model (logistic regression on 32x32 thumbnails of the images the CNN "
               "saw, perturbed where the run perturbs them; C chosen on the validation split) shows what coarse "
               "intensity and shape alone give."
               if any(c.get("evaluate", {}).get("reference") for c in cfgs) else ""))


def _per_run(cfgs: list[dict[str, Any]], value: Callable[[dict[str, Any]], Any]) -> str:
    """One setting across runs: "5" when all agree, else "5 (60 runs); 20 (2 runs)", most common first."""
    counts = Counter(str(value(c)) for c in cfgs)
    if len(counts) <= 1:
        return next(iter(counts), "?")
    return "; ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in counts.most_common())


def _trained_for(runs: list[RunRecord]) -> str:
    """What the models were trained to predict: "sex", or "sex (1 model) and the 14 findings and No Finding
    (1 disease model)"."""
    counts: dict[str, list[str]] = {}
    for r in runs:
        what = findings_text(r) if r.kind == "disease" else r.attribute
        if what:
            counts.setdefault(what, []).append(r.kind)
    if len(counts) <= 1:
        return next(iter(counts), "their target")
    return " and ".join(f"{what} ({len(kinds)} {'disease ' if kinds[0] == 'disease' else ''}model"
                        f"{'s' if len(kinds) > 1 else ''})" for what, kinds in sorted(counts.items()))


def _datasets_text(runs: list[RunRecord]) -> str:
    """The datasets, a generated one said as such: "nih, a generated cohort (synthetic)"."""
    def name(r: RunRecord) -> str:
        generated = ((r.config or {}).get("cohort") or {}).get("source") == "synthetic"
        return f"a generated cohort ({r.dataset})" if generated else r.dataset

    return ", ".join(sorted({name(r) for r in runs}))


def augmentation_text(aug: dict[str, Any]) -> str:
    """``{flip: true, rotate: 15, zoom: 0.1}`` -> "random horizontal flip, rotation ±15°, zoom ±10%"."""
    parts = (["random horizontal flip"] if aug.get("flip") else []) + \
        ([f"rotation ±{float(aug['rotate']):g}°"] if aug.get("rotate") else []) + \
        ([f"zoom ±{100 * float(aug['zoom']):g}%"] if aug.get("zoom") else [])
    return ", ".join(parts) or "none"


def _cohort_parts(runs: list[RunRecord], out: Path) -> list[tuple[str, str, str]]:
    """Per dataset and target (first run; a disease run's cohort apart): demographics table and exclusion flow
    figure (drawn into ``out``) -> (title, html, md)."""
    from readingrace.cohort.manifest import Manifest
    from readingrace.report.figures import plot_flow

    parts, seen, shown = [], set(), {}  # shown: the tables' content -> the heading they were shown under
    for r in runs:
        key = (r.dataset, r.attribute, r.kind)
        if key in seen or not (r.run_dir / "cohort.csv").is_file():
            continue
        seen.add(key)
        cohort = pd.read_csv(r.run_dir / "cohort.csv", low_memory=False, dtype={"patient_id": str})
        target = r.attribute if r.attribute in cohort else r.metrics.get("target") or \
            ((r.config or {}).get("cohort") or {}).get("target", "race")
        counts = cohort_table(cohort, target)  # counts only: identifiers are dropped right after
        cohort = cohort.drop(columns=[c for c in ("patient_id", "path", "image_id", "study_id") if c in cohort])
        demo = demographics_table(cohort, target)
        what = "Images (patients) per split and class:"
        head = f"{r.dataset} ({target})" if r.kind != "disease" else \
            f"{r.dataset} (disease model {r.id}; split stratified by {target})"
        man = Manifest.read(r.run_dir / "manifest.json") if (r.run_dir / "manifest.json").is_file() else None
        content = (counts.to_csv(), demo.to_csv(), man.flow_table().to_csv() if man else "")
        if content in shown:  # e.g. a disease model on the same images and split as a sex model
            note = f"The same images, split and exclusions as {shown[content]} above."
            parts.append((head, f"<h3>{html.escape(head)}</h3><p class='note'>{html.escape(note)}</p>",
                          f"### {head}\n\n{note}\n"))
            continue
        shown[content] = head
        h = [f"<h3>{html.escape(head)}</h3>", f"<p>{what}</p>", _html_table(counts)]
        m = [f"### {head}", "", what, "", md_table(counts), ""]
        if not demo.empty:
            h += ["<p>Table 1: characteristics by class (images, % of the class):</p>", _html_table(demo)]
            m += ["Table 1: characteristics by class (images, % of the class):", "", md_table(demo), ""]
        if man is not None:
            flow = man.flow_table()
            png = out / f"flow-{r.dataset}-{target}{'-disease' if r.kind == 'disease' else ''}.png"
            if plot_flow(flow, png, title=f"{r.dataset}: exclusion flow"):
                h.append(_img_tag(png, f"exclusion flow {r.dataset}"))
                m += [f"![exclusion flow]({png.name})", ""]
            if not flow.empty:
                cols = ["step", "images_before", "patients_before", "images_after", "patients_after", "detail"]
                h.append(_html_table(flow[cols]))
                m += [md_table(flow[cols]), ""]
            if man.skip_counts():
                text = skips_text(man)
                h.append(f"<p class='note'>{html.escape(text)}</p>")
                m += [text, ""]
        parts.append((head, "\n".join(h), "\n".join(m)))
    return parts


def _provenance(runs: list[RunRecord]) -> tuple[str, str]:
    from readingrace.cohort.manifest import Manifest

    inputs: dict[str, str] = {}
    for r in runs:
        if (r.run_dir / "manifest.json").is_file():
            for e in Manifest.read(r.run_dir / "manifest.json").inputs:
                if e.get("sha256") and len(inputs) < 50:
                    inputs[e["path"]] = e["sha256"]
    v = _versions()
    lines = [f"code commit: {_commit()}", *(f"{k}: {val}" for k, val in v.items()),
             *(f"input {k}: sha256 {val}" for k, val in sorted(inputs.items())),
             *(f"run {r.id} / {r.label}: fingerprint {r.config.get('fingerprint', '?')}" for r in runs[:200])]
    return "<pre>" + html.escape("\n".join(lines)) + "</pre>", "```\n" + "\n".join(lines) + "\n```"


def _run_figures(runs: list[RunRecord], out: Path, dest: Path) -> tuple[str, str]:
    """ROC and training curves (and Grad-CAM galleries) of each run, folded; links relative to ``out``, figures
    drawn into ``dest``."""
    h, m = [], []
    for r in runs:
        figs = [(r.run_dir / "roc.png", "ROC curves per class"), (r.run_dir / "curves.png", "training curves")]
        figs = [(p, a) for p, a in figs if p.is_file()]
        slice_png = _slice_figure(r, dest)
        if slice_png:
            figs.append((slice_png, "AUC by slice position"))
        if not figs:
            continue
        name = f"{r.id} {r.label} ({r.dataset})" if r.label != "baseline" else f"{r.id} ({r.dataset})"
        what = "ROC and training curves" + (", AUC by slice position" if slice_png else "")
        h.append(f"<details><summary>{html.escape(name)}: {what}</summary>"
                 + "".join(_img_tag(p, f"{a}: {name}") for p, a in figs) + "</details>")
        rel = os.path.relpath(r.run_dir, out)
        m.append(f"- {name}: " + ", ".join(
            f"[{a}]({p.name})" if p.parent == dest else f"[{a}]({rel}/{p.relative_to(r.run_dir)})" for p, a in figs))
    return "\n".join(h), "\n".join(m)


def write_report(inputs: list[str | Path], *, out: str | Path,
                 say: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ figures, tables) into ``out``; a file there
    that readingrace did not write (e.g. a user's own report.html) is never replaced (RunError). ``say`` is
    told when planned suite runs have no results yet."""
    out = Path(out)
    col: Collected = collect(list(inputs))
    if say and col.pending_note():
        say(col.pending_note())
    with staging(out) as dest:
        write_collected(col, dest / "tables")
        _write_report(col, [Path(p) for p in inputs], out=out, dest=dest)
        install(dest, out, what="readingrace report")
    return {"html": out / "report.html", "markdown": out / "report.md"}


def _write_report(col: Collected, inputs: list[Path], *, out: Path, dest: Path) -> None:
    """The report's files, written into ``dest``; links are relative to ``out``, where they will be installed."""
    tidy = col.tidy
    runs = sorted(col.runs, key=lambda r: (r.family, r.id, r.dataset, point_order(r.point)))
    roots = [p for p in inputs if p.is_dir()]
    tabular = [(e, root / e["run_dir"]) for e in col.index if e.get("kind") == "confounders"
               and e.get("status") == "done" for root in roots if (root / e["run_dir"] / "confounders.md").is_file()]
    families = sorted({r.family for r in runs} | {e.get("family", "B") for e, _ in tabular}
                      | ({"A"} if col.external else set()))
    tables = experiment_tables(tidy, col.runs) if not tidy.empty else {}
    n_done = f"{len(runs)} finished run(s)" + (f" and {len(tabular)} tabular analysis(es) (no images)" if tabular else "")
    H = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{REPORT_HTML_MARK}"
          f"<title>readingrace report</title><style>{CSS}</style></head><body>"),
         "<h1>readingrace report</h1>",
         (f"<p>{n_done}; every AUC is given with its 95% confidence interval and links to the "
         "run folder that produced it. Image galleries show pixels: burned-in annotations in the source images "
         "would show too.</p>")]
    M = [REPORT_MD_MARK.rstrip("\n"), "# readingrace report", "", f"{n_done}; every AUC with its 95% CI.", ""]
    pending = col.pending_note()
    if pending:  # another shard (or the rest of an interrupted suite) not run yet: the tables are partial
        H.append(f"<p class='note'><strong>{html.escape(pending)}</strong> See <a href='#not-run'>Not run</a>.</p>")
        M += [f"**{pending}** See Not run, skipped or failed.", ""]
    H.append("<section id='cohort'><h2>Cohort</h2>")
    M += ["## Cohort", ""]
    for _, h, m in _cohort_parts(runs, dest):
        H.append(h)
        M += [m, ""]
    H.append("</section>")
    for fam in families:
        title, paper = FAMILIES.get(fam, (fam, ""))
        fam_runs = [r for r in runs if r.family == fam]
        H.append(f"<section id='family-{html.escape(fam)}'><h2>{html.escape(title)}</h2>"
                 + (f"<p class='note'>Laid out like the paper's {html.escape(paper)}.</p>" if paper else ""))
        M += [f"## {title}", ""] + ([f"Laid out like the paper's {paper}.", ""] if paper else [])
        for id_ in sorted({r.id for r in fam_runs}):
            r0 = next(r for r in fam_runs if r.id == id_)
            grid = col.grid_note(id_)  # "incomplete: k of n points": other shards not run, runs failed
            for key in (id_, id_ + TEST_TIME_SUFFIX, id_ + STRATA_SUFFIX):
                if key not in tables:
                    continue
                t = tables[key]
                short = r0.title and len(r0.title) <= HEADING_TITLE_MAX
                head = (f"{key}: {r0.title}" if short else key) + (f" ({grid})" if grid else "")
                links = _run_links(t, tidy, id_, out)
                H.append(f"<h3 id='exp-{html.escape(key.replace(' ', '-'))}'>{html.escape(head)}</h3>")
                if r0.title and not short and key == id_:  # a config's description: once, under the heading
                    H.append(f"<p class='note'>{html.escape(r0.title)}</p>")
                    M += [f"### {head}", "", r0.title, ""]
                else:
                    M += [f"### {head}", ""]
                H.append(_html_table(t, links))
                M += [md_table(t), ""]
                legend = next((v for k, v in POINT_LEGENDS.items() if id_.startswith(k)), "") if key == id_ else ""
                note = " ".join(x for x in (legend, baseline_note(runs, id_) if key == id_ else "") if x)
                if note:
                    H.append(f"<p class='note'>{html.escape(note)}</p>")
                    M += [note, ""]
            for r in (r for r in fam_runs if r.id == id_):
                if r.kind == "disease":
                    h_d, m_d = _disease_block(r, out)
                    H.append(h_d)
                    M += [m_d, ""]
                elif fam == "runs":  # a single run: its per-class numbers at the operating threshold
                    h_t, m_t = _threshold_block(r)
                    H.append(h_t)
                    M += [m_t, ""]
                png = _slice_figure(r, dest)
                if png:
                    what = f"{r.id} ({r.dataset}): AUC by slice position"
                    note = ("Slice-wise results: the model's AUC within each tenth of the CT series "
                            "(0 = most inferior), per class and macro, with 95% CIs.")
                    H += [f"<h4>{html.escape(what)}</h4>", f"<p class='note'>{note}</p>", _img_tag(png, what)]
                    M += [f"#### {what}", "", note, "", f"![{what}]({png.name})", ""]
                h_a3, m_a3 = _a3_blocks(r, out)
                H.append(h_a3)
                M += [m_a3, ""]
                h_gal, m_gal = _galleries(r, out)
                H.append(h_gal)
                M += [m_gal, ""]
        for e, run_dir in tabular:
            if e.get("family") != fam:
                continue
            rel = os.path.relpath(run_dir, out)
            text = rebase_links((run_dir / "confounders.md").read_text(), rel)
            H += [f"<h3>{html.escape(e['id'])}: {html.escape(e.get('title', ''))} ({html.escape(e['dataset'])})</h3>",
                  (f"<p class='note'>Tabular analyses, no images; <a href=\"{html.escape(rel)}\">run folder</a> "
                   f"(<a href=\"{html.escape(rel)}/confounders.md\">confounders.md</a>, "
                   f"<a href=\"{html.escape(rel)}/confounders.json\">confounders.json</a>).</p>"),
                  markdown_blocks_html(text)]
            M += [f"### {e['id']}: {e.get('title', '')} ({e['dataset']})", "", f"[run folder]({rel})", "",
                  _demote_markdown(text, 3), ""]
        if fam == "A" and col.external:  # A1-ext: trained-on x tested-on matrices (paper Table 4)
            eh, em = _external_section(col, out)
            H.append(eh)
            M += [em, ""]
        for fig in FAMILY_FIGURES.get(fam, []):
            p = col.files.get(fig)
            if p and p.is_file():
                H.append(_img_tag(p, fig))
                M += [f"![{fig}](tables/{p.name})", ""]
        H.append("</section>")
    failed = [e for e in col.index if e.get("status") not in ("done", "planned")] + col.skipped + col.pending
    if failed:
        df = pd.DataFrame([{"experiment": e.get("id"), "dataset": e.get("dataset") or "",
                            "point": e.get("label", ""), "status": e.get("status", "skipped"),
                            "reason": str(e.get("reason", ""))[:300]} for e in failed])
        note_h = f"<p class='note'>{html.escape(pending)}</p>" if pending else ""
        H += ["<section id='not-run'><h2>Not run, skipped or failed</h2>", note_h, _html_table(df), "</section>"]
        M += ["## Not run, skipped or failed", ""] + ([pending, ""] if pending else []) + [md_table(df), ""]
    fh, fm = _run_figures(runs, out, dest)
    H += ["<section id='runs'><h2>ROC curves per class and training curves</h2>", fh, "</section>"]
    M += ["## ROC curves and training curves", "", fm, ""]
    methods = methods_text(runs)
    ph, pm = _provenance(runs)
    H += ["<section id='methods'><h2>Methods</h2>", f"<p>{html.escape(methods)}</p></section>",
          "<section id='provenance'><h2>Provenance</h2>", ph, "</section></body></html>"]
    M += ["## Methods", "", methods, "", "## Provenance", "", pm, ""]
    write_atomic(dest / "report.html", "\n".join(H))
    write_atomic(dest / "report.md", re.sub(r"\n{3,}", "\n\n", "\n".join(M)).rstrip("\n") + "\n")  # one blank line


def _external_section(col: Collected, out: Path) -> tuple[str, str]:
    """A1-ext: each external-validation matrix (rows trained on, columns tested on, macro AUC [CI], n),
    every cell linked to its folder, its notes, and the heatmap."""
    from readingrace.experiments.external import matrix_table

    what = "External validation: trained on one dataset, tested on another"
    note = ("Macro AUC [95% CI] and n, the number of test images; rows: trained on, columns: tested on; the "
            "diagonal (internal) is each run's own test split, and a cell marked \"internal test of ROW\" holds only "
            "that model's own internal test images (all others were seen in training and left out): not an "
            "external test. Each cell links to its folder.")
    h = [f"<section id='external-validation'><h3>{html.escape(what)}</h3>", f"<p class='note'>{note}</p>"]
    m = [f"### {what}", "", note, ""]
    for title, cells in col.external.items():
        table = matrix_table(cells).reset_index()
        rows = list(table[table.columns[0]])
        links: dict[tuple[int, str], str] = {}
        md = table.copy()
        for c in cells:
            if not c.get("cell_dir") or not Path(c["cell_dir"]).exists():
                continue
            i, rel = rows.index(c["trained_on"]), os.path.relpath(c["cell_dir"], out)
            links[(i, c["tested_on"])] = rel
            md.loc[i, c["tested_on"]] = f"[{md.loc[i, c['tested_on']]}]({rel})"
        h += [f"<h4>{html.escape(title)}</h4>", _html_table(table, links)]
        m += [f"#### {title}", "", md_table(md), ""]
        notes = [f"{c['trained_on']} -> {c['tested_on']}: " + "; ".join(c.get("notes") or [c.get("reason", "")])
                 for c in cells if not c.get("internal") and (c.get("notes") or c.get("reason"))]
        if notes:
            h.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
            m += [f"- {n}" for n in notes] + [""]
        png = col.files.get(f"external {title} figure")
        if png and png.is_file():
            h.append(_img_tag(png, f"external validation matrix {title}"))
            m += [f"![external validation matrix {title}](tables/{png.name})", ""]
    h.append("</section>")
    return "\n".join(h), "\n".join(m)


def baseline_note(runs: list[RunRecord], id_: str) -> str:
    """For a perturbation experiment (a grid over ``perturb.train``): the unperturbed run on the same data,
    network and input size (A1's, or any baseline of the same suite), so that a row reads as a change."""
    def key(r: RunRecord) -> tuple:
        c = r.config or {}
        return (r.dataset, r.attribute, (c.get("model") or {}).get("name"), (c.get("image") or {}).get("size"))

    perturbed = [r for r in runs if r.id == id_ and ((r.config or {}).get("perturb") or {}).get("train")]
    if not perturbed:
        return ""
    plain = [r for r in runs if not ((r.config or {}).get("perturb") or {}).get("train")
             and not ((r.config or {}).get("cohort") or {}).get("where") and r.metrics.get("macro_auc") is not None
             and not r.metrics.get("probe_reported")]  # an A3 run's headline AUC is a probe's, not a baseline
    notes = []
    for k in dict.fromkeys(key(r) for r in perturbed):
        base = sorted((r for r in plain if key(r) == k), key=lambda r: (r.id != "A1", r.id))
        if base:
            b = base[0]
            notes.append(f"{b.dataset}: {b.id} {k[2]} at {k[3]} px, {fmt_ci(b.metrics['macro_auc'], b.metrics.get('macro_auc_ci'))}")
    return ("Unperturbed baseline (same data, network and input size), macro AUC: " + "; ".join(notes) + "."
            if notes else "")


def gallery_images(run: RunRecord) -> list[tuple[Path, str]]:
    """A run's image galleries (C3: Grad-CAM, correct and wrong per class; lung masks) with captions."""
    found = dict.fromkeys(p for g in GALLERY_GLOBS for p in sorted(run.run_dir.glob(g)) if p.is_file())
    return [(p, "lung masks on test images" if "lung" in p.name else f"Grad-CAM gallery: {p.stem.replace('_', ' ')}")
            for p in found]


def _galleries(run: RunRecord, out: Path) -> tuple[str, str]:
    """The run's galleries, shown in its family's section (the paper's Grad-CAM figures)."""
    figs = gallery_images(run)
    if not figs:
        return "", ""
    head = f"{run.id} ({run.dataset}): image galleries" if run.label == "baseline" else \
        f"{run.id} {run.label} ({run.dataset}): image galleries"
    note = ("Grad-CAM of the predicted class over test images, the most confident correct and wrong "
            "predictions per true class; the white box is the region the occlusion test blanks. Galleries "
            "show pixels: burned-in annotations in the source images would show too.")
    rel = os.path.relpath(run.run_dir, out)
    h = [f"<h4>{html.escape(head)}</h4>", f"<p class='note'>{html.escape(note)}</p>"]
    h += [f"<figure>{_img_tag(p, a)}<figcaption class='note'>{html.escape(a)}</figcaption></figure>" for p, a in figs]
    m = [f"#### {head}", "", note, ""] + [f"- [{a}]({rel}/{p.relative_to(run.run_dir)})" for p, a in figs]
    return "\n".join(h), "\n".join(m)


def _threshold_block(run: RunRecord) -> tuple[str, str]:
    """A single run's per-class AUC, sensitivity and specificity at its operating threshold (with CIs)."""
    if not run.metrics.get("per_class"):
        return "", ""
    table = metrics_table({"per_class": {c: {"n_positive": m.get("n_positive"), "n_negative": m.get("n_negative"),
                                             "auc": m.get("auc"), "auc_ci": m.get("auc_ci"),
                                             "sensitivity": m.get("sensitivity"),
                                             "sensitivity_ci": m.get("sensitivity_ci"),
                                             "specificity": m.get("specificity"),
                                             "specificity_ci": m.get("specificity_ci")}
                                         for c, m in run.metrics["per_class"].items()},
                           "macro_auc": run.metrics.get("macro_auc"), "macro_auc_ci": run.metrics.get("macro_auc_ci")})
    table["class"] = table["class"].str.replace("**", "", regex=False)
    rule = run.metrics.get("threshold")
    head = f"{run.id} ({run.dataset}): per class at the operating threshold"
    note = ("Sensitivity and specificity of each class, one-vs-rest, at the operating threshold"
            + (f" (an image is called the class when its predicted probability is >= {rule:g})"
               if isinstance(rule, (int, float)) else "") + ", with 95% CIs.")
    return (f"<h4>{html.escape(head)}</h4><p class='note'>{html.escape(note)}</p>{_html_table(table)}",
            "\n".join([f"#### {head}", "", note, "", md_table(table), ""]))


def _disease_block(run: RunRecord, out: Path) -> tuple[str, str]:
    """A disease run (`readingrace disease`): per-finding AUCs with the mean, then its per-group tables (AUC,
    TPR, FPR, underdiagnosis, differences) from its metrics.json, folded like A3's pathology block."""
    m = run.metrics
    rel = os.path.relpath(run.run_dir, out)
    target = ((run.config or {}).get("cohort") or {}).get("target", "")
    table = per_finding_table(run)
    n_auc = sum(1 for f in m.get("per_finding") or [] if f.get("auc") is not None)
    head = f"{run.id}: disease model, {findings_text(run)} ({run.dataset})"
    note = (f"Multi-label model {m.get('model', '?')} at {m.get('image_size', '?')} px (split stratified by "
            f"{target or '?'}); test AUC per label, mean over the {n_auc} label(s) with positives and negatives: "
            f"{fmt(m.get('mean_auc'))}. Operating threshold: {m.get('threshold_source', '?')}.")
    hs = [f"<h3 id='exp-{html.escape(run.id.replace(' ', '-'))}'>{html.escape(head)}</h3>",
          f"<p class='note'>{html.escape(run.title)}</p>" if run.title else "",
          f"<p class='note'>{html.escape(note)} <a href=\"{html.escape(rel)}\">run folder</a> "
          f"(<a href=\"{html.escape(rel)}/report.md\">report.md</a>)</p>", _html_table(table)]
    ms = [f"### {head}", "", *([run.title, ""] if run.title else []), note, "", f"[run folder]({rel})", "",
          md_table(table), ""]
    sub = _subgroups_text(m.get("subgroups"))
    if sub:
        what = f"{run.id} ({run.dataset}): performance by group"
        figs = [run.run_dir / p for k, p in (m.get("files") or {}).items()
                if k.startswith("figure:") and (run.run_dir / p).is_file()]
        hs += [f"<h4>{html.escape(what)}</h4>",
               "<details><summary>per finding and group (AUC, TPR, FPR, underdiagnosis, differences)</summary>"
               + markdown_blocks_html(sub, heading="h5") + "".join(_img_tag(p, p.stem) for p in figs)
               + "</details>"]
        ms += [f"#### {what}", "", sub, ""]
        ms += [f"- [{p.stem}]({rel}/{p.relative_to(run.run_dir)})" for p in figs] + [""]
    return "\n".join(hs), "\n".join(ms)


def _subgroups_text(d: dict[str, Any] | None) -> str:
    """The subgroup tables (Markdown, ``stats.subgroups.subgroups_markdown``) from their JSON form."""
    from readingrace.stats.subgroups import SubgroupResult, subgroups_markdown

    if not d or not d.get("by_group"):
        return ""
    num = ("estimate", "ci_low", "ci_high", "difference", "estimate_group", "estimate_reference")
    frames = {}
    for key in ("by_group", "differences"):
        f = pd.DataFrame(d.get(key) or [])
        for c in (c for c in num if c in f):
            f[c] = pd.to_numeric(f[c], errors="coerce").astype(float)
        frames[key] = f
    if "attribute" not in frames["differences"]:
        frames["differences"] = pd.DataFrame(columns=["attribute", "difference"])
    result = SubgroupResult(by_group=frames["by_group"], differences=frames["differences"],
                            thresholds=d.get("thresholds") or {}, threshold_source=str(d.get("threshold_source", "")),
                            underdiagnosis=str(d.get("underdiagnosis", "")), references=d.get("references") or {},
                            findings=tuple(d.get("findings") or []), attributes=tuple(d.get("attributes") or []),
                            n_images=int(d.get("n_images") or 0), n_patients=int(d.get("n_patients") or 0),
                            ci={"level": 0.95, "method": "bootstrap", "n_bootstrap": "?", **(d.get("ci") or {})},
                            notes=tuple(d.get("notes") or ()))
    return subgroups_markdown(result, heading="#####")


def _a3_blocks(run: RunRecord, out: Path) -> tuple[str, str]:
    """A3 runs: the probe-versus-direct table and the pathology model's subgroup performance."""
    parts = [(run.run_dir / "a3.md", "Frozen-feature probes beside the model trained directly"),
             (run.run_dir / "pathology" / "subgroups.md", "The pathology model's performance by group")]
    hs, ms = [], []
    for path, what in parts:
        if not path.is_file():
            continue
        rel = os.path.relpath(path.parent, out)
        head = f"{run.id} ({run.dataset}): {what}"
        text = rebase_links(path.read_text(), rel)
        body = markdown_blocks_html(text, heading="h5")
        if path.name == "subgroups.md":  # per finding x group: long; folded so the A tables stay in view
            body = f"<details><summary>per finding and group (AUC, TPR, FPR, underdiagnosis)</summary>{body}</details>"
        hs += [f"<h4>{html.escape(head)}</h4>",
               f"<p class='note'><a href=\"{html.escape(rel)}\">run folder</a></p>", body]
        ms += [f"#### {head}", "", f"[run folder]({rel})", "", _demote_markdown(text, 4), ""]
    return "\n".join(hs), "\n".join(ms)
