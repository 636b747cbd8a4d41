"""The HTML report and collect, from fabricated run folders (no training), checked in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from readingrace.cohort.manifest import Manifest
from readingrace.config import ExperimentConfig
from readingrace.report.collect import RunRecord, collect
from readingrace.report.html import write_report

CLASSES = ["Female", "Male"]


def _metrics(auc: float) -> dict:
    ci = [round(auc - 0.05, 3), round(min(auc + 0.05, 1.0), 3)]
    return {"classes": CLASSES, "n_images": 60, "macro_auc": auc, "macro_auc_ci": ci, "target": "sex",
            "per_class": {c: {"auc": auc, "auc_ci": ci, "n_positive": 30, "n_negative": 30} for c in CLASSES}}


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(path)
    plt.close(fig)


def _run(root: Path, rel: str, auc: float, *, perturb=None, name: str | None = None) -> None:
    d = root / rel
    d.mkdir(parents=True)
    cfg = ExperimentConfig()
    cfg.name = name or cfg.name
    cfg.cohort.target = "sex"
    cfg.perturb.train = perturb or []
    (d / "config.yaml").write_text(yaml.safe_dump({"fingerprint": cfg.fingerprint(), **cfg.to_dict()}))
    (d / "metrics.json").write_text(json.dumps(_metrics(auc)))
    rng = np.random.default_rng(0)
    ids = [f"PATIENT{k:05d}" for k in range(40)]
    cohort = pd.DataFrame({"patient_id": ids, "path": [f"img/{i}.png" for i in ids],
                           "sex": rng.choice(CLASSES, 40), "age_group": rng.choice(["20-40", "40-60"], 40),
                           "view": "PA", "split": ["train"] * 24 + ["val"] * 4 + ["test"] * 12})
    cohort.to_csv(d / "cohort.csv", index=False)
    m = Manifest(source="synthetic")
    m.step("frontal views only", cohort.assign(patient_id=cohort["patient_id"]), cohort.iloc[:36])
    m.skip_many(["patient PATIENT00039"], "race (harmonised) differs across the patient's records")  # an id: never shown
    m.write(d / "manifest.json")
    _png(d / "roc.png")
    (d / "report.md").write_text("# run\n")


@pytest.fixture()
def suite_dir(tmp_path: Path) -> Path:
    root = tmp_path / "suite"
    entries = []
    points = [("C1-lowpass", "C1", {"kind": "lowpass", "d": d}, 0.5 + d / 400) for d in (1, 5, 50)]
    points += [("C4-drop", "C4", {"op": "drop", "row": r, "col": c}, 0.6 + 0.03 * (3 * r + c))
               for r in range(3) for c in range(3)]
    points += [("A1", "A", {"model": "resnet-tiny"}, 0.7)]
    for k, (id_, fam, point, auc) in enumerate(points):
        rel = f"{id_}/nih/{k:016x}"
        _run(root, rel, auc)
        entries.append({"id": id_, "family": fam, "title": f"{id_} title", "paper": "", "kind": "train",
                        "dataset": "nih", "attribute": "sex", "label": f"{id_} {k}", "point": point,
                        "fingerprint": f"{k:016x}", "run_dir": rel, "status": "done", "reason": "", "seconds": 1.0})
    half = len(entries) // 2  # two shards, as a SLURM array would write them
    for i, part in ((1, entries[:half]), (2, entries[half:])):
        (root / f"suite-{i}-of-2.json").write_text(json.dumps({"entries": part, "skipped": [
            {"id": "A3", "dataset": "nih", "reason": "frozen-feature probes (A3) are run by `readingrace probe`"}]}))
    return root


def test_collect_merges_shards_into_tables_and_figures(suite_dir, tmp_path):
    res = collect([suite_dir], out=tmp_path / "tables")
    assert len(res.runs) == 13
    macro = res.tidy[res.tidy["class"] == "macro"].set_index(["id", "d"], drop=False)
    assert macro.loc[("C1-lowpass", 50), "auc"].item() == pytest.approx(0.625)
    c4 = pd.read_csv(tmp_path / "tables" / "C4-drop.csv")
    assert len(c4) == 9
    # two classes: their one-vs-rest AUCs and the macro are one number, shown once
    (auc_col,) = [c for c in c4.columns if c.startswith("AUC (")]
    assert auc_col == "AUC (Female vs Male)"
    assert c4.loc[(c4["row"] == 2) & (c4["col"] == 2), auc_col].item() == "0.840 [0.790, 0.890]"
    for name in ("C1-cutoff.png", "C4-cells.png", "results.csv"):
        assert (tmp_path / "tables" / name).stat().st_size > 500, name
    assert "| nih | 50 | 0.625 [0.575, 0.675] |" in (tmp_path / "tables" / "C1-lowpass.md").read_text()


def test_report_html_and_markdown(suite_dir, tmp_path):
    paths = write_report([suite_dir], out=tmp_path / "rep")
    text = paths["html"].read_text()
    md = paths["markdown"].read_text()
    for section in ("family-A", "family-C1", "family-C4", "cohort", "methods", "provenance", "not-run"):
        assert f"id='{section}'" in text, section
    assert "0.840 [0.790, 0.890]" in text and "0.840 [0.790, 0.890]" in md
    assert "PATIENT0" not in text and "PATIENT0" not in md  # no patient identifiers
    assert re.search(r'href="\.\./suite/C4-drop/nih/[0-9a-f]{16}/report.md"', text)
    assert "<img" in text and 'src="img/' not in text  # all figures embedded
    assert "readingrace probe" in text  # skipped experiment and why
    assert "Table 1" in text
    assert "augmentation: random horizontal flip, rotation ±15°, zoom ±10%" in text  # the paper's recipe, in words


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHECK = """<script>
window.__rrErrors = [];
window.addEventListener('error', e => window.__rrErrors.push('error: ' + (e.message || (e.target && e.target.src) || '?')), true);
const _ce = console.error; console.error = (...a) => { window.__rrErrors.push('console: ' + a.join(' ')); _ce(...a); };
window.addEventListener('load', () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const ids = [...document.querySelectorAll('section')].map(s => s.id).join(',');
  const pre = document.createElement('pre'); pre.id = 'rr-check';
  pre.textContent = JSON.stringify({images: document.images.length, broken, ids, errors: window.__rrErrors});
  document.body.appendChild(pre);
});
</script>"""


def browser_check(html_path: Path, tmp_path: Path) -> tuple[dict, str]:
    """Open the page (with a checking script injected) in headless Chromium; the DOM verdict and stderr."""
    page = tmp_path / "checked.html"
    page.write_text(html_path.read_text().replace("<head>", "<head>" + CHECK, 1))
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="rr-check">(.*?)</pre>', res.stdout, re.DOTALL)
    assert m, f"chromium gave no verdict (rc {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&")), res.stderr


@pytest.mark.skipif(_chromium() is None, reason="no chromium installed (apt-get install chromium)")
def test_report_in_headless_chromium(suite_dir, tmp_path):
    paths = write_report([suite_dir], out=tmp_path / "rep")
    verdict, stderr = browser_check(paths["html"], tmp_path)
    assert verdict["images"] >= 4 and verdict["broken"] == 0, verdict
    assert verdict["errors"] == [], verdict
    assert not re.search(r"CONSOLE.*(Uncaught|Error)", stderr), stderr[-2000:]
    for fam in ("family-A", "family-C1", "family-C4"):
        assert fam in verdict["ids"].split(","), verdict
    # the check itself fails on a broken image
    bad = tmp_path / "bad.html"
    broken = '<img src="data:image/png;base64,AAAA"></body>'
    bad.write_text(paths["html"].read_text().replace("</body>", broken))
    verdict, _ = browser_check(bad, tmp_path)
    assert verdict["broken"] == 1, verdict


def test_cli_report_and_collect(suite_dir, tmp_path):
    from readingrace.cli import main

    assert main(["report", str(suite_dir), "-o", str(tmp_path / "r")]) == 0
    assert "C4-drop" in (tmp_path / "r" / "report.md").read_text()
    assert main(["collect", str(suite_dir), "-o", str(tmp_path / "c")]) == 0
    assert len(pd.read_csv(tmp_path / "c" / "results.csv")) == 13 * 3
    assert main(["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "r2")]) == 2


# -- reference model, confounder tables, ad-hoc captions, AUC by slice position ---------------------------
def _slice_predictions() -> pd.DataFrame:
    """Per slice decile k: 20 Black and 20 White images; AUC(Black) = AUC(White) = 0.5 + 0.05 k exactly.

    White images score prob_Black 0.5; of the Black images, 10 + k score 0.9 and the rest 0.1.
    Decile 0 is the null case (AUC 0.5).
    """
    rows = []
    for k in range(10):
        for j in range(20):
            rows.append({"label": "White", "prob_Black": 0.5, "slice_decile": k})
            rows.append({"label": "Black", "prob_Black": 0.9 if j < 10 + k else 0.1, "slice_decile": k})
    df = pd.DataFrame(rows)
    df["prob_White"] = 1.0 - df["prob_Black"]
    df["image_id"] = [f"img{i}" for i in range(len(df))]
    df["patient_id"] = [f"pt{i}" for i in range(len(df))]
    return df


def test_auc_by_slice_position_has_the_planted_values(tmp_path):
    from readingrace.report.figures import plot_slice_position, slice_position_table
    from readingrace.stats.metrics import evaluate_predictions

    metrics = evaluate_predictions(_slice_predictions(), strata=["slice_decile"], n_bootstrap=200)
    table = slice_position_table(metrics)
    assert sorted(table["decile"].unique()) == list(range(10))
    for cls in ("Black", "White", "macro"):
        got = table[table["class"] == cls].set_index("decile")["auc"]
        assert got.to_dict() == pytest.approx({k: 0.5 + 0.05 * k for k in range(10)}), cls
    assert (table["ci_lo"] <= table["auc"] + 1e-12).all() and (table["auc"] <= table["ci_hi"] + 1e-12).all()
    assert (table["n_images"] == 40).all()
    null = table[(table["decile"] == 0) & (table["class"] == "macro")].iloc[0]
    assert null["ci_lo"] < 0.5 < null["ci_hi"]  # decile 0: chance, and its CI says so
    assert plot_slice_position(metrics, tmp_path / "slices.png")
    assert (tmp_path / "slices.png").stat().st_size > 5000
    assert not plot_slice_position({"strata": {"view": {}}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_report_reference_confounder_tables_and_captions(suite_dir, tmp_path):
    from readingrace.stats.confounders import run_confounders, write_confounders
    from readingrace.stats.metrics import evaluate_predictions, to_json_dict

    # an ad-hoc run (not from a suite) with the thumbnail reference and its paired difference
    _run(tmp_path, "adhoc", 0.81, name="my-sex-model")
    m = json.loads((tmp_path / "adhoc" / "metrics.json").read_text())
    m["reference"] = {**_metrics(0.52), "name": "logistic regression on 32x32 thumbnails", "C": 0.01,
                      "macro_auc_ci": [0.45, 0.59]}
    m["cnn_vs_reference"] = {"macro_difference": 0.29, "macro_difference_ci": [0.2, 0.38],
                             "per_class": {c: {"difference": 0.29, "difference_ci": [0.2, 0.38]} for c in CLASSES}}
    (tmp_path / "adhoc" / "metrics.json").write_text(json.dumps(m))
    # a CT run evaluated by slice decile
    _run(tmp_path, "ct-run", 0.7, name="my-ct-model")
    ct = to_json_dict(evaluate_predictions(_slice_predictions(), strata=["slice_decile"], n_bootstrap=50))
    (tmp_path / "ct-run" / "metrics.json").write_text(json.dumps({**ct, "target": "sex"}))
    # a B3-style confounder run in the suite, written by the real writer
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"patient_id": [f"p{i}" for i in range(200)], "sex": rng.choice(["F", "M"], 200),
                       "age": rng.uniform(20, 80, 200)})
    rel = "B3/nih/00000000000000b3"
    write_confounders(run_confounders(df, {"analyses": ["chi_square"], "target": "sex", "strata": ["age_group"]}),
                      suite_dir / rel)
    index = json.loads((suite_dir / "suite-2-of-2.json").read_text())
    index["entries"].append({"id": "B3", "family": "B", "title": "Disease labels", "paper": "", "kind": "confounders",
                             "dataset": "nih", "attribute": "sex", "label": "B3", "point": {},
                             "fingerprint": "00000000000000b3", "run_dir": rel, "status": "done", "reason": ""})
    (suite_dir / "suite-2-of-2.json").write_text(json.dumps(index))

    paths = write_report([suite_dir, tmp_path / "adhoc", tmp_path / "ct-run"], out=tmp_path / "rep")
    text, md = paths["html"].read_text(), paths["markdown"].read_text()
    # 1: reference AUC [CI] and the paired difference beside the CNN's, in HTML and Markdown alike
    for doc in (text, md):
        assert "reference macro AUC [95% CI]" in doc and "CNN - reference, macro [95% CI]" in doc
        assert "0.520 [0.450, 0.590]" in doc and "0.290 [0.200, 0.380]" in doc
    assert "0.810 [0.760, 0.860]" in text
    assert "reference macro AUC" not in text.split("id='family-runs'")[0]  # suite runs have no reference
    # 2: the confounder results as real tables, linked to the run folder
    b3 = text[text.index("<h3>B3"):]
    b3 = b3[:b3.index("</section>")]
    assert "<pre>" not in b3 and "<table><tr><th>sex</th><th>20-40</th>" in b3
    assert f'href="../suite/{rel}"' in b3 and "Chi-square: sex by age_group" in b3
    assert "#### Chi-square: sex by age_group" in md or "##### Chi-square: sex by age_group" in md
    # 3: ad-hoc runs: no paper caption; suite families keep theirs
    runs_section = text[text.index("id='family-runs'"):]
    runs_section = runs_section[:runs_section.index("</section>")]
    assert "Laid out like the paper" not in runs_section and "Laid out like the paper's ." not in text
    assert "Laid out like the paper's Tables 7 and 8." in text and "Laid out like the paper's ." not in md
    # 4: AUC by slice position from the CT run's strata metrics, embedded in the page
    assert "AUC by slice position" in runs_section and runs_section.count("<img") == 1
    assert len(list((tmp_path / "rep").glob("slice-position-*.png"))) == 1


def test_run_table_shows_reference_and_paired_difference():
    from readingrace.report.markdown import metrics_table
    from readingrace.stats.metrics import compare_predictions, evaluate_predictions

    cnn = _slice_predictions()
    ref = cnn.assign(prob_Black=0.5, prob_White=0.5)  # a reference at chance: every score tied
    kw = {"n_bootstrap": 100}
    table = metrics_table(evaluate_predictions(cnn, **kw), evaluate_predictions(ref, **kw),
                          compare_predictions(cnn, ref, **kw)).set_index("class")
    assert table.loc["**macro**", "reference AUC [95% CI]"].startswith("0.500")
    assert table.loc["**macro**", "AUC [95% CI]"].startswith("0.725")   # 145 of 200 Black images score 0.9
    assert table.loc["**macro**", "CNN - reference [95% CI]"].startswith("0.225")
    assert table.loc["Black", "CNN - reference [95% CI]"].startswith("0.225")
    assert "CNN - reference [95% CI]" not in metrics_table(evaluate_predictions(cnn, **kw)).columns


def _external_inputs(suite_dir: Path, tmp_path: Path) -> Path:
    """External cells two ways: in a suite index (one done, one waiting) and a `readingrace external` folder."""
    from readingrace.experiments.external import cell_record, write_matrix

    a1 = next(p for p in (suite_dir / "A1" / "nih").iterdir())
    cell = suite_dir / "A1-ext" / "nih__on__mimic" / "abc"
    cell.mkdir(parents=True)
    (cell / "metrics.json").write_text(json.dumps({**_metrics(0.812), "input_mode": "stretch", "notes": []}))
    base = {"id": "A1-ext", "family": "A", "title": "external", "paper": "Table 3 (external)", "kind": "external",
            "attribute": "sex", "point": {}, "seconds": 1.0}
    entries = [{**base, "dataset": "mimic", "label": "nih -> mimic", "fingerprint": "abc", "trained_on": "nih",
                "tested_on": "mimic", "trained_run_dir": str(a1.relative_to(suite_dir)),
                "run_dir": "A1-ext/nih__on__mimic/abc", "status": "done", "reason": ""},
               {**base, "dataset": "nih", "label": "mimic -> nih", "fingerprint": "def", "trained_on": "mimic",
                "tested_on": "nih", "trained_run_dir": "A1-ext/mimic/123", "run_dir": "A1-ext/mimic__on__nih/def",
                "status": "waiting",
                "reason": "trained run on mimic not finished: run its shard first, then rerun this command"}]
    (suite_dir / "suite-3-of-3.json").write_text(json.dumps({"entries": entries, "skipped": []}))
    ext = tmp_path / "ext"
    (ext / "nih__on__site").mkdir(parents=True)
    (ext / "nih__on__site" / "metrics.json").write_text(json.dumps(_metrics(0.55)))
    cells = [cell_record(_metrics(0.7), trained_on="nih", tested_on="nih", internal=True, input_mode="stretch",
                         cell_dir=Path("..") / suite_dir.name / a1.relative_to(suite_dir)),
             cell_record({**_metrics(0.55), "notes": ["class 'X' of the model is absent from site: NaN"]},
                         trained_on="nih", tested_on="site", input_mode="pad", cell_dir="nih__on__site")]
    write_matrix(cells, ext)
    return ext


def test_report_with_external_cells_has_the_matrix_section(suite_dir, tmp_path):
    ext = _external_inputs(suite_dir, tmp_path)
    col = collect([suite_dir, ext], out=tmp_path / "tables")
    assert sorted(col.external) == ["A1-ext (sex)", "ext"]
    suite_cells = {(c["trained_on"], c["tested_on"]): c for c in col.external["A1-ext (sex)"]}
    assert suite_cells[("nih", "nih")]["internal"] and suite_cells[("nih", "nih")]["macro_auc"] == 0.7
    assert suite_cells[("nih", "mimic")]["macro_auc"] == 0.812 and suite_cells[("mimic", "nih")]["status"] == "waiting"
    assert len(col.runs) == 13  # external cells are not trained runs
    paths = write_report([suite_dir, ext], out=tmp_path / "rep")
    text, md = paths["html"].read_text(), paths["markdown"].read_text()
    assert "id='external-validation'" in text
    assert "\n### External validation" in md and "#### A1-ext (sex)" in md and "#### ext" in md
    for t in (text, md):
        assert "0.812 [0.762, 0.862]" in t and "0.700 [0.650, 0.750] (internal)" in t and "n/a (waiting)" in t
    assert 'href="../suite/A1-ext/nih__on__mimic/abc"' in text and 'href="../ext/nih__on__site"' in text
    assert "class &#x27;X&#x27; of the model is absent" in text
    assert "not finished: run its shard first" in text  # the waiting cell is listed with its reason
    if _chromium() is not None:
        verdict, _ = browser_check(paths["html"], tmp_path)
        assert verdict["broken"] == 0 and verdict["errors"] == [], verdict
        assert {"family-A", "external-validation"} <= set(verdict["ids"].split(",")), verdict


def test_markdown_links_render_and_point_into_the_run_folder():
    from readingrace.report.html import markdown_blocks_html, rebase_links

    text = "- pathology model: 0.781 ([per finding](pathology/report.md)); see [the paper](https://doi.org/x) or [top](#cohort)"
    rebased = rebase_links(text, "../suite/A3/nih/abc")
    assert "(../suite/A3/nih/abc/pathology/report.md)" in rebased
    assert "(https://doi.org/x)" in rebased and "(#cohort)" in rebased
    page = markdown_blocks_html(rebased)
    assert '<a href="../suite/A3/nih/abc/pathology/report.md">per finding</a>' in page
    assert '<a href="https://doi.org/x">the paper</a>' in page and "](" not in page
    assert "<code>x</code>" in markdown_blocks_html("a `x` [y](z)") and '<a href="z">y</a>' in markdown_blocks_html("[y](z)")


def test_test_time_table_shows_the_paired_difference_from_untouched_images(tmp_path):
    root = tmp_path / "suite"
    rel = "C2-noise-blur/nih/00000000000000aa"
    _run(root, rel, 0.8)
    path = root / rel / "metrics.json"
    m = json.loads(path.read_text())
    m["test_perturbations"] = {"Gaussian noise per image": {
        "metrics": _metrics(0.6),
        "comparison": {"macro_difference": -0.2, "macro_difference_ci": [-0.28, -0.12]}}}
    path.write_text(json.dumps(m))
    (root / "suite.json").write_text(json.dumps({"entries": [{
        "id": "C2-noise-blur", "family": "C2", "title": "noise", "paper": "", "kind": "train", "dataset": "nih",
        "attribute": "sex", "label": "baseline", "point": {}, "fingerprint": "00000000000000aa", "run_dir": rel,
        "status": "done", "reason": "", "seconds": 1.0}], "skipped": []}))
    res = collect([root], out=tmp_path / "tables")
    table = pd.read_csv(tmp_path / "tables" / "C2-noise-blur_test-time.csv")
    row = table[table["test_perturbation"] == "Gaussian noise per image"].iloc[0]
    assert row["AUC (Female vs Male)"] == "0.600 [0.550, 0.650]"
    assert row["minus untouched test images, macro [95% CI]"] == "-0.200 [-0.280, -0.120]"
    assert len(res.runs) == 1


def test_galleries_are_shown_in_their_family_section(tmp_path):
    root = tmp_path / "suite"
    rel = "C3/nih/00000000000000c3"
    _run(root, rel, 0.8)
    (root / rel / "gradcam").mkdir()
    _png(root / rel / "gradcam" / "gradcam_Female_correct.png")
    _png(root / rel / "gallery_lung_masks.png")
    (root / "suite.json").write_text(json.dumps({"entries": [{
        "id": "C3", "family": "C3", "title": "localisation", "paper": "", "kind": "train", "dataset": "nih",
        "attribute": "sex", "label": "baseline", "point": {}, "fingerprint": "00000000000000c3", "run_dir": rel,
        "status": "done", "reason": "", "seconds": 1.0}], "skipped": []}))
    paths = write_report([root], out=tmp_path / "rep")
    page = paths["html"].read_text()
    c3 = page[page.index("<section id='family-C3'>"):]
    c3 = c3[:c3.index("</section>")]
    assert "Grad-CAM gallery: gradcam Female correct" in c3 and "lung masks on test images" in c3
    assert c3.count("<img") == 2
    md = paths["markdown"].read_text()
    assert "(../suite/C3/nih/00000000000000c3/gradcam/gradcam_Female_correct.png)" in md


def test_within_strata_table_for_b5_leaves_out_the_target(tmp_path):
    root = tmp_path / "suite"
    rel = "B5/nih/00000000000000b5"
    _run(root, rel, 0.8)
    path = root / rel / "metrics.json"
    m = json.loads(path.read_text())
    m["strata"] = {"age_group": {"20-40": {**_metrics(0.7), "n_patients": 20}, "40-60": {**_metrics(0.9), "n_patients": 25}},
                   "sex": {"Female": {**_metrics(0.5), "macro_auc": None}}}   # the target: one class per group
    path.write_text(json.dumps(m))
    (root / "suite.json").write_text(json.dumps({"entries": [{
        "id": "B5", "family": "B", "title": "within age groups", "paper": "", "kind": "train", "dataset": "nih",
        "attribute": "sex", "label": "baseline", "point": {}, "fingerprint": "00000000000000b5", "run_dir": rel,
        "status": "done", "reason": "", "seconds": 1.0}], "skipped": []}))
    paths = write_report([root], out=tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert "### B5 (within strata): within age groups" in md
    assert "| nih | age_group | 20-40 | 60 (20) | 0.700 [0.650, 0.750] |" in md
    assert "| nih | age_group | 40-60 | 60 (25) | 0.900 [0.850, 0.950] |" in md
    assert "| sex |" not in md and "\n\n\n" not in md
    assert "B5 (within strata)" in paths["html"].read_text()


def test_perturbation_tables_name_the_unperturbed_baseline(tmp_path):
    root = tmp_path / "suite"
    entries = []
    for id_, fam, rel, auc, perturb in [("A1", "A", "A1/nih/00000000000000a1", 0.7, None),
                                        ("C4-drop", "C4", "C4-drop/nih/00000000000000c4", 0.6,
                                         [{"name": "drop_cell", "row": 0, "col": 0}])]:
        _run(root, rel, auc, perturb=perturb)
        entries.append({"id": id_, "family": fam, "title": id_, "paper": "", "kind": "train", "dataset": "nih",
                        "attribute": "sex", "label": "baseline" if perturb is None else "drop (0,0)",
                        "point": {} if perturb is None else {"op": "drop", "row": 0, "col": 0},
                        "fingerprint": rel[-16:], "run_dir": rel, "status": "done", "reason": "", "seconds": 1.0})
    (root / "suite.json").write_text(json.dumps({"entries": entries, "skipped": []}))
    md = write_report([root], out=tmp_path / "rep")["markdown"].read_text()
    c4 = md[md.index("### C4-drop"):]
    assert "Unperturbed baseline (same data, network and input size), macro AUC: nih: A1" in c4
    assert "0.700 [0.650, 0.750]" in c4.split("\n\n")[2]   # the note right under the table
    assert md.count("Unperturbed baseline") == 1           # not under A1 itself


def test_flow_figure_draws_only_steps_that_exclude_and_lists_the_rest():
    from readingrace.report.figures import flow_steps

    flow = pd.DataFrame([
        {"step": "metadata rows", "images_before": 0, "patients_before": 0, "images_after": 1000, "patients_after": 300},
        {"step": "image file present", "images_before": 1000, "patients_before": 300, "images_after": 900,
         "patients_after": 280},
        {"step": "sex recorded", "images_before": 900, "patients_before": 280, "images_after": 900, "patients_after": 280},
        {"step": "patients with one sex", "images_before": 900, "patients_before": 280, "images_after": 890,
         "patients_after": 279},
    ])
    (images, patients), steps, kept_all = flow_steps(flow)
    assert (images, patients) == (1000, 300)
    assert steps["step"].tolist() == ["image file present", "patients with one sex"]
    assert kept_all == ["sex recorded"]


def test_grid_points_sort_in_the_grid_order_not_as_text():
    from readingrace.report.html import point_order

    points = [{"d": 100}, {"d": 10}, {"d": 1}, {"d": 25}, {"d": 5}]
    assert [p["d"] for p in sorted(points, key=point_order)] == [1, 5, 10, 25, 100]
    cells = [{"row": 1, "col": 0}, {"row": 0, "col": 2}, {"row": 0, "col": 10}]
    assert sorted(cells, key=point_order) == [{"row": 0, "col": 2}, {"row": 0, "col": 10}, {"row": 1, "col": 0}]
    assert sorted([{"age_group": "80+"}, {"age_group": "0-20"}], key=point_order)[0] == {"age_group": "0-20"}


# -- a report never replaces a user's files; disease runs; planned runs without results -------------------
def test_report_never_replaces_a_file_it_did_not_write(suite_dir, tmp_path):
    from readingrace.cli import main
    from readingrace.errors import RunError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("<html>MY REPORT</html>\n")
    with pytest.raises(RunError, match=r"would replace report\.html, not written by `readingrace report`/`collect`"):
        write_report([suite_dir], out=mine)
    assert (mine / "report.html").read_text() == "<html>MY REPORT</html>\n"
    assert sorted(p.name for p in mine.iterdir()) == ["report.html"]  # nothing else written, no staging left
    assert main(["report", str(suite_dir), "-o", str(mine)]) == 2
    # its own earlier report is replaced; a tables/ file the user changed since is not
    rep = tmp_path / "rep"
    first = write_report([suite_dir], out=rep)["html"].read_text()
    assert "<meta name='generator' content='generated by readingrace report'>" in first
    assert write_report([suite_dir], out=rep)["html"].read_text() == first
    (rep / "tables" / "results.csv").write_text("my,own\n1,2\n")
    with pytest.raises(RunError, match=r"tables/results\.csv"):
        write_report([suite_dir], out=rep)
    assert (rep / "tables" / "results.csv").read_text() == "my,own\n1,2\n"
    # a run folder's own report.md (readingrace run wrote it, but it is not a study report) is kept
    run = next((suite_dir / "A1" / "nih").iterdir())
    with pytest.raises(RunError, match="report.md, not written by `readingrace report`/`collect`"):
        write_report([suite_dir], out=run)
    assert (run / "report.md").read_text() == "# run\n"
    # collect: the same rule in its folder
    (tmp_path / "col").mkdir()
    (tmp_path / "col" / "index.csv").write_text("mine\n")
    with pytest.raises(RunError, match="index.csv"):
        collect([suite_dir], out=tmp_path / "col")
    assert collect([suite_dir], out=tmp_path / "col2").files["results"] == tmp_path / "col2" / "results.csv"
    assert collect([suite_dir], out=tmp_path / "col2").out == tmp_path / "col2"  # its own files: replaced
    # a report folder written before files were recorded (an earlier version): replaced, tables included
    old = tmp_path / "old"
    write_report([suite_dir], out=old)
    (old / ".readingrace-written.json").unlink()
    (old / "report.html").write_text("<!DOCTYPE html><html><head><title>readingrace report</title></head></html>")
    (old / "tables" / "results.csv").write_text("an,older\n1,2\n")
    assert "generated by readingrace report" in write_report([suite_dir], out=old)["html"].read_text()
    assert (old / "tables" / "results.csv").read_text() != "an,older\n1,2\n"


def _disease_run(root: Path) -> tuple[Path, object]:
    """A `readingrace disease` run folder (2 findings + No Finding, groups by sex) with real subgroup tables."""
    from readingrace.stats.subgroups import subgroup_performance

    rng = np.random.default_rng(3)
    n = 120
    pred = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": [f"p{k // 2}" for k in range(n)],
                         "sex": np.repeat(["F", "M"], n // 2)})
    for f in ("Effusion", "Mass"):
        y = rng.integers(0, 2, n)
        pred[f"label_{f}"] = y
        pred[f"prob_{f}"] = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
    pred["label_No Finding"] = ((pred["label_Effusion"] == 0) & (pred["label_Mass"] == 0)).astype(int)
    pred["prob_No Finding"] = 1 - pred[["prob_Effusion", "prob_Mass"]].max(axis=1)
    sub = subgroup_performance(pred, findings=["Effusion", "Mass", "No Finding"], groups=["sex"], threshold=0.5,
                               n_bootstrap=50)
    d = root / "nih-disease"
    _run(root, "nih-disease", 0.5, name="nih-disease")  # cohort.csv, manifest.json (the target is sex)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg.update(kind="disease", description="A disease model of two findings.")
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "roc.png").unlink()
    per_finding = [{"label": f, "auc": auc, "auc_ci_low": auc - 0.1, "auc_ci_high": auc + 0.05, "n_positive": 30,
                    "n_negative": 90, "n_uncertain_or_blank": 0}
                   for f, auc in (("Effusion", 0.812), ("Mass", 0.701), ("No Finding", 0.655))]
    (d / "metrics.json").write_text(json.dumps({
        "schema": "readingrace.disease/1", "labels": ["Effusion", "Mass", "No Finding"], "no_finding": "No Finding",
        "model": "resnet-tiny", "image_size": 64, "per_finding": per_finding, "mean_auc": 0.7227,
        "thresholds": {"Effusion": 0.5, "Mass": 0.5, "No Finding": 0.5}, "threshold_source": "fixed 0.5",
        "underdiagnosis": sub.underdiagnosis, "groups": ["sex"], "groups_skipped": [], "subgroups": sub.to_dict(),
        "files": {}}))
    return d, sub


def test_disease_run_has_its_own_block_and_methods_say_what_it_learned(tmp_path):
    disease, sub = _disease_run(tmp_path)
    _run(tmp_path, "nih-sex", 0.8, name="nih-sex")
    col = collect([disease, tmp_path / "nih-sex"], out=tmp_path / "tables")
    assert set(col.tidy["id"]) == {"nih-sex"}  # per-finding AUCs are not sex AUCs
    assert "| Effusion | 0.812 [0.712, 0.862] | 30 / 90 | 0.500 |" in (
        tmp_path / "tables" / "disease-nih-disease-synthetic.md").read_text()
    paths = write_report([disease, tmp_path / "nih-sex"], out=tmp_path / "rep")
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "n/a [n/a, n/a]" not in md and "(race)" not in md
    assert "### synthetic (disease model nih-disease; split stratified by sex)" in md
    assert "### nih-disease: disease model, the 2 findings and No Finding (synthetic)" in md
    assert "| Mass | 0.701 [0.601, 0.751] | 30 / 90 | 0.500 |" in md
    assert "mean over the 3 label(s) with positives and negatives: 0.723" in md
    ud = sub.metric("underdiagnosis_rate", attribute="sex").set_index("group").loc["F"]
    assert f"| F | 60 | 30 | {ud.n_denominator} | {ud.estimate:.3f} [{ud.ci_low:.3f}, {ud.ci_high:.3f}]" in md
    auc = sub.metric("auc", finding="Mass", attribute="sex").set_index("group").loc["M"]
    assert f"| Mass | M | {auc.n_positive} / {auc.n_negative} | {auc.estimate:.3f} [" in md
    assert "Differences (group - reference)" in md
    assert "<details><summary>per finding and group (AUC, TPR, FPR, underdiagnosis, differences)" in page
    assert ("to predict sex (1 model) and the 2 findings and No Finding (1 disease model) from images of "
            "a generated cohort (synthetic)") in md
    assert "predict , " not in md and "Results" in md.split("## Methods")[0]


def _sharded_suite(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Shard 1 of 2 of the small C2-resolution plan finished (its index as run_suite writes it); shard 2 not run."""
    from readingrace.experiments.suite import resolve_suite_dir, run_suite

    out = tmp_path / "suite"
    kw = {"data": {"synthetic": str(tmp_path / "gen")}, "budget": "small", "only": ["C2-resolution"],
          "say": lambda m: None}
    index = run_suite(resolve_suite_dir("paper"), out=out, shard_=(1, 2), dry_run=True, **kw)
    (out / "plan-1-of-2.json").unlink()
    for e in index["entries"]:
        _run(out, e["run_dir"], 0.6)
        e["status"] = "done"
    (out / "suite-1-of-2.json").write_text(json.dumps(index))
    return out, kw


