"""C3 lung-only / non-lung test images wired into run_experiment, on generated cohorts with known truth.

Each generated image has four bright rectangles on a dark, noisy background: two "lungs" in the
upper half and two "decoys" in the lower half. The class changes only the brightness inside the
lungs (``signal=True``) or nothing (the null cohort). With the lungs as masks, lung-only images keep
the signal and non-lung images have none; with the decoys as masks (the reverse placement) it is
the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from readingrace.config import LungsConfig, config_from_dict
from readingrace.errors import CohortError, ConfigError, ReadingRaceError
from readingrace.experiments.run import run_experiment
from readingrace.explain.lungs import mask_quality, masks_for_test_images
from readingrace.report.collect import collect

SIZE = 32
LUNGS = ((5, 15, 4, 13), (5, 15, 19, 28))    # (y0, y1, x0, x1): upper left, upper right
DECOYS = ((19, 29, 4, 13), (19, 29, 19, 28))  # lower left, lower right


def boxes_mask(boxes, shift: tuple[int, int] = (0, 0), size: int = SIZE) -> np.ndarray:
    m = np.zeros((size, size), bool)
    for y0, y1, x0, x1 in boxes:
        m[y0 + shift[0]:y1 + shift[0], x0 + shift[1]:x1 + shift[1]] = True
    return m


def make_cohort(root: Path, *, n: int = 400, signal: bool = True, seed: int = 0) -> dict[str, Path]:
    """Images, a CSV manifest (one image per patient, sex F/M at random) and two mask lists.

    ``masks_lungs.csv`` lists the lung masks, ``masks_decoys.csv`` the decoy masks; each image is
    shifted by up to one pixel, and its masks with it.
    """
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "masks").mkdir()
    rows, lung_rows, decoy_rows = [], [], []
    for i in range(n):
        sex = "M" if rng.random() < 0.5 else "F"
        shift = tuple(int(v) for v in rng.integers(-1, 2, 2))
        lungs, decoys = boxes_mask(LUNGS, shift), boxes_mask(DECOYS, shift)
        img = rng.normal(0.1, 0.04, (SIZE, SIZE))
        img[decoys] = rng.normal(0.4, 0.05, int(decoys.sum()))
        level = 0.45 if not signal else (0.3 if sex == "F" else 0.6)
        img[lungs] = rng.normal(level, 0.05, int(lungs.sum()))
        name = f"im{i:04d}"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / "img" / f"{name}.png")
        Image.fromarray(lungs.astype(np.uint8) * 255).save(root / "masks" / f"{name}_lungs.png")
        Image.fromarray(decoys.astype(np.uint8) * 255).save(root / "masks" / f"{name}_decoys.png")
        rows.append({"image_id": name, "path": f"img/{name}.png", "patient_id": f"p{i}", "sex": sex})
        lung_rows.append({"image_id": name, "mask_path": f"masks/{name}_lungs.png"})
        decoy_rows.append({"image_id": name, "mask_path": f"masks/{name}_decoys.png"})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    pd.DataFrame(lung_rows).to_csv(root / "masks_lungs.csv", index=False)
    pd.DataFrame(decoy_rows).to_csv(root / "masks_decoys.csv", index=False)
    return {"root": root, "lungs": root / "masks_lungs.csv", "decoys": root / "masks_decoys.csv"}


def run_config(data: dict[str, Path], masks: str, *, epochs: int = 8, **lungs) -> dict:
    return {
        "name": f"c3-lungs-{masks}",
        "cohort": {"source": "csv", "target": "sex", "data_root": str(data["root"]), "min_prevalence": 0,
                   "options": {"csv": "cohort.csv"}},
        "split": {"ratios": [0.5, 0.1, 0.4]},   # 160 test images: the AUC's SE under the null is ~0.045
        "image": {"size": SIZE},
        "model": {"name": "resnet-tiny"},
        "train": {"batch_size": 32, "max_epochs": epochs, "early_stopping_patience": 3, "precision": "32",
                  "lr": 3e-3, "augment": {"flip": False, "rotate": 0, "zoom": 0}},
        "evaluate": {"n_bootstrap": 200, "reference": False, "gradcam_gallery": True, "occlusion": True,
                     "lungs": {"masks_csv": str(data[masks]), "gallery_images": 6, **lungs}},
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One model trained on the planted cohort, evaluated with lung masks and (reverse) with decoy masks."""
    data = make_cohort(tmp_path_factory.mktemp("planted"))
    out = {}
    for masks in ("lungs", "decoys"):
        run_dir = tmp_path_factory.mktemp(f"run-{masks}")
        out[masks] = (run_experiment(config_from_dict(run_config(data, masks)), out=run_dir, say=lambda m: None),
                      run_dir)
    return out


