"""The Hydra face: every shipped config mirrors its constructor and builds; bad values name the field."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest
from hydra.core.config_store import ConfigStore
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from weightavg.callbacks import AveragingCallback
from weightavg.config import CONFIGS, ConfigError, instantiate_averaging, register_configs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_lists_every_constructor_argument_with_its_default(name: str) -> None:
    """``builds`` reads the callback's signature: every argument, its default, and a type a config can hold."""
    node, _ = CONFIGS[name]
    fields = {f.name: f for f in dataclasses.fields(node) if f.name != "_target_"}
    target = OmegaConf.structured(node)._target_
    module, _, attr = target.rpartition(".")
    cls = getattr(__import__(module, fromlist=[attr]), attr)
    params = inspect.signature(cls).parameters
    former = list(getattr(cls, "__renamed_arguments__", {}))  # former names, accepted for a release
    assert list(fields) == [*params, *former]
    fields = {key: value for key, value in fields.items() if key not in former}
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())
    built = OmegaConf.structured(node)
    for key in fields:
        default = params[key].default
        value = OmegaConf.to_object(built[key]) if OmegaConf.is_config(built[key]) else built[key]
        if isinstance(default, tuple):
            value = tuple(value)
        assert value == default, f"{name}.{key}: config {value!r} != {default!r}"


def test_config_types_are_what_the_command_line_can_give() -> None:
    """Literals are their values' type, paths and devices strings, optional stays optional, a union of a string
    and a list (include=) or a callable takes anything (a list, a string, or a ``_target_`` node)."""
    from typing import Any

    from weightavg.config import EMAConfig, SWAConfig

    types = {f.name: f.type for f in dataclasses.fields(EMAConfig)}
    assert types["warmup"] is str and types["decay"] == (float | None) and types["export_path"] == (str | None)
    assert types["device"] == (str | None) and types["dtype"] == (str | None) and types["include"] is Any
    assert {f.name: f.type for f in dataclasses.fields(SWAConfig)}["bn_input"] is Any
    node = OmegaConf.structured(EMAConfig)
    node.include = ["*.weight"]
    with pytest.raises(Exception, match="warmup"):
        node.warmup = ["power"]


@pytest.mark.parametrize("method", ["ema", "swa", "wiseft", "zscl", "lcsc", "noloco", "diloco", "ewa"])
def test_a_methods_settings_are_declared_once_and_appear_in_every_face(method: str) -> None:
    """Each field of the method's settings dataclasses is an argument of the callback, the wrapper and the config,
    with the same default (the faces may choose their own default only where their docs say so: SWA's start)."""
    import weightavg.callbacks
    import weightavg.optim
    from weightavg.methods import ema, ewa, lcsc, noloco, swa, wiseft, zscl

    groups: dict[str, list[type]] = {
        "ema": [ema.EMASettings],
        "swa": [swa.SWASettings],
        "wiseft": [wiseft.WiSEFTSettings],
        "zscl": [zscl.EnsembleSettings, zscl.DistillationSettings],
        "lcsc": [lcsc.SnapshotSettings, lcsc.CombineSettings],
        "noloco": [noloco.NoLoCoSettings],
        "diloco": [noloco.DiLoCoSettings],
        "ewa": [ewa.ShareSettings, ewa.ConversionSettings],
    }
    name = {
        "ema": "EMA",
        "swa": "SWA",
        "wiseft": "WiSEFT",
        "zscl": "ZSCL",
        "lcsc": "LCSC",
        "noloco": "NoLoCo",
        "diloco": "DiLoCo",
        "ewa": "EWA",
    }[method]
    faces = {
        "callback": inspect.signature(getattr(weightavg.callbacks, name)).parameters,
        "wrapper": inspect.signature(getattr(weightavg.optim, name)).parameters,
        "config": {f.name: f for f in dataclasses.fields(CONFIGS[method][0])},
    }
    face_defaults = {("wrapper", "start"): 0.0, ("wrapper", "every_unit"): "step"}
    callback_only = {ewa.ConversionSettings}  # the wrapper takes a model converted already
    for group in groups[method]:
        for field in dataclasses.fields(group):
            if field.name == "_":
                continue
            for face, params in faces.items():
                if face == "wrapper" and group in callback_only:
                    assert field.name not in params
                    continue
                assert field.name in params, f"{group.__name__}.{field.name} missing from the {face}"
                default = params[field.name].default
                if face == "config" and default is dataclasses.MISSING:  # a list default: a factory in a config
                    default = tuple(params[field.name].default_factory())
                assert default == face_defaults.get((face, field.name), field.default), (face, field.name)


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


