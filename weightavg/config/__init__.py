"""Hydra face: structured configs for the ``averaging`` group, registered by an explicit ``register_configs()``.

Each config is generated from its Lightning callback's signature (``builds``), so it lists every argument with its
default and never drifts; ``hydra.utils.instantiate`` builds the callback. Value checks happen in the constructor,
so a bad value fails with a message that names the field and its allowed range.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import functools
import inspect
import types
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from weightavg.core.settings import argument_types

GROUP = "averaging"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the config path, the field and what is allowed."""


def _config_type(annotation: Any) -> Any:
    """The type a structured config can hold for a constructor annotation: Literals become their values' type,
    sequences lists, a union its only config-able member (``str | os.PathLike[str]`` is ``str``); anything else
    (callables, modules, dtypes, several config-able members) ``Any``, which also takes a ``_target_`` node."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in (bool, int, float, str):
        return annotation
    if origin is Literal:
        values = {type(value) for value in args}
        return values.pop() if len(values) == 1 else Any
    if origin in (list, tuple, Sequence, collections.abc.Sequence) and args:
        item = _config_type(args[0])
        return list[item] if item is not Any else Any  # type: ignore[valid-type]
    if origin in (Union, types.UnionType):
        optional = type(None) in args
        members = [_config_type(arg) for arg in args if arg is not type(None)]
        if Any not in args:  # members a config cannot hold (a module, a dtype) leave the rest
            members = [member for member in members if member is not Any]
        if len(set(members)) != 1 or members[0] is Any:
            return Any
        return members[0] | None if optional else members[0]
    return Any


def builds(target: type, *, name: str, doc: str) -> type:
    """A structured config for ``target`` generated from its full signature (hydra-zen's
    ``builds(target, populate_full_signature=True)`` in a few lines): one field per constructor argument, with its
    default and a config-able type, and ``_target_`` naming ``target``. A new argument appears in the config."""
    hints = argument_types(target)
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, dataclasses.field(default=f"{target.__module__}.{target.__qualname__}"))
    ]
    for parameter in inspect.signature(target).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"{target.__qualname__} takes *{parameter.name}: its config cannot list its arguments")
        kind = _config_type(hints.get(parameter.name, Any))
        default = parameter.default
        if default is parameter.empty:
            spec = dataclasses.field(default=MISSING)
        elif isinstance(default, (list, tuple, dict)):
            spec = dataclasses.field(default_factory=functools.partial(copy.deepcopy, list(default)))
        else:
            spec = dataclasses.field(default=default)
        fields.append((parameter.name, kind, spec))
    for former in getattr(target, "__renamed_arguments__", {}):  # accepted for a release, with a FutureWarning
        fields.append((former, Any, dataclasses.field(default=None)))
    config = dataclasses.make_dataclass(name, fields)
    config.__module__, config.__doc__ = __name__, doc
    return config


def _callback(name: str) -> type:
    import weightavg.callbacks

    return getattr(weightavg.callbacks, name)  # type: ignore[no-any-return]


EMAConfig = builds(_callback("EMA"), name="EMAConfig", doc="``averaging=ema``: ``weightavg.callbacks.EMA``.")
SWAConfig = builds(_callback("SWA"), name="SWAConfig", doc="``averaging=swa``: ``weightavg.callbacks.SWA``.")
WiSEFTConfig = builds(
    _callback("WiSEFT"),
    name="WiSEFTConfig",
    doc="``averaging=wiseft``: ``weightavg.callbacks.WiSEFT`` (``metric`` may be a ``_target_`` node, e.g. a "
    "torchmetrics metric).",
)
ZSCLConfig = builds(
    _callback("ZSCL"),
    name="ZSCLConfig",
    doc="``averaging=zscl``: ``weightavg.callbacks.ZSCL`` (``reference`` may be a ``_target_`` node building a "
    "DataLoader; an app can also pass it when instantiating).",
)
LCSCConfig = builds(
    _callback("LCSC"),
    name="LCSCConfig",
    doc="``averaging=lcsc``: ``weightavg.callbacks.LCSC`` (``settings`` takes ``SearchSettings`` fields as a mapping; "
    "``metric`` may be a ``_target_`` node).",
)
EWAConfig = builds(
    _callback("EWA"),
    name="EWAConfig",
    doc="``averaging=ewa``: ``weightavg.callbacks.EWA`` (the model needs FFN submodules: the app's "
    "``model.arch=vit``).",
)
NoLoCoConfig = builds(
    _callback("NoLoCo"),
    name="NoLoCoConfig",
    doc="``averaging=noloco``: ``weightavg.callbacks.NoLoCo`` (run it with ``trainer.strategy=local_ddp`` and several "
    "``trainer.devices``; with one process it is an outer step on the replica alone).",
)
DiLoCoConfig = builds(
    _callback("DiLoCo"),
    name="DiLoCoConfig",
    doc="``averaging=diloco``: ``weightavg.callbacks.DiLoCo`` (with ``trainer.strategy=local_ddp``).",
)


#: The shipped options of the ``averaging`` group: name -> (config class, one-line description).
CONFIGS: dict[str, tuple[type, str]] = {
    "ema": (EMAConfig, "exponential moving average of the weights"),
    "swa": (SWAConfig, "stochastic weight averaging (equal-weight average after a start point)"),
    "wiseft": (WiSEFTConfig, "WiSE-FT: interpolate the weights at fit start and the fine-tuned ones, pick alpha"),
    "zscl": (ZSCLConfig, "ZSCL: weight ensemble per task (+ distillation from the original model)"),
    "lcsc": (LCSCConfig, "LCSC: snapshots combined at the end by evolutionary search (or soups, EMA, metric weights)"),
    "noloco": (NoLoCoConfig, "NoLoCo: replicas train alone and average with one random peer every H steps (p2p)"),
    "diloco": (DiLoCoConfig, "DiLoCo: replicas train alone; every H steps an all-reduced outer SGD step"),
    "ewa": (EWAConfig, "EWA: FFNs trained as random-partition mixtures of experts pulled together, merged at the end"),
}


def register_configs(store: ConfigStore | None = None) -> ConfigStore:
    """Register every averaging config in group ``averaging`` (plus ``none`` for no averaging).

    Call it once before ``@hydra.main`` runs (e.g. at import of your training script). Nothing registers on import.
    """
    store = store or ConfigStore.instance()
    for name, (node, _) in CONFIGS.items():
        store.store(group=GROUP, name=name, node=node)
    store.store(group=GROUP, name="none", node={})
    return store


def instantiate_averaging(config: Any, *, where: str = GROUP, **overrides: Any) -> Any:
    """Build the callback an ``averaging`` config describes; ``None`` for the ``none`` option. ``overrides`` are
    passed to the constructor (objects a config cannot hold, e.g. ZSCL's ``reference`` DataLoader).

    Raises:
        ConfigError: naming ``where`` (the config path) and the offending field, for any invalid value.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if config is None or "_target_" not in config:
        return None
    config = _former_names(config, where)
    try:
        return instantiate(config, **overrides)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise ConfigError(f"{where}: {cause}") from cause


def _former_names(config: Any, where: str) -> Any:
    """``config`` with the former names of renamed arguments moved to the new ones (with a FutureWarning naming
    both, as the Python faces give) and removed."""
    import warnings

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    try:
        renamed = getattr(get_class(str(config["_target_"])), "__renamed_arguments__", {})
    except Exception:  # an unknown target: instantiate reports it
        return config
    given = {old: new for old, new in renamed.items() if config.get(old) is not None}
    if not given:
        return config  # the former fields are None: the constructor takes them as not given
    node = OmegaConf.to_container(config, resolve=True)
    assert isinstance(node, dict)
    for old, new in renamed.items():
        value = node.pop(old, None)
        if old in given:
            warnings.warn(f"{where}.{old} is now {where}.{new}: {old} will be removed", FutureWarning, stacklevel=3)
            node[new] = value
    return OmegaConf.create(node)


__all__ = [
    "CONFIGS",
    "ConfigError",
    "GROUP",
    "builds",
    "EMAConfig",
    "SWAConfig",
    "WiSEFTConfig",
    "ZSCLConfig",
    "LCSCConfig",
    "EWAConfig",
    "NoLoCoConfig",
    "DiLoCoConfig",
    "instantiate_averaging",
    "register_configs",
]