def macro(block: dict) -> float:
    return block["metrics"]["macro_auc"]


def test_signal_inside_the_mask_survives_lung_only_not_non_lung(planted):
    m, run_dir = planted["lungs"]
    lungs = m["localisation"]["lungs"]
    assert m["macro_auc"] > 0.95, m["macro_auc"]
    assert lungs["n_excluded"] == 0 and lungs["n_included"] == m["n_images"]
    assert lungs["mask_source"].startswith("user masks (masks_lungs.csv)") and "unet" not in lungs
    assert macro(lungs["original"]) == pytest.approx(m["macro_auc"])
    assert macro(lungs["lung_only"]) > 0.9, lungs["lung_only"]["metrics"]["macro_auc"]
    assert abs(macro(lungs["non_lung"]) - 0.5) < 0.15, lungs["non_lung"]["metrics"]["macro_auc_ci"]
    cmp_ = lungs["non_lung"]["comparison"]                       # paired: non-lung - original
    assert cmp_["macro_auc_b"] == pytest.approx(m["macro_auc"]) and cmp_["macro_difference_ci"][1] < -0.25
    assert lungs["non_lung_vs_lung_only"]["macro_difference_ci"][1] < 0
    for name in ("lung_only", "non_lung"):
        pred = pd.read_csv(run_dir / f"predictions_{name}.csv")
        assert len(pred) == m["n_images"] and {"image_id", "patient_id", "label", "prob_F", "prob_M"} <= set(pred)
    table = pd.read_csv(run_dir / "lung_masks.csv", keep_default_na=False)
    assert len(table) == m["n_images"] and set(table["mask_source"]) == {"user"}
    assert table["lung_fraction"].between(0.17, 0.18).all()     # 2 x 10 x 9 / 32^2 = 0.176
    assert (run_dir / "gallery_lung_masks.png").stat().st_size > 1000
    # the run's own report lists the three evaluations with their AUCs
    report = (run_dir / "report.md").read_text()
    assert "## The same model on changed test images" in report
    for label, key in (("lung-only", "lung_only"), ("non-lung", "non_lung")):
        block = lungs[key]["metrics"]
        assert f"| {label} | {block['n_images']} | {block['macro_auc']:.3f} [" in report
    assert "Non-lung minus lung-only" in report


def test_reverse_placement_non_lung_keeps_the_signal(planted):
    m, _ = planted["decoys"]
    lungs = m["localisation"]["lungs"]
    assert macro(lungs["non_lung"]) > 0.9, lungs["non_lung"]["metrics"]["macro_auc"]
    assert abs(macro(lungs["lung_only"]) - 0.5) < 0.15, lungs["lung_only"]["metrics"]["macro_auc_ci"]
    assert lungs["non_lung_vs_lung_only"]["macro_difference_ci"][0] > 0