def test_a_type_checker_sees_every_knob_of_the_faces(tmp_path: Path) -> None:
    """The faces' generated signatures are plain dataclass ``__init__``s, so mypy checks a user's arguments: a
    misspelt knob and a wrong type are errors; a correct call is not."""
    pytest.importorskip("mypy")
    script = tmp_path / "user.py"
    script.write_text(
        "import torch\n"
        "import weightavg.callbacks as cb\n"
        "import weightavg.optim as wo\n"
        "cb.EMA(decay=0.9, validate_with='both', buffers='copy', nonfinite='skip')\n"
        "cb.EMA(decy=0.9)\n"
        "cb.SWA(start=0.5, recompute_bn='no')\n"
        "m = torch.nn.Linear(2, 2)\n"
        "wo.EMA(torch.optim.SGD(m.parameters(), lr=0.1), 0.99, module=m, contiguous=True)\n"
        "wo.ZSCL(torch.optim.SGD(m.parameters(), lr=0.1), 10, distil_weight=2.0)\n"
    )
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), script.name],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # as a user's project sees the installed package (not this repository's mypy settings)
    )
    found = [line for line in done.stdout.splitlines() if line.startswith("user.py:") and ": error: " in line]
    errors = [line.split(": error: ")[1] for line in found]
    assert [line.split(":")[1] for line in found] == ["5", "6", "9"], done.stdout
    assert 'Unexpected keyword argument "decy" for "EMA"' in errors[0]
    assert 'Argument "recompute_bn" to "SWA" has incompatible type "str"' in errors[1]
    assert 'Unexpected keyword argument "distil_weight" for "ZSCL"' in errors[2]


def test_help_shows_every_argument_and_warnings_point_at_the_users_line() -> None:
    """``help()`` lists each argument with its docstring (generated from the declarations); a settings warning
    points at the user's own line, even for code run by ``python -c`` (whose file is ``<string>`` too, as the
    ``__init__`` that dataclasses generates)."""
    import subprocess
    import sys

    import weightavg.callbacks
    import weightavg.optim
    from weightavg.core.settings import field_docs

    for face in (weightavg.callbacks.SWA, weightavg.optim.ZSCL, weightavg.callbacks.NoLoCo):
        doc = face.__doc__ or ""
        for parameter in inspect.signature(face).parameters:
            first_words = " ".join(field_docs(face)[parameter].split()[:3])
            assert f"{parameter}: {first_words}" in " ".join(doc.split()), (face.__name__, parameter)
    code = "import weightavg.callbacks as C\nC.ZSCL(distill_weight=2.0)\n"
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300)
    assert "<string>:2: UserWarning: ZSCL: distill_weight is ignored" in done.stderr, done.stderr


