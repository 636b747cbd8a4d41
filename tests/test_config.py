from pathlib import Path

import pytest

from readingrace.config import ConfigError, config_from_dict, load_config, set_dotted

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_paper_recipe():
    cfg = config_from_dict({})
    assert cfg.split.ratios == [0.6, 0.1, 0.3] and cfg.split.seed == 2021
    assert cfg.train.lr == 1e-3 and cfg.train.lr_factor == 0.1 and cfg.train.lr_patience == 2
    assert cfg.train.augment.rotate == 15 and cfg.train.augment.zoom == 0.1 and cfg.train.augment.flip
    assert cfg.cohort.min_prevalence == 0.01


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.maxepochs"):
        config_from_dict({"train": {"maxepochs": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.max_epochs: expected an integer"):
        config_from_dict({"train": {"max_epochs": "many"}})
    with pytest.raises(ConfigError, match=r"train\.augment\.flip: expected true or false"):
        config_from_dict({"train": {"augment": {"flip": "yes"}}})


def test_impossible_split_ratios():
    with pytest.raises(ConfigError, match="split.ratios"):
        config_from_dict({"split": {"ratios": [0.6, 0.1, 0.2]}})


def test_extends_merges_and_child_wins(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_epochs: 7\n  batch_size: 16\nimage:\n  size: 32\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: c\ntrain:\n  max_epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.max_epochs, cfg.train.batch_size, cfg.image.size, cfg.name) == (3, 16, 32, "c")


def test_yaml_is_safe_loaded(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_fingerprint_ignores_name_but_not_training():
    a = config_from_dict({"name": "a"})
    b = config_from_dict({"name": "b"})
    c = config_from_dict({"name": "a", "train": {"max_epochs": 2}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_shipped_configs_load():
    for path in [*(ROOT / "examples").glob("*.yaml"), ROOT / "src" / "readingrace" / "configs" / "demo.yaml"]:
        load_config(path)


def test_set_dotted():
    assert set_dotted({}, "train.max_epochs", 3) == {"train": {"max_epochs": 3}}


def test_fingerprint_ignores_options_left_at_their_default():
    base = config_from_dict({"train": {"max_epochs": 3}})
    explicit = config_from_dict({"train": {"max_epochs": 3, "lr": 1e-3}, "evaluate": {"occlusion": False}})
    changed = config_from_dict({"train": {"max_epochs": 3, "lr": 1e-4}})
    assert base.fingerprint() == explicit.fingerprint() != changed.fingerprint()


def test_a_run_folders_config_yaml_loads_again(tmp_path):
    """The config.yaml a run writes (with its fingerprint and version) is itself a valid config."""
    import yaml

    cfg = config_from_dict({"cohort": {"source": "nih", "target": "sex"}, "train": {"max_epochs": 3}})
    written = tmp_path / "config.yaml"
    written.write_text(yaml.safe_dump({"fingerprint": cfg.fingerprint(), "readingrace": "0.1.0", **cfg.to_dict()}))
    again = load_config(written)
    assert again.fingerprint() == cfg.fingerprint() and again.train.max_epochs == 3


def test_a_bad_override_is_blamed_on_set_not_on_the_file(tmp_path):
    path = ROOT / "examples" / "nih_sex.yaml"
    with pytest.raises(ConfigError, match=r"^--set train\.max_epoch: unknown config key 'train\.max_epoch'"):
        load_config(path, overrides={"train": {"max_epoch": 3}})
    with pytest.raises(ConfigError, match=r"^--set train\.max_epochs: train\.max_epochs: expected an integer"):
        load_config(path, overrides={"train": {"max_epochs": "many"}})
    typo = tmp_path / "typo.yaml"
    typo.write_text("train: {maxepochs: 3}\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown config key 'train\.maxepochs'"):
        load_config(typo, overrides={"train": {"max_epochs": 3}})
