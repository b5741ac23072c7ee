"""One harness over every method and every face (``tests/test_every_method.py`` covers the engine's rules alone).

Each case declares a method once: how its Lightning callback and its optimizer wrapper are built with the same
settings, how each face shows its result, and a float64 reference of the method's rule written plainly from the live
weights theta_0 (at the start) .. theta_T (after each optimizer step). The harness then checks, the same way for every
method: the wrapper's result against the reference; the callback (in a real ``Trainer``) against the wrapper on the
same data; the Hydra config against the callback; the callback pickled and unpickled before fit; a wrapper resumed
from its ``state_dict`` mid-run against the uninterrupted run, bit for bit; bf16 weights (fp32 averages where the
method averages); and a bad value of the method's first setting refused by every face, naming it.

EWA, which changes the architecture, has the same checks in one test of its own at the end. NoLoCo/DiLoCo need
several processes (``tests/distributed``, ``tests/faces/test_noloco.py``, which compares their callback and wrapper
too).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import weightavg.callbacks as cb
import weightavg.optim as wo
from tests.helpers import trainer
from weightavg.config import CONFIGS, ConfigError, instantiate_averaging
from weightavg.ewa import mixtures, to_dense, to_moe

STEPS = 8
State = dict[str, torch.Tensor]


def mean(states: list[State]) -> State:
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}  # type: ignore[misc]


def ema_reference(thetas: list[State]) -> State:
    average = dict(thetas[0])  # a copy of the live weights when bound
    for theta in thetas[1:]:
        average = {k: 0.8 * average[k] + 0.2 * theta[k] for k in average}
    return average


@dataclass(frozen=True)
class Case:
    settings: dict[str, Any]  # the method's settings, the same for every face
    callback: Callable[..., pl.Callback]
    wrapper: Callable[..., Any]
    wrapper_extra: dict[str, Any]  # what only the wrapper takes (the model, a folder)
    callback_extra: dict[str, Any]  # face options that keep the result inspectable
    result_of_callback: Callable[[Any, nn.Module], State]
    result_of_wrapper: Callable[[Any, nn.Module], State]
    reference: Callable[[list[State]], State]
    averages: bool  # whether the result is an average (fp32 for bf16 weights); else in the live dtype
    bad: tuple[str, Any]  # a setting and a value every face refuses


def averaged(face: Any, model: nn.Module) -> State:
    return {k: v.clone() for k, v in face.averager.averaged_tensors().items()}


def model_state(face: Any, model: nn.Module) -> State:
    return {k: v.clone() for k, v in model.state_dict().items()}


def wrapper_with(context: str) -> Callable[[Any, nn.Module], State]:
    def result(opt: Any, model: nn.Module) -> State:
        with getattr(opt, context)():
            return model_state(opt, model)

    return result


CASES: dict[str, Case] = {
    "ema": Case(
        {"decay": 0.8, "warmup": "none"},
        cb.EMA,
        wo.EMA,
        {},
        {"apply_at_end": False},
        averaged,
        averaged,
        ema_reference,
        True,
        ("decay", 1.5),
    ),
    "swa": Case(
        {"start": 0, "start_unit": "step", "every_unit": "step"},
        cb.SWA,
        wo.SWA,
        {},
        {"apply_at_end": False, "recompute_bn": False},
        averaged,
        averaged,
        lambda thetas: mean(thetas[1:]),  # a sample after every step from the first
        True,
        ("every", 0),
    ),
    "zscl": Case(
        {"every_n_steps": 2},
        cb.ZSCL,
        wo.ZSCL,
        {},
        {"apply_at_end": False},
        averaged,
        averaged,
        lambda thetas: mean([thetas[i] for i in (0, 1, 3, 5, 7)]),  # the start, then after step 1 and every 2
        True,
        ("every_n_steps", 0),
    ),
    "wiseft": Case(
        {"alpha": 0.3},
        cb.WiSEFT,
        wo.WiSEFT,
        {"needs_module": True},
        {},
        model_state,  # the model ends at the chosen (here: the fixed) alpha
        wrapper_with("interpolated"),
        lambda thetas: {k: 0.7 * thetas[0][k] + 0.3 * thetas[-1][k] for k in thetas[0]},
        False,
        ("alpha", float("nan")),
    ),
    "lcsc": Case(
        {"every_n_steps": 2, "keep": None, "directory": ":memory:", "method": "uniform"},
        cb.LCSC,
        wo.LCSC,
        {"needs_module": True},
        {"recompute_bn": False},
        model_state,  # the model ends with the chosen combination
        wrapper_with("averaged"),  # the recipe's combination (uniform needs no search)
        lambda thetas: mean([thetas[i] for i in (2, 4, 6, 8)]),
        False,
        ("keep", 0),
    ),
}


def batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 5, generator=generator).to(dtype), torch.randn(4, 3, generator=generator).to(dtype))
        for _ in range(STEPS)
    ]


def fresh_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def build_wrapper(case: Case, model: nn.Module, **changes: Any) -> Any:
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    return case.wrapper(sgd, module=model, **{**case.settings, **changes})


def loop(
    case: Case, dtype: torch.dtype, steps: range = range(STEPS), **changes: Any
) -> tuple[Any, nn.Module, list[State]]:
    """The wrapper in a plain loop; theta_0 .. theta_T recorded in float64."""
    model = fresh_model(dtype)
    opt = build_wrapper(case, model, **changes)
    thetas = [{k: v.double().clone() for k, v in model.state_dict().items()}]
    data = batches(dtype)
    for index in steps:
        inputs, targets = data[index]
        nn.functional.mse_loss(model(inputs), targets).backward()
        opt.step()
        opt.zero_grad()
        thetas.append({k: v.double().clone() for k, v in model.state_dict().items()})
    return opt, model, thetas


class Regression(pl.LightningModule):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = fresh_model(dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(callback: pl.Callback, dtype: torch.dtype = torch.float64) -> tuple[Any, nn.Module]:
    data = batches(dtype)
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])), batch_size=4)
    module = Regression(dtype)
    trainer(max_epochs=1, callbacks=[callback], limit_val_batches=0).fit(module, loader)
    return callback, module.net


def callback_result(case: Case, callback: Any, net: nn.Module) -> State:
    """The callback's result under the wrapper's names (the LightningModule nests the model under ``net.``)."""
    result = case.result_of_callback(callback, net)
    return {k.removeprefix("net."): v for k, v in result.items()}


def assert_states(got: State, expected: State, **tolerance: float) -> None:
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key].double(), expected[key].double(), **tolerance, msg=key)  # type: ignore[call-overload]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_wrapper_follows_the_methods_rule_written_plainly_in_float64(name: str) -> None:
    case = CASES[name]
    opt, model, thetas = loop(case, torch.float64)
    assert_states(case.result_of_wrapper(opt, model), case.reference(thetas), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_callback_in_a_trainer_equals_the_wrapper_in_a_loop(name: str) -> None:
    case = CASES[name]
    opt, model, _ = loop(case, torch.float64)
    callback, net = fit(case.callback(**case.settings, **case.callback_extra))
    assert_states(callback_result(case, callback, net), case.result_of_wrapper(opt, model), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_hydra_config_builds_the_same_callback(name: str) -> None:
    case = CASES[name]
    node = OmegaConf.structured(CONFIGS[name][0])
    for key, value in {**case.settings, **case.callback_extra}.items():
        node[key] = value
    built = instantiate_averaging(node)
    assert type(built) is type(case.callback())
    direct, _ = fit(case.callback(**case.settings, **case.callback_extra))
    configured, net = fit(built)
    assert_states(callback_result(case, configured, net), callback_result(case, direct, net), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_pickled_callback_gives_the_same_result(name: str) -> None:
    case = CASES[name]
    callback = case.callback(**case.settings, **case.callback_extra)
    copied = pickle.loads(pickle.dumps(callback))  # what ddp_spawn and Hydra's multirun do to it
    first, net = fit(callback)
    second, net2 = fit(copied)
    assert_states(callback_result(case, second, net2), callback_result(case, first, net), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_wrapper_resumed_mid_run_equals_the_uninterrupted_run_bit_for_bit(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    # LCSC's snapshots are files found again on resume (kept in memory they would be lost with the process).
    folders = (
        {"full": {}, "resumed": {}}
        if name != "lcsc"
        else {run: {"directory": tmp_path / run} for run in ("full", "resumed")}
    )
    full, full_model, _ = loop(case, torch.float64, **folders["full"])
    first, first_model, _ = loop(case, torch.float64, range(STEPS // 2), **folders["resumed"])
    saved = copy.deepcopy({"model": first_model.state_dict(), "opt": first.state_dict()})
    del first  # the interrupted process is gone
    model = fresh_model(torch.float64)
    model.load_state_dict(saved["model"])
    resumed = build_wrapper(case, model, **folders["resumed"])
    resumed.load_state_dict(saved["opt"])
    data = batches(torch.float64)
    for index in range(STEPS // 2, STEPS):
        nn.functional.mse_loss(model(data[index][0]), data[index][1]).backward()
        resumed.step()
        resumed.zero_grad()
    assert_states(case.result_of_wrapper(resumed, model), case.result_of_wrapper(full, full_model), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_weights_with_fp32_averages(name: str) -> None:
    """An average of bf16 weights is fp32 and matches the rule applied in float64 to the bf16 weights seen; a copy
    (WiSE-FT's anchor, LCSC's snapshots) keeps the live dtype, so its result is the reference rounded to bf16."""
    case = CASES[name]
    opt, model, thetas = loop(case, torch.bfloat16)
    result = case.result_of_wrapper(opt, model)
    expected = case.reference(thetas)
    if case.averages:
        assert {t.dtype for t in result.values()} == {torch.float32}
        assert_states(result, expected, rtol=1e-6, atol=1e-6)
    else:
        assert {t.dtype for t in result.values()} == {torch.bfloat16}
        assert_states(result, expected, rtol=2**-7, atol=2**-7)  # one bf16 rounding of each entry


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_face_refuses_a_bad_setting_naming_it(name: str) -> None:
    case = CASES[name]
    setting, value = case.bad
    bad = {**case.settings, setting: value}
    with pytest.raises((TypeError, ValueError), match=setting):
        case.callback(**bad)
    with pytest.raises((TypeError, ValueError), match=setting):
        build_wrapper(Case(**{**case.__dict__, "settings": bad}), fresh_model(torch.float64))
    node = OmegaConf.structured(CONFIGS[name][0])
    node[setting] = value
    with pytest.raises(ConfigError, match=setting):
        instantiate_averaging(node)


# ---------------------------------------------------------------------------------------------------------- EWA
# EWA changes the architecture (its FFNs become mixtures whose experts are pulled together after every step, merged
# into dense FFNs at the end), so its faces are driven here on their own, with the same checks.
EWA_SETTINGS: dict[str, Any] = {"beta": 0.3}
EWA_CONVERSION: dict[str, Any] = {"select": "0", "num_experts": 2, "seed": 0}


def ewa_loop(reference: bool, steps: range = range(STEPS), model: nn.Module | None = None) -> tuple[Any, nn.Module]:
    """A plain loop over the converted model: through ``weightavg.optim.EWA``, or (``reference``) plain SGD and
    EWA's rule written out here, ``e_i <- e_i + beta * N / (N - 1) * (mean_j e_j - e_i)`` after every step."""
    if model is None:
        model = fresh_model(torch.float64)
        to_moe(model, EWA_CONVERSION["select"], num_experts=2, seed=EWA_CONVERSION["seed"])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = sgd if reference else wo.EWA(sgd, model=model, **EWA_SETTINGS)
    data = batches(torch.float64)
    for index in steps:
        nn.functional.mse_loss(model(data[index][0]), data[index][1]).backward()
        opt.step()
        opt.zero_grad()
        if reference:
            with torch.no_grad():
                for layer in mixtures(model):
                    for stack in layer.stacks():
                        stack += EWA_SETTINGS["beta"] * 2 / (2 - 1) * (stack.mean(0, keepdim=True) - stack)
    return opt, model


