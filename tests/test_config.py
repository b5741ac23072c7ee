"""The Hydra face: every shipped config mirrors its constructor and builds; bad values name the field."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest
from hydra.core.config_store import ConfigStore
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from weightavg.callbacks import AveragingCallback
from weightavg.config import CONFIGS, ConfigError, instantiate_averaging, register_configs

#: Constructor arguments that are Python callables: no config can hold them.
CALLABLES = {"bn_input", "forward", "reference_input"}


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of a callback: its own, plus those it forwards to AveragingCallback via ``**options``."""
    signature = inspect.signature(cls).parameters
    own = {k: v for k, v in signature.items() if v.kind is not v.VAR_KEYWORD}
    if not any(v.kind is v.VAR_KEYWORD for v in signature.values()):
        return own
    shared = {k: v for k, v in inspect.signature(AveragingCallback).parameters.items() if k != "rule"}
    return {**shared, **own}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_mirrors_the_constructor(name: str) -> None:
    node, _ = CONFIGS[name]
    fields = {f.name: f for f in dataclasses.fields(node) if f.name != "_target_"}
    target = OmegaConf.structured(node)._target_
    module, _, attr = target.rpartition(".")
    cls = getattr(__import__(module, fromlist=[attr]), attr)
    params = constructor_parameters(cls)
    configurable = {k for k in params if k not in CALLABLES}
    assert set(fields) == configurable
    built = OmegaConf.structured(node)
    for key in fields:
        default = params[key].default
        value = OmegaConf.to_object(built[key]) if OmegaConf.is_config(built[key]) else built[key]
        if isinstance(default, tuple):
            value = tuple(value)
        assert value == default, f"{name}.{key}: config {value!r} != {default!r}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_shipped_config_builds_and_pickles(name: str) -> None:
    callback = instantiate_averaging(OmegaConf.structured(CONFIGS[name][0]))
    if isinstance(callback, AveragingCallback):
        assert pickle.loads(pickle.dumps(callback.rule)) == callback.rule
    else:  # EWA changes the model instead of averaging it: a plain Lightning callback
        assert isinstance(callback, Callback)
        assert repr(pickle.loads(pickle.dumps(callback))) == repr(callback)


def test_register_configs_is_explicit_and_complete() -> None:
    store = register_configs(ConfigStore.instance())
    group = store.repo["averaging"]
    assert {f"{name}.yaml" for name in CONFIGS} | {"none.yaml"} <= set(group)


def test_bad_value_names_path_field_and_range() -> None:
    node = OmegaConf.structured(CONFIGS["ema"][0])
    node.decay = 1.5
    with pytest.raises(ConfigError, match=r"averaging: decay=1\.5 is out of range: allowed \[0, 1\)"):
        instantiate_averaging(node)
    swa = OmegaConf.structured(CONFIGS["swa"][0])
    swa.every_unit = "minute"
    with pytest.raises(ConfigError, match="every_unit='minute'"):
        instantiate_averaging(swa, where="extra_averaging.swa")


def test_unknown_field_is_refused_by_the_structured_config() -> None:
    node = OmegaConf.structured(CONFIGS["ema"][0])
    with pytest.raises(Exception, match="decy"):
        node.decy = 0.9


def test_ewa_config_checks_its_share_rate() -> None:
    node = OmegaConf.structured(CONFIGS["ewa"][0])
    node.beta = 0.9
    with pytest.raises(ConfigError, match=r"averaging: beta=0\.9 is out of range"):
        instantiate_averaging(node)
