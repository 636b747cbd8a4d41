"""Bad configs: each fails before any work with exit status 2 and a message naming the key or file."""

from __future__ import annotations

from pathlib import Path

from .conftest import assert_user_error, csv_config, make_dataset, write_config


def cohort_cmd(cli, tmp_path: Path, config: Path, *extra: str):
    ds = make_dataset(tmp_path / "d")
    return cli("cohort", config, "--data-root", ds.root, "--out", tmp_path / "out", *extra)


def test_unknown_top_level_key(cli, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {**csv_config(), "trian": {"max_epochs": 1}})
    msg = assert_user_error(cohort_cmd(cli, tmp_path, cfg), "c.yaml", "unknown config key 'trian'", "allowed keys")
    assert "'train'" in msg


def test_unknown_nested_key(cli, tmp_path: Path) -> None:
    data = csv_config()
    data["train"]["max_epoch"] = 3
    cfg = write_config(tmp_path / "c.yaml", data)
    assert_user_error(cohort_cmd(cli, tmp_path, cfg), "unknown config key 'train.max_epoch'", "max_epochs")


def test_wrong_type(cli, tmp_path: Path) -> None:
    data = csv_config()
    data["train"]["max_epochs"] = "ten"
    cfg = write_config(tmp_path / "c.yaml", data)
    assert_user_error(cohort_cmd(cli, tmp_path, cfg), "c.yaml", "train.max_epochs: expected an integer", "'ten'")


def test_wrong_type_list(cli, tmp_path: Path) -> None:
    data = csv_config()
    data["split"]["ratios"] = 0.6
    cfg = write_config(tmp_path / "c.yaml", data)
    assert_user_error(cohort_cmd(cli, tmp_path, cfg), "split.ratios: expected a list")


def test_ratios_not_summing_to_one(cli, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", csv_config(ratios=[0.6, 0.1, 0.2]))
    assert_user_error(cohort_cmd(cli, tmp_path, cfg), "split.ratios", "summing to 1", "[0.6, 0.1, 0.2]")


def test_negative_ratio(cli, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", csv_config(ratios=[1.2, -0.1, -0.1]))
    assert_user_error(cohort_cmd(cli, tmp_path, cfg), "split.ratios", "positive")


def test_impossible_value(cli, tmp_path: Path) -> None:
    data = csv_config()
    data["train"]["batch_size"] = 0
    cfg = write_config(tmp_path / "c.yaml", data)
    assert_user_error(cohort_cmd(cli, tmp_path, cfg), "train.batch_size must be >= 1, got 0")


def test_set_override_wrong_type(cli, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", csv_config())
    assert_user_error(cohort_cmd(cli, tmp_path, cfg, "--set", "image.size=big"), "image.size: expected an integer")


def test_set_override_without_equals(cli, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", csv_config())
    assert_user_error(cohort_cmd(cli, tmp_path, cfg, "--set", "train.max_epochs"),
                      "--set 'train.max_epochs'", "KEY=VALUE")


def test_config_file_not_found(cli, tmp_path: Path) -> None:
    assert_user_error(cohort_cmd(cli, tmp_path, tmp_path / "missing.yaml"), "config file not found", "missing.yaml")


def test_invalid_yaml(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cohort: [source: csv\n  target: race\n")
    assert_user_error(cohort_cmd(cli, tmp_path, cfg), "c.yaml: not valid YAML")


def test_config_not_a_mapping(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("- just\n- a list\n")
    assert_user_error(cohort_cmd(cli, tmp_path, cfg), "c.yaml", "must be a mapping")


def test_extends_loop(cli, tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    assert_user_error(cohort_cmd(cli, tmp_path, tmp_path / "a.yaml"), "'extends' loops back")


def test_yaml_is_safe_loaded(cli, tmp_path: Path) -> None:
    """A YAML tag that would run code is refused as invalid YAML; the code never runs."""
    marker = tmp_path / "pwned"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    assert_user_error(cohort_cmd(cli, tmp_path, cfg), "c.yaml: not valid YAML")
    assert not marker.exists()


def test_unknown_model_name(cli, tmp_path: Path) -> None:
    from readingrace.errors import ConfigError
    from readingrace.models import build_model

    import pytest

    with pytest.raises(ConfigError, match="model.name 'resnet9000' is not known"):
        build_model("resnet9000", 3)


def test_unknown_model_name_in_the_config_fails_before_anything_is_written(cli, tmp_path: Path) -> None:
    from readingrace.config import MODEL_NAMES
    from readingrace.models import ARCHITECTURES

    ds = make_dataset(tmp_path, config=csv_config(model={"name": "resnet19"}))
    res = cli("run", ds.config, "--data-root", ds.root, "--out", tmp_path / "out")
    msg = assert_user_error(res, "model.name 'resnet19' is not known", "'resnet18'", "'resnet-tiny'")
    assert "training" not in res.err and not (tmp_path / "out").exists()
    assert str(sorted(ARCHITECTURES)) in msg and sorted(MODEL_NAMES) == sorted(ARCHITECTURES)
