"""Every face's constructors refuse bad arguments when they are built (or, where the Trainer is needed, at fit start)
with a ``TypeError``/``ValueError`` whose message names the argument.

The cases are built from ``inspect.signature`` of each constructor: every parameter gets bad values from its type
(bools given as strings, NaN/inf, wrong types, unknown choices) plus the out-of-range values listed per name below,
so a new argument is fuzzed as soon as it exists (one whose type gives no bad value fails ``test_every_argument_is_
fuzzed`` until it is listed here).
"""

from __future__ import annotations

import inspect
import math
import os
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import weightavg.callbacks as cb
import weightavg.optim as wo
from tests.helpers import digits_loaders, trainer
from weightavg.config import CONFIGS, instantiate_averaging
from weightavg.core.settings import argument_types
from weightavg.ewa import to_moe

NAN, INF = math.nan, math.inf
UNWRITABLE = "/proc/weightavg-test/average.safetensors"  # /proc refuses new files, even to root

#: Out-of-range and otherwise wrong values per argument name, beyond those its type gives.
BY_NAME: dict[str, list[Any]] = {
    "decay": [1.0, -0.1],
    "half_life": [0.0, -1.0],
    "every_n_steps": [0, -1],
    "start_step": [-1],
    "gamma": [0.0],
    "power": [0.0],
    "start": [-0.5, 1.5],
    "every": [0],
    "bn_batches": [0],
    "keep": [0],
    "num_experts": [1],
    "beta": [-0.1, 0.9],
    "ramp_steps": [-1],
    "sync_every": [0],
    "outer_lr": [0.0],
    "outer_momentum": [1.0],
    "group_size": [1],
    "mixing": [-1.0],
    "select_on": [-1, 1.5],
    "distill_weight": [-1.0],
    "temperature": [0.0],
    "total_steps": [0],
    "search_on": [-1],
    "every_n_epochs": [0],
    "penalty": [-1.0],
    "alphas": ["0.5", [], [NAN], [0.5, 0.5]],
    "alpha": [NAN, "0.5"],
    "export_path": [5, "", ".", "/etc/hostname/average.safetensors", UNWRITABLE],
    "figure_path": [5, ".", UNWRITABLE],
    "result_path": [5, "."],
    "directory": [5, "/etc/hostname"],
    "anchor": [5, "missing.safetensors"],
    "teacher": [5],
    "dtype": ["float8", "int32", 5, torch.int64],
    "device": ["meta", "nonsense", 5, True, "cuda:99"],
    "name": ["", 5],
    "include": [5, [5]],
    "exclude": [5, [5]],
    "select": [5, [5]],
    "settings": [5],
    "metric": [5],
    "reference": [5, torch.zeros(3)],
    "process_group": [5, "world"],
    "seed": ["0", 1.5],
    "optimizer": [5, "sgd"],
    "module": ["model", 5],
    "model": ["model", 5],
    "monitor": [5, ""],
    "metric_key": [5, ""],
    "dataloader_names": ["a", [5], ["a", "a"]],
    "buffers": ["all", 5],
}


def bad_values(name: str, annotation: Any) -> list[Any]:
    """The values ``name`` must refuse: those of its type, then those of its name."""
    options = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, type(int | None))
        else (annotation,)
    )
    values: list[Any] = []
    for option in options:
        if option is bool:
            values += ["false", "true", 1, None]
        elif option is int:
            values += ["3", True]
        elif option is float:
            values += [NAN, INF, "0.5", True]
        elif typing.get_origin(option) is typing.Literal:
            values += ["nonsense", 7]
        elif typing.get_origin(option) is Callable or option is Callable:
            values += [5]
    if int in options and float not in options:
        values.append(2.5)
    return [*values, *BY_NAME.get(name, [])]