def test_a_methods_setting_cannot_be_changed_on_a_built_face() -> None:
    """The method read its settings when the face was built: assigning one later (silently ignored, or unchecked,
    before) is refused on callbacks and wrappers alike; the host's own options stay assignable, and so does the
    WiSE-FT callback's ``alpha`` (the interpolation in effect, which it sets when it chooses)."""
    import torch

    import weightavg.callbacks
    import weightavg.optim

    model = torch.nn.Linear(2, 2)
    faces = [
        (weightavg.callbacks.EMA(decay=0.9), "decay"),
        (weightavg.callbacks.NoLoCo(sync_every=5), "sync_every"),
        (weightavg.optim.SWA(torch.optim.SGD(model.parameters(), lr=0.1)), "start"),
        (weightavg.optim.DiLoCo(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)), "outer_lr"),
        (weightavg.callbacks.LCSC(), "method"),
        (weightavg.callbacks.WiSEFT(), "alphas"),
        (weightavg.optim.WiSEFT(torch.optim.SGD(model.parameters(), lr=0.1), module=model), "alpha"),
        (
            weightavg.optim.LCSC(
                torch.optim.SGD(model.parameters(), lr=0.1), module=model, every_n_steps=2, directory=":memory:"
            ),
            "keep",
        ),
    ]
    for face, setting in faces:
        with pytest.raises(AttributeError, match=rf"{type(face).__name__}\.{setting} is a setting of"):
            setattr(face, setting, 0.5)
    callback = faces[0][0]
    callback.validate_with = "live"  # type: ignore[attr-defined]
    assert callback.validate_with == "live"  # type: ignore[attr-defined]
    wiseft = weightavg.callbacks.WiSEFT(alpha=0.3)
    wiseft.alpha = 0.4
    assert wiseft.alpha == 0.4


def test_lcsc_recipes_are_one_registry_that_drives_every_face() -> None:
    """``RECIPES`` names the recipes once: the type of ``method``, the callback, the wrapper, the config and the
    command take exactly those names and refuse another, listing the valid ones; the command's recipe and search
    options are the settings dataclasses' fields."""
    import typing

    import torch

    import weightavg.callbacks
    import weightavg.optim
    from weightavg import combine
    from weightavg.methods.lcsc import RECIPES, CombineSettings, Method, SearchSettings

    assert tuple(typing.get_args(Method)) == tuple(RECIPES) == ("lcsc", "greedy", "uniform", "ema", "metric", "last")
    assert all(recipe.description and recipe.paper for recipe in RECIPES.values())
    assert {name for name, recipe in RECIPES.items() if recipe.needs_fitness} == {"lcsc", "greedy"}
    listed = "'lcsc', 'greedy', 'uniform', 'ema', 'metric', 'last'"
    model = torch.nn.Linear(2, 2)
    builders = [
        lambda: weightavg.callbacks.LCSC(method="soup"),  # type: ignore[arg-type]
        lambda: weightavg.optim.LCSC(
            torch.optim.SGD(model.parameters(), lr=0.1),
            module=model,
            every_n_steps=1,
            directory=":memory:",
            method="soup",  # type: ignore[arg-type]
        ),
        lambda: CombineSettings(method="soup"),  # type: ignore[arg-type]
    ]
    for build in builders:
        with pytest.raises(ValueError, match=f"method='soup' is not allowed; choose one of {listed}"):
            build()
    node = OmegaConf.structured(CONFIGS["lcsc"][0])
    node.method = "soup"
    with pytest.raises(ConfigError, match="method='soup'"):
        instantiate_averaging(node)
    actions = {action.dest: action for action in combine.build_parser()._actions}
    assert list(actions["method"].choices or []) == list(RECIPES)
    for settings in (CombineSettings, SearchSettings):
        for field in dataclasses.fields(settings):
            if field.name not in ("_", "settings"):
                assert field.name in actions, f"--{field.name.replace('_', '-')} missing from the command"
    assert "--rule" in actions["greedy_rule"].option_strings  # the name it had before, kept for scripts