def test_collect_and_report_say_which_planned_runs_have_no_results_yet(tmp_path, capsys):
    from readingrace.cli import main
    from readingrace.experiments.suite import resolve_suite_dir, run_suite

    out, kw = _sharded_suite(tmp_path)
    done = len(json.loads((out / "suite-1-of-2.json").read_text())["entries"])
    assert 0 < done < 7
    col = collect([out])
    assert len(col.runs) == done and (col.n_pending, col.n_planned) == (7 - done, 7)
    note = f"{7 - done} of 7 planned runs have no results yet (e.g. other shards): shard 2/2."
    assert col.pending_note() == note
    assert main(["collect", str(out), "-o", str(tmp_path / "c")]) == 0
    assert note in capsys.readouterr().out
    index = pd.read_csv(tmp_path / "c" / "index.csv")
    assert index.loc[index["status"] == "not run yet", "id"].tolist() == ["shard 2/2"]
    md = write_report([out], out=tmp_path / "rep")["markdown"].read_text()
    not_run = md[md.index("## Not run"):]
    assert note in md.split("## Cohort")[0] and note in not_run
    assert "| shard 2/2 |  |  | not run yet | no suite-2-of-2.json in" in not_run
    # with the dry-run plan of the whole suite, the missing runs are named
    run_suite(resolve_suite_dir("paper"), out=out, dry_run=True, **kw)
    col = collect([out])
    missing = sorted(p["label"] for p in col.pending)
    plan = json.loads((out / "plan.json").read_text())["entries"]
    done_dirs = {e["run_dir"] for e in json.loads((out / "suite-1-of-2.json").read_text())["entries"]}
    assert missing == sorted(e["label"] for e in plan if e["run_dir"] not in done_dirs)
    assert col.n_pending == 7 - done and col.pending_note().startswith(f"{7 - done} of 7 planned runs")
    assert f"C2-resolution {col.pending[0]['label']} on synthetic" in col.pending_note()
    md = write_report([out], out=tmp_path / "rep")["markdown"].read_text()
    assert f"| C2-resolution | synthetic | {missing[0]} | not run yet |" in md