def test_collect_puts_lung_evaluations_in_the_c3_test_time_table(planted, tmp_path):
    _, run_dir = planted["lungs"]
    result = collect([run_dir], out=tmp_path / "collected", figures=False)
    tidy = result.tidy[result.tidy["class"] == "macro"].set_index("test_perturbation")
    assert {"original, images with a usable lung mask", "lung-only images", "non-lung images"} <= set(tidy.index)
    assert tidy.loc["lung-only images", "auc"] > 0.9 and abs(tidy.loc["non-lung images", "auc"] - 0.5) < 0.15
    assert tidy.loc["lung-only images", "n_test_images"] == tidy.loc["", "n_test_images"]


def test_null_cohort_stays_at_chance_with_unet_masks(tmp_path):
    """No signal anywhere; masks from a U-Net trained at run time on 60 generated image/mask pairs."""
    data = make_cohort(tmp_path / "null", signal=False, seed=1)
    pd.DataFrame({"image": [f"img/im{i:04d}.png" for i in range(60)],
                  "mask": [f"masks/im{i:04d}_lungs.png" for i in range(60)]}).to_csv(data["root"] / "pairs.csv",
                                                                                   index=False)
    cfg = run_config(data, "lungs", epochs=3)
    cfg["evaluate"]["lungs"] = {"unet_pairs": str(data["root"] / "pairs.csv"), "unet_epochs": 25,
                                "unet_channels": [8, 16, 32], "gallery_images": 4}
    m = run_experiment(config_from_dict(cfg), out=tmp_path / "run", say=lambda m: None)
    lungs = m["localisation"]["lungs"]
    unet = lungs["unet"]
    assert unet["n_pairs"] == 60 and unet["n_heldout"] == 12 and unet["heldout_dice_mean"] > 0.8, unet
    assert unet["origin"] == "trained here on 60 pairs of pairs.csv" and unet["size"] == SIZE
    assert lungs["mask_source"] == f"U-Net masks for {m['n_images']} test images ({unet['origin']})"
    assert lungs["n_included"] >= 0.9 * m["n_images"], lungs["excluded"]
    assert lungs["n_included"] + lungs["n_excluded"] == m["n_images"]
    assert sum(lungs["excluded"].values()) == lungs["n_excluded"]
    for block in (lungs["original"], lungs["lung_only"], lungs["non_lung"]):   # 0.15 is over 3 SE here
        assert abs(block["metrics"]["macro_auc"] - 0.5) < 0.15, block["metrics"]["macro_auc_ci"]
    assert abs(lungs["non_lung_vs_lung_only"]["macro_difference"]) < 0.2


# -- masks: bad input, partial coverage, the quality rule ---------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("small"), n=40, seed=2)


def small_cohort(data: dict[str, Path]) -> tuple[pd.DataFrame, np.ndarray]:
    """The cohort table as a run sees it (paths resolved, cache_index) and its images at SIZE."""
    table = pd.read_csv(data["root"] / "cohort.csv", dtype=str)
    table["path"] = [str(data["root"] / p) for p in table["path"]]
    table["cache_index"] = np.arange(len(table))
    images = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p in table["path"]])
    return table, images


def find(data, tmp_path, positions, **settings):
    table, images = small_cohort(data)
    return masks_for_test_images(LungsConfig(**settings), cohort=table, test_positions=np.asarray(positions),
                                 images=images, images_key="test", cache_dir=tmp_path / "cache",
                                 say=lambda m: None)


def write_masks_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["image_id", "mask_path"]).to_csv(path, index=False)
    return path


