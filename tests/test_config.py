from __future__ import annotations

import pytest

from deepmetric.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dumps_toml,
    load_config,
    validate_components,
)
from deepmetric.errors import ConfigError


def test_defaults_are_the_default_job() -> None:
    c = Config()
    assert c.data.name == "fashion_mnist" and c.data.protocol == "closed"
    assert c.model.name == "small_cnn"
    assert c.loss.name == "triplet_margin" and c.miner is not None and c.miner.name == "semi_hard"
    assert [(e.name, e.args["weight"]) for e in c.extra_losses] == [("uniformity", 0.3)]
    assert c.sampler.name == "m_per_class"
    # replacing the loss drops the default's extra term unless extra_losses is given
    assert config_from_dict({"loss": {"name": "contrastive"}}).extra_losses == ()
    # ... and its miner, unless [miner] is given
    assert config_from_dict({"loss": {"name": "contrastive"}}).miner is None
    kept_miner = config_from_dict({"loss": {"name": "contrastive"}, "miner": {"name": "hard"}}).miner
    assert kept_miner is not None and kept_miner.name == "hard"
    tuned = config_from_dict({"miner": {"margin": 0.3}}).miner
    assert tuned is not None and tuned.name == "semi_hard" and tuned.args == {"fallback": "easiest", "margin": 0.3}
    assert Config().miner.args == {"fallback": "easiest"}  # type: ignore[union-attr]
    kept = config_from_dict({"loss": {"name": "contrastive"}, "extra_losses": [{"name": "center", "weight": 0.1}]})
    assert [e.name for e in kept.extra_losses] == ["center"]
    none = config_from_dict({"extra_losses": []})
    assert none.extra_losses == () and config_from_dict(apply_overrides({}, [])) == Config()


def test_unknown_top_level_key_names_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown top-level key 'bogus'.*data"):
        config_from_dict({"bogus": 1})


def test_unknown_section_key_names_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' in \[optim\].*lr, weight_decay"):
        config_from_dict({"optim": {"lrr": 0.1}})


def test_type_errors() -> None:
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        config_from_dict({"train": {"epochs": "many"}})
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        config_from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="must be true or false"):
        config_from_dict({"data": {"augment": 1}})


def test_component_kwargs_merge_and_switch() -> None:
    c = config_from_dict({"sampler": {"batch_size": 64}})
    assert dict(c.sampler.args) == {"m": 32, "batch_size": 64}
    raw = apply_overrides({}, ['loss.name="contrastive"', "loss.margin=0.5", 'miner.name="none"'])
    c = config_from_dict(raw)
    assert c.loss.name == "contrastive" and dict(c.loss.args) == {"margin": 0.5}
    assert c.miner is None


def test_overrides_parse_toml_values_and_fall_back_to_strings() -> None:
    raw = apply_overrides({}, ["seed=3", "data.protocol=disjoint", "eval.ks=[1, 5]", "train.amp=true"])
    c = config_from_dict(raw)
    assert c.seed == 3 and c.data.protocol == "disjoint" and c.eval.ks == (1, 5) and c.train.amp is True
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["nonsense"])


def test_roundtrip_through_toml(tmp_path) -> None:
    c = config_from_dict(apply_overrides({}, ["loss.alpha=3.0", "model.embedding_dim=32", "eval.ks=[1,2]"]))
    path = tmp_path / "c.toml"
    path.write_text(dumps_toml(config_to_dict(c)))
    assert load_config(path) == c


def test_missing_and_invalid_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nname=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_validate_components_rejects_unknown_names_and_kwargs() -> None:
    import deepmetric.losses  # noqa: F401
    import deepmetric.miners  # noqa: F401
    import deepmetric.models  # noqa: F401
    import deepmetric.samplers  # noqa: F401

    with pytest.raises(ConfigError, match="unknown loss 'tripletz'.*Valid loss names"):
        validate_components(config_from_dict({"loss": {"name": "tripletz"}, "miner": "none"}))
    with pytest.raises(ConfigError, match="unknown argument.*'marginn'.*valid arguments"):
        validate_components(config_from_dict({"loss": {"name": "contrastive", "marginn": 1.0}, "miner": "none"}))
    with pytest.raises(ConfigError, match="data.protocol"):
        validate_components(config_from_dict({"data": {"protocol": "open"}}))
    validate_components(Config())
    # an optional num_classes (the margin loss's per-class beta) may be set; a required one is the trainer's
    validate_components(config_from_dict({"loss": {"name": "margin", "num_classes": 5}, "miner": "none"}))
    with pytest.raises(ConfigError, match="unknown argument.*'num_classes'"):
        validate_components(config_from_dict({"loss": {"name": "proxy_anchor", "num_classes": 5}, "miner": "none"}))