def test_a_cohort_shown_once_when_two_runs_share_images_split_and_exclusions(tmp_path):
    disease, _ = _disease_run(tmp_path)
    _run(tmp_path, "nih-sex", 0.8, name="nih-sex")
    for name in ("cohort.csv", "manifest.json"):  # the disease model trained on the sex model's cohort
        if (tmp_path / "nih-sex" / name).is_file():
            shutil.copy(tmp_path / "nih-sex" / name, disease / name)
    md = write_report([tmp_path / "nih-sex", disease], out=tmp_path / "rep")["markdown"].read_text()
    cohort = md.split("## Cohort")[1].split("\n## ")[0]
    assert cohort.count("Images (patients) per split and class:") == 1
    assert "The same images, split and exclusions as" in cohort


# -- user files in and around a report folder; links of every table; headings; external n; incomplete grids ----
def test_a_report_in_the_parent_folder_does_not_make_a_users_files_ours(suite_dir, tmp_path):
    from readingrace.errors import RunError

    parent = tmp_path / "b"
    write_report([suite_dir], out=parent)
    mine = parent / "mine"
    (mine / "tables").mkdir(parents=True)
    (mine / "report.md").write_text("my notes\n")
    (mine / "tables" / "results.csv").write_text("my,data\n")
    with pytest.raises(RunError, match=r"would replace report\.md, tables/results\.csv, not written by"):
        write_report([suite_dir], out=mine)
    assert (mine / "report.md").read_text() == "my notes\n"
    assert (mine / "tables" / "results.csv").read_text() == "my,data\n"
    # the report's own tables/ (its record lists them, by content): collect may write there, and back
    assert collect([suite_dir], out=parent / "tables").out == parent / "tables"
    assert write_report([suite_dir], out=parent)["html"].is_file()
    (parent / "tables" / "A1.md").write_text("my A1\n")
    with pytest.raises(RunError, match=r"would replace A1\.md, not written by"):
        collect([suite_dir], out=parent / "tables")