def test_bad_mask_files_are_recorded_exclusions(small, tmp_path):
    root = small["root"]
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((SIZE, 2 * SIZE), 255, np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    big = np.kron(boxes_mask(LUNGS), np.ones((2, 2), bool)).astype(np.uint8) * 255
    Image.fromarray(big).save(tmp_path / "double.png")                       # same aspect, twice the size: resized
    csv = write_masks_csv(tmp_path / "m.csv", [
        ("im0000", str(root / "masks" / "im0000_lungs.png")), ("im0001", str(tmp_path / "gone.png")),
        ("im0002", str(tmp_path / "wide.png")), ("im0003", str(tmp_path / "empty.png")),
        ("im0004", str(tmp_path / "broken.png")), ("im0005", str(tmp_path / "double.png")),
        ("not-in-cohort", str(tmp_path / "empty.png"))])
    found = find(small, tmp_path, range(7), masks_csv=str(csv), missing="exclude")
    reasons = dict(zip(found.table["cache_index"], found.table["excluded"], strict=True))
    assert reasons[0] == "" and reasons[5] == "" and found.included.tolist() == [1, 0, 0, 0, 0, 1, 0]
    assert reasons[1].startswith("mask file missing") and reasons[4].startswith("mask unreadable")
    assert reasons[2] == f"mask size differs from the image: mask {2 * SIZE}x{SIZE}, image {SIZE}x{SIZE}"
    assert reasons[3] == "lung fraction below 0.1: 0.000"
    assert reasons[6].startswith("no mask: not in masks_csv")
    assert found.n_masks_not_in_cohort == 1 and found.unet is None
    assert found.excluded_counts() == {"lung fraction below 0.1": 1, "mask file missing": 1, "mask size differs "
                                       "from the image": 1, "mask unreadable": 1, "no mask": 1}
    np.testing.assert_array_equal(found.masks[5], boxes_mask(LUNGS))   # resized onto the image


def test_mask_list_errors_name_the_problem(small, tmp_path):
    with pytest.raises(CohortError, match="lung masks file not found"):
        find(small, tmp_path, [0], masks_csv=str(tmp_path / "none.csv"))
    (tmp_path / "cols.csv").write_text("id,file\na,b\n")
    with pytest.raises(CohortError, match="needs columns image_id, mask_path"):
        find(small, tmp_path, [0], masks_csv=str(tmp_path / "cols.csv"))
    csv = write_masks_csv(tmp_path / "dup.csv", [("im0000", "a.png"), ("im0000", "b.png")])
    with pytest.raises(CohortError, match="'im0000' is listed 2 times"):
        find(small, tmp_path, [0], masks_csv=str(csv))
    csv = write_masks_csv(tmp_path / "foreign.csv", [("x1", "a.png"), ("x2", "b.png")])
    with pytest.raises(CohortError, match="none of its 2 image_id values is in the cohort"):
        find(small, tmp_path, [0], masks_csv=str(csv))
    csv = write_masks_csv(tmp_path / "few.csv", [("im0000", str(small["root"] / "masks" / "im0000_lungs.png"))])
    with pytest.raises(ConfigError, match="only 1 usable user mask"):
        find(small, tmp_path, [0, 1], masks_csv=str(csv))               # im0001 needs a U-Net, none to train
    with pytest.raises(ConfigError, match="unet_pairs .* or unet_weights .*, not both"):
        LungsConfig(unet_pairs="a.csv", unet_weights="b.pt")
    with pytest.raises(ConfigError, match="evaluate.lungs.missing"):
        config_from_dict({"evaluate": {"lungs": {"masks_csv": "m.csv", "missing": "drop"}}})
    with pytest.raises(ConfigError, match="unet_size must be a positive multiple of 8"):
        LungsConfig(unet_pairs="a.csv", unet_size=36)


def test_lungs_defaults_leave_fingerprints_unchanged():
    base = config_from_dict({"train": {"max_epochs": 3}})
    assert not base.evaluate.lungs.enabled
    assert base.fingerprint() == config_from_dict({"train": {"max_epochs": 3},
                                                   "evaluate": {"lungs": {"unet_epochs": 20}}}).fingerprint()
    on = config_from_dict({"train": {"max_epochs": 3}, "evaluate": {"lungs": {"unet_pairs": "p.csv"}}})
    assert on.evaluate.lungs.enabled and on.fingerprint() != base.fingerprint()


def test_quality_rule_two_lungs_and_fraction():
    one_side = boxes_mask(((5, 29, 2, 8), (5, 29, 9, 14)))                 # two regions, both left of the midline
    one_blob = boxes_mask(((5, 25, 4, 28),))
    too_big = np.ones((SIZE, SIZE), bool)
    lung_and_arm = boxes_mask(((2, 16, 18, 26), (12, 30, 2, 8)))            # rows overlap 4 of 14
    q = mask_quality(np.stack([boxes_mask(LUNGS), one_side, one_blob, too_big, lung_and_arm]))
    assert q["excluded"].iloc[0] == "" and q["n_regions"].tolist() == [2, 2, 1, 1, 2]
    assert q["excluded"].iloc[4] == "lung regions not side by side: rows overlap 0.29 of the shorter one"
    assert q["excluded"].iloc[1].startswith("both lung regions on one side")
    assert q["excluded"].iloc[2] == "not two lung regions: 1"
    assert q["excluded"].iloc[3] == "lung fraction above 0.5: 1.000"
    assert mask_quality(one_blob[None], two_lungs=False)["excluded"].iloc[0] == ""


def test_partial_user_masks_train_a_unet_for_the_rest(small, tmp_path):
    """Masks for 30 of 40 images: a U-Net is trained on them (cached) and predicts the 10 without one."""
    root = small["root"]
    csv = write_masks_csv(tmp_path / "part.csv", [(f"im{i:04d}", str(root / "masks" / f"im{i:04d}_lungs.png"))
                                                  for i in range(30)])
    settings = {"masks_csv": str(csv), "unet_epochs": 25, "unet_channels": [8, 16, 32], "unet_batch_size": 8,
                "min_lung_fraction": 0.05}
    found = find(small, tmp_path, range(25, 40), **settings)
    src = found.table["mask_source"].tolist()
    assert src == ["user"] * 5 + ["unet"] * 10
    assert found.unet["n_pairs"] == 30 and found.unet["cached"] is False
    assert "trained here on 30 usable user masks" in found.unet["origin"]
    truth = np.stack([np.asarray(Image.open(root / "masks" / f"im{i:04d}_lungs.png")) > 0 for i in range(30, 40)])
    from readingrace.explain.lungs import dice_scores

    assert dice_scores(found.masks[5:], truth).mean() > 0.8
    again = find(small, tmp_path, range(25, 40), **settings)                 # same pairs, same settings: reused
    assert again.unet["cached"] is True and again.unet["key"] == found.unet["key"]
    np.testing.assert_array_equal(again.masks, found.masks)
    report = json.loads((tmp_path / "cache" / "unet" / found.unet["key"] / "lung_unet_report.json").read_text())
    assert report["n_heldout"] == found.unet["n_heldout"] == 6


# -- Grad-CAM galleries draw the occlusion box ---------------------------------------------------
def test_gallery_draws_boxes_on_pixel_edges():
    from readingrace.explain.gallery import gallery_figure

    imgs = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    boxes = np.array([[2, 9, 4, 16], [0, 0, 0, 0], [0, 16, 0, 16]])
    fig = gallery_figure(imgs, None, ["a", "b", "c"], boxes=boxes, outlines=imgs > 0.5)
    drawn = [[p for p in ax.patches if p.get_gid() == "hot_box"] for ax in fig.axes]
    assert [len(d) for d in drawn] == [1, 0, 1]                            # the empty box draws nothing
    for (y0, y1, x0, x1), patches in zip(boxes[[0, 2]], (drawn[0], drawn[2]), strict=True):
        (x, y), w, h = patches[0].get_xy(), patches[0].get_width(), patches[0].get_height()
        assert (x, y, w, h) == (x0 - 0.5, y0 - 0.5, x1 - x0, y1 - y0)
    assert len(fig.axes[0].collections) == 1                              # the mask outline (a contour)
    with pytest.raises(ReadingRaceError, match="boxes must have shape"):
        gallery_figure(imgs, None, ["a", "b", "c"], boxes=boxes[:2])


def test_gallery_two_line_captions_fit_their_tile():
    """The lung-mask gallery's "#741 ..., lung 0.14\nexcluded: ..." captions overlap neither the image above
    nor the tiles beside them."""
    from readingrace.explain.gallery import gallery_figure

    imgs = np.random.default_rng(0).random((12, 64, 64)).astype(np.float32)
    titles = [f"#{k} unet, lung 0.2{k % 10}" + ("\nexcluded: both lung regions on one side of the midline"
                                                if k in (3, 9) else "") for k in range(12)]
    fig = gallery_figure(imgs, None, titles, ncols=6, suptitle="lung masks of test images (U-Net masks)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    images = [ax.get_window_extent(renderer) for ax in fig.axes]
    for k, ax in enumerate(fig.axes):
        box = ax.title.get_window_extent(renderer)
        assert box.width <= images[k].width * 1.05, (k, ax.get_title())            # no wider than its tile
        for j, other in enumerate(images):
            assert j == k or not box.overlaps(other), (k, j, ax.get_title())    # on no other image
        assert box.y0 >= images[k].y1 - 1                                      # above its own image
    assert "excluded: both lung regions on one side" in fig.axes[9].get_title().replace("\n", " ")


class BrightIsA(torch.nn.Module):
    """Features (x, 1 - x); logit k = mean of feature k: Grad-CAM of class A is the image itself."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.features.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def prepare_input(self, x: torch.Tensor, index=None) -> torch.Tensor:
        return x


def test_gradcam_galleries_draw_the_box_the_occlusion_test_computes(monkeypatch, tmp_path):
    import readingrace.explain.gallery as gallery_module
    from readingrace.explain.gradcam import occlusion_test

    images = np.full((3, 24, 24), 0.6, np.float32)
    images[0, 3:9, 10:20] = 1.0                                           # bright box: class A, heat = image
    images[1, 12:20, 2:7] = 0.95
    images[2] = 0.3                                                       # dark image: class B
    images[2, 0:4, :] = 0.0
    table = pd.DataFrame({"image_id": list("abc"), "patient_id": list("pqr"), "label": ["A", "A", "B"],
                          "prob_A": [0.9, 0.8, 0.2], "prob_B": [0.1, 0.2, 0.8], "cache_index": [0, 1, 2]})
    drawn = {}
    real = gallery_module.gallery

    def spy(images_, heat, titles, path, **kw):
        drawn[Path(path).name] = np.asarray(kw["boxes"])
        return real(images_, heat, titles, path, **kw)

    monkeypatch.setattr(gallery_module, "gallery", spy)
    files = gallery_module.gradcam_galleries(BrightIsA(), images, table, ["A", "B"], tmp_path, box_threshold=0.65)
    assert sorted(f.name for f in files) == ["gradcam_A_correct.png", "gradcam_B_correct.png"]
    occ = occlusion_test(BrightIsA(), images, np.arange(3), ["A", "A", "B"], ["A", "B"], threshold=0.65)
    computed = occ["boxes"][["y0", "y1", "x0", "x1"]].to_numpy()
    assert computed.tolist() == [[3, 9, 10, 20], [12, 20, 2, 7], [0, 4, 0, 24]]
    np.testing.assert_array_equal(drawn["gradcam_A_correct.png"], computed[[0, 1]])   # most confident first
    np.testing.assert_array_equal(drawn["gradcam_B_correct.png"], computed[[2]])
    drawn.clear()
    gallery_module.gradcam_galleries(BrightIsA(), images, table, ["A", "B"], tmp_path)
    assert set(drawn) == {"gradcam_A_correct.png", "gradcam_B_correct.png"}
    assert all(b.ndim == 0 and b.item() is None for b in drawn.values())  # no threshold: no boxes