def merged(model: nn.Module) -> State:
    to_dense(model)
    return model_state(None, model)


def test_ewa_through_every_face() -> None:
    _, by_hand = ewa_loop(reference=True)
    reference = merged(by_hand)
    opt, model = ewa_loop(reference=False)
    assert opt.merge() == 1
    assert_states(model_state(opt, model), reference, rtol=1e-12, atol=1e-12)  # the rule, in float64

    in_module = {**EWA_CONVERSION, "select": "net.0"}  # the LightningModule holds the model as ``net``
    callback, net = fit(cb.EWA(**EWA_SETTINGS, **in_module))  # converts, shares, merges when fit ends
    assert not mixtures(net)
    assert_states(
        {k.removeprefix("net."): v for k, v in model_state(callback, net).items()}, reference, rtol=1e-12, atol=1e-12
    )
    node = OmegaConf.structured(CONFIGS["ewa"][0])
    for key, value in {**EWA_SETTINGS, **in_module}.items():
        node[key] = value
    configured, net2 = fit(pickle.loads(pickle.dumps(instantiate_averaging(node))))  # Hydra, then pickled
    assert_states(model_state(configured, net2), model_state(callback, net), rtol=0, atol=0)

    first, first_model = ewa_loop(reference=False, steps=range(STEPS // 2))
    saved = copy.deepcopy({"model": first_model.state_dict(), "opt": first.state_dict()})
    model = fresh_model(torch.float64)
    to_moe(model, EWA_CONVERSION["select"], num_experts=2, seed=EWA_CONVERSION["seed"])
    model.load_state_dict(saved["model"])
    resumed = wo.EWA(torch.optim.SGD(model.parameters(), lr=0.1), model=model, **EWA_SETTINGS)
    resumed.load_state_dict(saved["opt"])
    assert resumed.steps_done() == STEPS // 2
    data = batches(torch.float64)
    for index in range(STEPS // 2, STEPS):
        nn.functional.mse_loss(model(data[index][0]), data[index][1]).backward()
        resumed.step()
        resumed.zero_grad()
    resumed.merge()
    assert_states(model_state(resumed, model), reference, rtol=1e-12, atol=1e-12)  # as the uninterrupted run
    with pytest.raises((TypeError, ValueError), match="beta"):
        cb.EWA(beta=2.0)
    bad = OmegaConf.structured(CONFIGS["ewa"][0])
    bad.beta = 2.0
    with pytest.raises(ConfigError, match="beta"):
        instantiate_averaging(bad)


def test_wrapper_exports_refuse_a_folder_before_writing(tmp_path: Path) -> None:
    model = fresh_model(torch.float64)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for save in (wo.WiSEFT(sgd, module=model).save_interpolated, wo.EMA(sgd, decay=0.9).save_averaged):
        with pytest.raises(ValueError, match="is a folder"):
            save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_the_search_breeds_from_at_most_its_population_by_default() -> None:
    from weightavg.methods.lcsc import SearchSettings

    assert SearchSettings().parents == 4 and SearchSettings(population=2).parents == 2  # as the command does
    with pytest.raises(ValueError, match="parents=3 must not exceed population=2"):
        SearchSettings(population=2, parents=3)


def test_errors_name_the_file_and_the_argument(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from weightavg.core.snapshots import combine

    save_file({"w": torch.zeros(3)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(4)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"sources\[1\] \(.*b\.safetensors\) does not match sources\[0\] \(.*a\."):
        combine([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], [0.5, 0.5])
    with pytest.raises(TypeError, match=r"settings=\{'populaton': 8\}: .*SearchSettings has \['population'"):
        cb.LCSC(settings={"populaton": 8})