def test_a_report_md_edited_since_is_not_replaced(suite_dir, tmp_path):
    from readingrace.errors import RunError

    rep = tmp_path / "rep"
    md = write_report([suite_dir], out=rep)["markdown"]
    edited = md.read_text() + "\nMy own conclusions.\n"  # still starts with the generator mark
    md.write_text(edited)
    with pytest.raises(RunError, match=r"would replace report\.md, not written by .*\(or changed since\)"):
        write_report([suite_dir], out=rep)
    assert md.read_text() == edited
    # the mark alone counts only for a report the record does not list
    (rep / ".readingrace-written.json").unlink()
    assert "My own conclusions" not in write_report([suite_dir], out=rep)["markdown"].read_text()


def test_collect_legacy_rule_needs_collects_own_index_in_its_default_folder(suite_dir, tmp_path):
    from readingrace.errors import RunError

    user = tmp_path / "mine"
    user.mkdir()
    (user / "index.csv").write_text("id,run_dir,status,my_notes\n1,x,done,good\n")
    (user / "A1.md").write_text("my A1 notes\n")
    with pytest.raises(RunError, match=r"would replace A1\.md, index\.csv, not written by"):
        collect([suite_dir], out=user)
    assert (user / "A1.md").read_text() == "my A1 notes\n"
    # collect's default folder (SUITE/collected), written before the record: its files are replaced
    default = suite_dir / "collected"
    collect([suite_dir], out=default)
    (default / ".readingrace-written.json").unlink()
    (default / "A1.md").write_text("an older A1 table\n")
    collect([suite_dir], out=default)
    assert (default / "A1.md").read_text().startswith("| dataset | model |")
    # ... but not where the index.csv is not exactly collect's
    (default / ".readingrace-written.json").unlink()
    (default / "index.csv").write_text("id,run_dir,status\n")
    (default / "A1.md").write_text("an older A1 table\n")
    with pytest.raises(RunError, match="A1.md"):
        collect([suite_dir], out=default)
    assert (default / "A1.md").read_text() == "an older A1 table\n"


