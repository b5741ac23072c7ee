"""Hydra face: structured configs for the ``averaging`` group, registered by an explicit ``register_configs()``.

Each config mirrors its Lightning callback's constructor field for field (a test checks the names and defaults
against the signature) and instantiates it with ``hydra.utils.instantiate``. Value checks happen in the constructor,
so a bad value fails with a message that names the field and its allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from weightavg.methods.wiseft import ALPHAS

GROUP = "averaging"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the config path, the field and what is allowed."""


@dataclass
class AveragingConfig:
    """Options every averaging callback takes (see ``weightavg.callbacks.AveragingCallback``)."""

    validate_with: str = "average"
    apply_at_end: bool = True
    export_path: str | None = None
    name: str | None = None
    buffers: str = "average"
    include: list[str] | None = None
    exclude: list[str] | None = None
    device: str | None = None
    dtype: str | None = None
    contiguous: bool = False
    nonfinite: str = "warn"
    checkpoint_weights: str = "average"
    resume_from_average: bool = False


@dataclass
class EMAConfig(AveragingConfig):
    """``averaging=ema``: ``weightavg.callbacks.EMA``."""

    _target_: str = "weightavg.callbacks.EMA"
    decay: float | None = None
    half_life: float | None = None
    warmup: str = "power"
    gamma: float = 1.0
    power: float = 2 / 3
    every_n_steps: int = 1
    start_step: int = 0
    scale_decay: bool = True


@dataclass
class SWAConfig(AveragingConfig):
    """``averaging=swa``: ``weightavg.callbacks.SWA``."""

    _target_: str = "weightavg.callbacks.SWA"
    start: float = 0.75
    start_unit: str = "fraction"
    every: int = 1
    every_unit: str = "epoch"
    recompute_bn: bool = True
    bn_batches: int | None = None


@dataclass
class WiSEFTConfig:
    """``averaging=wiseft``: ``weightavg.callbacks.WiSEFT`` (``metric`` may be a ``_target_`` node, e.g. a
    torchmetrics metric)."""

    _target_: str = "weightavg.callbacks.WiSEFT"
    alphas: list[float] = field(default_factory=lambda: list(ALPHAS))
    alpha: float | None = None
    select_on: Any = 0
    monitor: str | None = None
    mode: str = "max"
    metric: Any = None
    dataloader_names: list[str] | None = None
    anchor: str | None = None
    apply_at_end: bool = True
    export_path: str | None = None
    figure_path: str | None = None
    progress: bool = True
    name: str | None = None
    buffers: str = "average"
    include: list[str] | None = None
    exclude: list[str] | None = None
    device: str | None = None


@dataclass
class ZSCLConfig(AveragingConfig):
    """``averaging=zscl``: ``weightavg.callbacks.ZSCL`` (``reference`` may be a ``_target_`` node building a
    DataLoader; an app can also pass it when instantiating)."""

    _target_: str = "weightavg.callbacks.ZSCL"
    every_n_steps: int = 100
    reference: Any = None
    distill_weight: float = 1.0
    temperature: float = 2.0
    teacher: str | None = None


@dataclass
class LCSCConfig:
    """``averaging=lcsc``: ``weightavg.callbacks.LCSC`` (``settings`` takes ``SearchSettings`` fields as a mapping;
    ``metric`` may be a ``_target_`` node)."""

    _target_: str = "weightavg.callbacks.LCSC"
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    keep: int | None = 12
    directory: str | None = None
    background: bool = False
    overwrite: bool = False
    method: str = "lcsc"
    monitor: str | None = None
    metric: Any = None
    mode: str = "max"
    search_on: int = 0
    settings: Any = None
    decay: float = 0.9
    penalty: float = 1.0
    by: str = "loss"
    metric_key: str = "train_loss"
    rule: str = "strict"
    apply_at_end: bool = True
    export_path: str | None = None
    result_path: str | None = None
    dtype: str = "float32"
    progress: bool = True
    recompute_bn: bool = True
    bn_batches: int | None = None
    name: str | None = None
    buffers: str = "average"
    include: list[str] | None = None
    exclude: list[str] | None = None


@dataclass
class EWAConfig:
    """``averaging=ewa``: ``weightavg.callbacks.EWA`` (the model needs FFN submodules: the app's ``model.arch=vit``)."""

    _target_: str = "weightavg.callbacks.EWA"
    beta: float = 0.3
    ramp_steps: int = 0
    select: Any = None
    num_experts: int = 4
    seed: int | None = 0
    merge_at_end: bool = True
    export_path: str | None = None
    log_spread: bool = True
    name: str | None = None


@dataclass
class NoLoCoConfig:
    """``averaging=noloco``: ``weightavg.callbacks.NoLoCo`` (run it with ``trainer.strategy=local_ddp`` and several
    ``trainer.devices``; with one process it is an outer step on the replica alone)."""

    _target_: str = "weightavg.callbacks.NoLoCo"
    sync_every: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.5
    group_size: int = 2
    mixing: float | None = None
    seed: int = 0
    average_at_end: bool = False
    log_traffic: bool = True
    validate_with: str = "live"
    export_path: str | None = None
    name: str | None = None
    dtype: str | None = None


@dataclass
class DiLoCoConfig:
    """``averaging=diloco``: ``weightavg.callbacks.DiLoCo`` (with ``trainer.strategy=local_ddp``)."""

    _target_: str = "weightavg.callbacks.DiLoCo"
    sync_every: int = 500
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    average_at_end: bool = False
    log_traffic: bool = True
    validate_with: str = "live"
    export_path: str | None = None
    name: str | None = None
    dtype: str | None = None


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
    try:
        return instantiate(config, **overrides)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise ConfigError(f"{where}: {cause}") from cause


__all__ = [
    "CONFIGS",
    "ConfigError",
    "GROUP",
    "AveragingConfig",
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
