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
from readingrace.report.collect import collect
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


def _run(root: Path, rel: str, auc: float, *, perturb=None) -> None:
    d = root / rel
    d.mkdir(parents=True)
    cfg = ExperimentConfig()
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
    assert c4.loc[(c4["row"] == 2) & (c4["col"] == 2), "macro"].item() == "0.840 [0.790, 0.890]"
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
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="rr-check">(.*?)</pre>', res.stdout, re.S)
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