def test_test_time_and_strata_tables_link_each_row_to_its_run(tmp_path):
    root = tmp_path / "suite"
    entries = []
    for id_, fam, rel in (("C2-noise-blur", "C2", "C2-noise-blur/nih/00000000000000aa"), ("B5", "B", "B5/nih/00000000000000b5")):
        _run(root, rel, 0.8)
        path = root / rel / "metrics.json"
        m = json.loads(path.read_text())
        if id_ == "B5":
            m["strata"] = {"age_group": {"20-40": {**_metrics(0.7), "n_patients": 20}}}
        else:
            m["test_perturbations"] = {"Gaussian noise per image": {
                "metrics": _metrics(0.6), "comparison": {"macro_difference": -0.2, "macro_difference_ci": [-0.3, -0.1]}}}
        path.write_text(json.dumps(m))
        entries.append({"id": id_, "family": fam, "title": id_, "paper": "", "kind": "train", "dataset": "nih",
                        "attribute": "sex", "label": "baseline", "point": {}, "fingerprint": rel[-16:], "run_dir": rel,
                        "status": "done", "reason": "", "seconds": 1.0})
    (root / "suite.json").write_text(json.dumps({"entries": entries, "skipped": []}))
    page = write_report([root], out=tmp_path / "rep")["html"].read_text()

    def table(key: str) -> str:
        start = page.index(f"id='exp-{key}'")
        return page[start:page.index("</table>", start)]

    noise = table("C2-noise-blur-(test-time)")
    assert '<a href="../suite/C2-noise-blur/nih/00000000000000aa/report.md">0.600 [0.550, 0.650]</a>' in noise
    assert '<a href="../suite/C2-noise-blur/nih/00000000000000aa/report.md">-0.200 [-0.300, -0.100]</a>' in noise
    strata = table("B5-(within-strata)")
    assert '<a href="../suite/B5/nih/00000000000000b5/report.md">0.700 [0.650, 0.750]</a>' in strata