def parameters(cls: type, shared: type | None, skip: set[str]) -> dict[str, Any]:
    """Name -> annotation of ``cls``'s constructor, with what it forwards through ``**options`` to ``shared``."""
    own = inspect.signature(cls).parameters
    hints = argument_types(cls)
    found = {n: hints.get(n, Any) for n, p in own.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if shared is not None and any(p.kind is p.VAR_KEYWORD for p in own.values()):
        shared_hints = typing.get_type_hints(shared.__init__)
        for n, p in inspect.signature(shared).parameters.items():
            if n not in found and p.kind is p.KEYWORD_ONLY:
                found[n] = shared_hints.get(n, Any)
    return {n: a for n, a in found.items() if n not in skip}


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def _optim(cls: type, **kwargs: Any) -> Any:
    """Build an optimizer wrapper on a fresh model (NoLoCo re-homes its tensors), with valid required arguments."""
    if cls is wo.EWA:
        model = nn.Sequential(_Block(), _Block())
        to_moe(model, "*.mlp", num_experts=2)
        base: dict[str, Any] = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "model": model}
    else:
        model = _model()
        base = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
        if cls in (wo.WiSEFT, wo.LCSC):
            base["module"] = model
        if cls is wo.LCSC:
            base["every_n_steps"] = 2
            base["directory"] = ":memory:"
    return cls(**{**base, **kwargs})


CALLBACK_BASE: dict[type, dict[str, Any]] = {cb.WiSEFT: {"monitor": "val_acc"}}
CALLBACKS = [cb.EMA, cb.SWA, cb.WiSEFT, cb.ZSCL, cb.LCSC, cb.EWA, cb.NoLoCo, cb.DiLoCo]
OPTIMIZERS = [wo.EMA, wo.SWA, wo.WiSEFT, wo.ZSCL, wo.LCSC, wo.EWA, wo.NoLoCo, wo.DiLoCo]
Builder = Callable[[dict[str, Any]], Any]


def _faces() -> list[tuple[str, Builder, dict[str, Any]]]:
    faces: list[tuple[str, Builder, dict[str, Any]]] = []
    for cls in CALLBACKS:
        base = CALLBACK_BASE.get(cls, {})
        faces.append(
            (
                f"callbacks.{cls.__name__}",
                lambda kw, c=cls, b=base: c(**{**b, **kw}),
                parameters(cls, cb.AveragingCallback, {"rule"}),
            )
        )
    for cls in OPTIMIZERS:
        faces.append(
            (
                f"optim.{cls.__name__}",
                lambda kw, c=cls: _optim(c, **kw),
                parameters(cls, wo.AveragingOptimizer, {"rule"}),
            )
        )
    return faces


FACES = _faces()
CASES = [
    pytest.param(face, build, name, value, id=f"{face}-{name}={value!r}"[:120])
    for face, build, params in FACES
    for name, annotation in params.items()
    for value in bad_values(name, annotation)
]


def assert_names(error: BaseException, name: str) -> None:
    assert isinstance(error, (TypeError, ValueError, FileNotFoundError)), repr(error)
    assert name in str(error), f"the message does not name {name!r}: {error}"