def test_one_name_for_leaving_the_result_in_the_model() -> None:
    """Every callback says "leave my result in the model when fit ends" with ``apply_at_end`` (and stores it under
    that name); the former names (EWA's ``merge_at_end``, NoLoCo's and DiLoCo's ``average_at_end``) still work for a
    release with a FutureWarning naming the new one, and are refused beside it."""
    import weightavg.callbacks as cb

    for cls in (cb.EMA, cb.SWA, cb.WiSEFT, cb.ZSCL, cb.LCSC, cb.EWA, cb.NoLoCo, cb.DiLoCo):
        params = inspect.signature(cls).parameters
        assert "apply_at_end" in params, cls.__name__
        assert not {"merge_at_end", "average_at_end", "leave_result", "leave_at_alpha"} & set(params), cls.__name__
    assert cb.WiSEFT(apply_at_end=False).apply_at_end is False
    assert cb.LCSC(apply_at_end=False).apply_at_end is False
    with pytest.warns(FutureWarning, match=r"EWA\(merge_at_end=\.\.\.\) is now EWA\(apply_at_end=\.\.\.\)") as caught:
        ewa = cb.EWA(merge_at_end=False)
    assert ewa.apply_at_end is False and caught[0].filename == __file__  # the warning points at the user's line
    for cls in (cb.NoLoCo, cb.DiLoCo):
        with pytest.warns(FutureWarning, match="average_at_end"):
            assert cls(average_at_end=True).apply_at_end is True
        with pytest.raises(TypeError, match="average_at_end= and apply_at_end="):
            cls(average_at_end=True, apply_at_end=False)


def test_the_greedy_rule_keeps_its_former_name_for_a_release(tmp_path: Path) -> None:
    import torch

    import weightavg.callbacks as cb
    import weightavg.optim as wo
    from weightavg.core.snapshots import SnapshotStore
    from weightavg.methods.lcsc import Combiner

    with pytest.warns(FutureWarning, match=r"LCSC\(rule=\.\.\.\) is now LCSC\(greedy_rule=\.\.\.\)"):
        assert cb.LCSC(rule="not_worse").greedy_rule == "not_worse"  # type: ignore[call-arg]
    model = torch.nn.Linear(2, 1)
    opt = wo.LCSC(torch.optim.SGD(model.parameters(), lr=0.1), module=model, every_n_steps=1, directory=":memory:")
    for _ in range(2):
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
    scores = iter([0.0, 1.0, 1.0])  # the newest alone is best; the soup of both ties it (kept only by not_worse)
    with pytest.warns(FutureWarning, match="greedy_rule"):
        result = opt.search(lambda: next(scores), method="greedy", rule="not_worse")
    assert result.weights == [0.5, 0.5]
    combiner = Combiner(model, SnapshotStore(None))
    with pytest.raises(TypeError, match="rule= and greedy_rule="):
        combiner.choose("greedy", lambda: 0.0, rule="strict", greedy_rule="strict")


def test_importing_weightavg_registers_no_strategy_and_the_lightning_face_registers_only_local_ddp() -> None:
    import subprocess
    import sys

    code = (
        "from lightning.pytorch.strategies import StrategyRegistry as R\n"
        "before = set(R)\n"
        "import weightavg, weightavg.optim\n"
        "assert set(R) == before, set(R) - before\n"
        "import weightavg.callbacks\n"
        "assert set(R) - before == {'local_ddp'}, set(R) - before\n"
        "import weightavg.strategies\n"
        "from weightavg.callbacks.strategy import LocalDDPStrategy\n"
        "assert weightavg.strategies.LocalDDPStrategy is LocalDDPStrategy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("name", "former", "value", "new"),
    [
        ("ewa", "merge_at_end", False, "apply_at_end"),
        ("noloco", "average_at_end", True, "apply_at_end"),
        ("diloco", "average_at_end", True, "apply_at_end"),
        ("lcsc", "rule", "not_worse", "greedy_rule"),
    ],
)
def test_configs_take_a_renamed_arguments_former_name_for_a_release(
    name: str, former: str, value: Any, new: str
) -> None:
    node = OmegaConf.structured(CONFIGS[name][0])
    node[former] = value  # what averaging.merge_at_end=false on the command line does
    with pytest.warns(FutureWarning, match=rf"averaging\.{former} is now averaging\.{new}"):
        callback = instantiate_averaging(node)
    assert getattr(callback, new) == value
    assert getattr(instantiate_averaging(OmegaConf.structured(CONFIGS[name][0])), new) != value  # the default