def test_embedded_markdown_headings_stop_at_six_levels(tmp_path):
    from readingrace.report.html import _demote_markdown

    assert _demote_markdown("# a\n### b\n#### c\n#741 not a heading\ntext", 4).splitlines() == [
        "##### a", "###### b", "###### c", "#741 not a heading", "text"]
    _run(tmp_path, "a3run", 0.8, name="A3")
    (tmp_path / "a3run" / "a3.md").write_text("# A3\n\n### Does `resnet-tiny` encode sex?\n\nYes.\n")
    md = write_report([tmp_path / "a3run"], out=tmp_path / "rep")["markdown"].read_text()
    assert "\n###### Does `resnet-tiny` encode sex?\n" in md
    assert not re.search(r"^#{7,}", md, re.M)


def test_external_cells_show_n_and_a_cell_of_only_internal_test_images(tmp_path, monkeypatch):
    from readingrace.experiments.external import cell_record, write_matrix
    from readingrace.report import figures

    ext = tmp_path / "ext"
    for d in ("nih__on__nih2", "nih__on__site"):
        (ext / d).mkdir(parents=True)
    overlap = {**_metrics(0.71), "notes": ["60 image(s) overlap the model's internal test set (unseen in training; kept)"],
               "seen_by_model": {"same_image": 500, "same_patient": 0, "internal_test_overlap": 60}}
    partly = {**_metrics(0.55), "notes": ["20 image(s) overlap the model's internal test set (unseen in training; kept)"]}
    cells = [cell_record(_metrics(0.7), trained_on="nih", tested_on="nih", internal=True, input_mode="stretch",
                         cell_dir=None),
             cell_record(overlap, trained_on="nih", tested_on="nih2", input_mode="stretch", cell_dir="nih__on__nih2"),
             cell_record(partly, trained_on="nih", tested_on="site", input_mode="pad", cell_dir="nih__on__site")]
    drawn: list = []
    panel = figures._matrix_panel
    monkeypatch.setattr(figures, "_matrix_panel", lambda ax, v, text, **kw: drawn.append(text) or panel(ax, v, text, **kw))
    write_matrix(cells, ext)
    index = json.loads((ext / "external.json").read_text())  # as an earlier version wrote it: no such fields
    index["cells"] = [{k: v for k, v in c.items() if k not in ("internal_only", "internal_test_overlap")}
                      for c in index["cells"]]
    (ext / "external.json").write_text(json.dumps(index))
    col = collect([ext], out=tmp_path / "tables")
    md = (tmp_path / "tables" / "external-ext.md").read_text()
    assert "| nih | 0.700 [0.650, 0.750] (internal), n = 60 | 0.710 [0.660, 0.760] (internal test of nih), n = 60 | " \
           "0.550 [0.500, 0.600], n = 60 |" in md
    assert len(col.external["ext"]) == 3
    page = write_report([ext], out=tmp_path / "rep")["html"].read_text()
    assert ">0.710 [0.660, 0.760] (internal test of nih), n = 60</a>" in page
    texts = drawn[-1][0]  # the heatmap's one row
    assert texts[0].endswith("internal\nn = 60") and "internal test of nih\nn = 60" in texts[1]
    assert "internal test" not in texts[2] and texts[2].endswith("n = 60")


