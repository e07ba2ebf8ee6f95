"""Config: defaults, overrides, files, and errors that name the key and the valid choices."""

from __future__ import annotations

import pytest

from distnoisy.config import from_dict, load_config, save_config, to_dict
from distnoisy.core.errors import ConfigError


def test_defaults_are_the_documented_job() -> None:
    cfg = load_config([])
    assert (cfg.data.name, cfg.noise.kind, cfg.noise.rate, cfg.method.name) == (
        "digits",
        "symmetric",
        0.4,
        "elr",
    )
    assert (cfg.scaling.launcher, cfg.scaling.num_workers, cfg.scaling.use_gpu) == ("ray", 2, False)
    assert (cfg.method.beta, cfg.method.lam) == (0.7, 3.0)
    assert cfg.noise.instance_features == "raw"  # the authors' instance-noise law


def test_file_then_overrides_later_wins(tmp_path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("method:\n  name: elr\n  lam: 7.0\ntrain:\n  epochs: 5\n")
    cfg = load_config(["--config", str(f), "train.epochs=9", "train.milestones=[3,6]"])
    assert cfg.method.lam == 7.0 and cfg.train.epochs == 9 and cfg.train.milestones == [3, 6]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["trian.epochs=3"], "unknown config key 'trian'. Did you mean 'train'?"),
        (["train.epoch=3"], "Did you mean 'train.epochs'?"),
        (
            ["method.lamb=3"],
            "unknown config key 'method.lamb' for method 'elr'. Did you mean 'method.lam'?",
        ),
        (["method.name=ce", "method.lam=1"], "unknown config key 'method.lam' for method 'ce'"),
        (
            ["method.name=elr_pluss"],
            "unknown method 'elr_pluss'. Did you mean 'elr_plus'? Valid choices: backward, "
            "bootstrap, ce",
        ),
        (["train.epochs=ten"], "invalid value for 'train.epochs'"),
        (["noise.kind=gauss"], "valid choices: none, symmetric, pair, instance, file"),
        (
            ["noise.instance_features=pca"],
            "invalid noise.instance_features='pca'; valid choices: raw, standardized",
        ),
        (["method.beta=1.5"], "method.beta=1.5 must be in [0, 1)"),
        (["train.batch_size=65"], "train.batch_size=65 (the global batch) is not divisible by 2"),
        (["noise.kind=file"], "noise.kind=file needs noise.file=PATH"),
        (["epochs"], "cannot parse argument 'epochs'"),
        (["data.name=fashion_mnist", "data.train_size=-1"], "data.train_size must be >= 0"),
        (["data.train_size=100"], "data.train_size applies to data.name=fashion_mnist"),
        (
            ["data.name=fashion_mnist", "data.urls=/sets/fm", "data.train_size=100"],
            "a converted set has the size it was written with",
        ),
    ],
)
def test_bad_config_is_one_clear_error(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"Valid keys: train\.epochs, train\.batch_size"):
        load_config(["train.foo=1"])


def test_missing_and_invalid_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(["--config", str(bad)])


def test_saved_config_reloads_identically(tmp_path) -> None:
    cfg = load_config(["method.lam=5", "train.epochs=4", "seed=3"])
    assert from_dict(to_dict(cfg)) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == cfg