@pytest.mark.parametrize(("face", "build", "name", "value"), CASES)
def test_bad_argument_is_refused_at_construction(face: str, build: Builder, name: str, value: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as caught:  # type checked by assert_names
            build({name: value})
    assert_names(caught.value, name)


def test_every_argument_is_fuzzed() -> None:
    missing = [
        f"{face}({name})" for face, _, params in FACES for name, ann in params.items() if not bad_values(name, ann)
    ]
    assert not missing, f"add bad values for these arguments to BY_NAME: {missing}"


def test_valid_defaults_build() -> None:
    for _, build, _ in FACES:  # the baseline each case changes one argument of is itself valid
        build({})


# ---------------------------------------------------------------- the Hydra face, through hydra.utils.instantiate
def _config_cases() -> list[Any]:
    cases = []
    for key, (node, _) in sorted(CONFIGS.items()):
        target = OmegaConf.structured(node)._target_
        cls = getattr(cb, target.rpartition(".")[2])
        params = parameters(cls, cb.AveragingCallback, {"rule"})
        for field in OmegaConf.structured(node):
            if field == "_target_":
                continue
            for value in bad_values(field, params.get(field, Any)):
                if isinstance(value, (str, int, float, bool, list)) or value is None:
                    cases.append(pytest.param(key, field, value, id=f"{key}-{field}={value!r}"))
    return cases


@pytest.mark.parametrize(("key", "field", "value"), _config_cases())
def test_bad_config_value_is_refused_when_instantiated(key: str, field: str, value: Any) -> None:
    node = OmegaConf.structured(CONFIGS[key][0])
    try:
        node[field] = value
    except ValueError as error:  # OmegaConf's own type check (ValidationError) names the key
        assert_names(error, field)
        return
    stored = node[field]
    stored = OmegaConf.to_object(stored) if OmegaConf.is_config(stored) else stored
    if type(stored) is not type(value) or stored != value:
        pytest.skip(f"OmegaConf converts {value!r} to {stored!r} (command-line parsing), a valid value")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as caught:  # type checked by assert_names
            instantiate_averaging(node)
    assert_names(caught.value, field)


# ---------------------------------------------------------------- conflicting combinations
@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda: cb.WiSEFT(alphas=[0.0, 0.3, 1.0]), "alphas"),
        (lambda: cb.WiSEFT(select_on=1), "select_on"),
        (lambda: cb.WiSEFT(alpha=0.3, figure_path="curve.png"), "figure_path"),
        (lambda: cb.WiSEFT(monitor="val_acc", metric=lambda o, t: 0.0), "monitor"),
        (lambda: cb.ZSCL(teacher={}), "teacher"),
        (lambda: cb.EMA(decay=0.9, half_life=10.0), "half_life"),
        (lambda: cb.LCSC(every_n_steps=2, every_n_epochs=1), "every_n_epochs"),
        (lambda: cb.EWA(apply_at_end=False, export_path="x.safetensors"), "export_path"),
        (lambda: wo.SWA(torch.optim.SGD(_model().parameters(), lr=0.1), start=0.5), "total_steps"),
    ],
)
def test_conflicting_arguments_are_refused(build: Callable[[], Any], names: str) -> None:
    with pytest.raises((TypeError, ValueError)) as caught:
        build()
    assert names in str(caught.value)


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda: cb.ZSCL(distill_weight=5.0), "distill_weight"),
        (lambda: cb.ZSCL(temperature=4.0, forward=lambda m, x: m(x)), "temperature, forward"),
        (lambda: wo.ZSCL(torch.optim.SGD(_model().parameters(), lr=0.1), distill_weight=5.0), "distill_weight"),
        (lambda: cb.WiSEFT(dataloader_names=["id", "shift"]), "dataloader_names"),
        (lambda: cb.WiSEFT(monitor="val_acc", forward=lambda m, x: m(x)), "forward"),
    ],
)
def test_ignored_arguments_are_warned_about(build: Callable[[], Any], names: str) -> None:
    with pytest.warns(UserWarning, match=names):
        build()


# ---------------------------------------------------------------- at fit start, before any training step
class NoForward(pl.LightningModule):
    """A module that trains through ``self.net`` and defines no ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("callback", "names"),
    [
        (lambda: cb.SWA(start=0.0), "forward()"),
        (lambda: cb.LCSC(method="uniform"), "LCSC(recompute_bn=True)"),
        (lambda: cb.WiSEFT(monitor="val_acc"), "validation dataloaders"),
        (lambda: cb.LCSC(method="greedy"), "method='greedy'"),
    ],
)
def test_bad_setup_is_refused_at_fit_start(callback: Callable[[], Any], names: str) -> None:
    train, _ = digits_loaders(train_size=128)
    module = NoForward()
    with pytest.raises(ValueError, match=re_escape(names)):
        trainer(max_steps=2, limit_val_batches=0, callbacks=[callback()]).fit(module, train)
    assert module.steps == 0, "the error came after training had started"


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_export_check_leaves_nothing_behind(tmp_path: Path) -> None:
    cb.EMA(export_path=tmp_path / "sub" / "average.safetensors")
    assert os.listdir(tmp_path) == []