def test_a_grid_with_points_of_other_shards_missing_says_so(tmp_path, monkeypatch):
    from readingrace.experiments.suite import resolve_suite_dir, run_suite
    from readingrace.report import figures

    out, kw = _sharded_suite(tmp_path)
    done = len(json.loads((out / "suite-1-of-2.json").read_text())["entries"])
    titles: list[str] = []
    line_panel = figures._line_panel
    monkeypatch.setattr(figures, "_line_panel", lambda ax, part, x, **k: titles.append(k["title"]) or line_panel(ax, part, x, **k))
    col = collect([out], out=tmp_path / "c1")  # shard 2 unnamed: the grid may be incomplete, by how much is unknown
    assert col.grid_note("C2-resolution") == (f"possibly incomplete: {done} points; {7 - done} planned run(s) of "
                                              "shard(s) not run yet are not named")
    assert titles[-1].endswith(col.grid_note("C2-resolution"))
    run_suite(resolve_suite_dir("paper"), out=out, dry_run=True, **kw)  # the plan names the missing runs
    collect([out], out=tmp_path / "c2")
    note = f"incomplete: {done} of 7 points, {7 - done} not run yet"
    assert titles[-1] == f"AUC vs resolution\n{note}"
    assert (tmp_path / "c2" / "C2-resolution.md").read_text().startswith(f"C2-resolution: {note}\n\n| dataset |")
    md = write_report([out], out=tmp_path / "rep")["markdown"].read_text()
    assert f"### C2-resolution: Resolution: images downsampled (anti-aliased) and trained on ({note})" in md


def test_methods_say_which_runs_used_which_setting():
    from readingrace.report.html import methods_text

    def record(seeds: list[int], epochs: int) -> RunRecord:
        cfg = ExperimentConfig()
        cfg.cohort.target, cfg.train.seeds, cfg.train.max_epochs = "sex", seeds, epochs
        return RunRecord(run_dir=Path("."), id="A1", family="A", title="", paper="", dataset="nih", attribute="sex",
                         label="baseline", point={}, metrics={}, config=cfg.to_dict())

    text = methods_text([record([2021], 5), record([2021], 5), record([2021, 2022, 2023], 40)])
    assert "training seed(s) 2021 (2 runs); 2021, 2022, 2023 (1 run);" in text
    assert "at most 5 (2 runs); 40 (1 run) epochs" in text
    same = methods_text([record([2021], 5), record([2021], 5)])
    assert "training seed(s) 2021;" in same and "at most 5 epochs" in same and "run)" not in same


def test_a_new_report_into_the_same_folder_removes_the_old_reports_own_files_only(suite_dir, tmp_path):
    out = tmp_path / "rep"
    write_report([suite_dir], out=out)
    suite_tables = {p.name for p in (out / "tables").iterdir()}
    assert "C4-drop.md" in suite_tables
    (out / "tables" / "C1-lowpass.md").write_text("my notes\n")  # the user edited one of them
    single = next((suite_dir / "A1" / "nih").iterdir())
    write_report([single], out=out)
    left = {p.name for p in (out / "tables").iterdir()}
    assert "C4-drop.md" not in left                              # the old report's own table: removed
    assert (out / "tables" / "C1-lowpass.md").read_text() == "my notes\n"  # the user's edit: kept
    record = json.loads((out / ".readingrace-written.json").read_text())["files"]
    assert "tables/C1-lowpass.md" not in record and "report.html" in record


def test_a_report_leaves_the_files_collect_wrote_in_the_same_folder(suite_dir, tmp_path):
    out = tmp_path / "both"
    collect([suite_dir], out=out)
    assert (out / "results.csv").is_file() and (out / "index.csv").is_file()
    write_report([suite_dir], out=out)
    write_report([next((suite_dir / "A1" / "nih").iterdir())], out=out)  # a smaller report replaces the first
    assert (out / "results.csv").is_file() and (out / "index.csv").is_file()  # collect's output untouched
