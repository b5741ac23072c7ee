"""weightavg.core.binding: which tensors an averager follows, under which names, averaged or copied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightavg import EMA, Averager
from weightavg.core.binding import bind_module, bind_tensors


class TiedNet(nn.Module):
    """An embedding tied to the output layer, a BatchNorm, and persistent, non-persistent and empty buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(4), persistent=False)
        self.register_buffer("unset", None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens)) * self.scale)


class OnlyIntegers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(3, dtype=torch.long))


def by_name(entries: list) -> dict:
    return {entry.name: entry for entry in entries}


def test_parameters_and_persistent_buffers_by_state_dict_name() -> None:
    model = TiedNet()
    entries = bind_module(model)
    all_names = [name for entry in entries for name in entry.names]
    assert sorted(all_names) == sorted(model.state_dict())
    assert len(all_names) == len(set(all_names))
    assert "cache" not in all_names  # non-persistent buffer
    state = model.state_dict(keep_vars=True)
    for entry in entries:
        for name in entry.names:
            assert state[name] is entry.tensor  # the live object itself, not a copy


def test_tied_parameters_are_followed_once_with_every_name() -> None:
    model = TiedNet()
    entries = by_name(bind_module(model))
    assert entries["embed.weight"].names == ("embed.weight", "head.weight")
    assert entries["embed.weight"].tensor is model.head.weight
    assert "head.weight" not in entries

    averager = Averager(model, EMA(decay=0.5, warmup="none"))
    assert averager.aliases()["embed.weight"] == ("head.weight",)
    assert averager.names.count("embed.weight") == 1 and "head.weight" not in averager.names
    before = model.embed.weight.detach().clone()
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    averager.step()
    # Followed once: one update of weight 1/2, not two.
    torch.testing.assert_close(averager.averaged_tensors()["embed.weight"], before + 0.5)


def test_shared_buffer_is_followed_once_with_every_name() -> None:
    shared = torch.ones(3)
    first, second = nn.Module(), nn.Module()
    first.register_buffer("stat", shared)
    second.register_buffer("stat", shared)
    model = nn.Sequential(nn.Linear(3, 3), first, second)
    entries = by_name(bind_module(model))
    assert entries["1.stat"].names == ("1.stat", "2.stat")
    assert "2.stat" not in entries


def test_buffer_policy_average() -> None:
    entries = by_name(bind_module(TiedNet(), buffers="average"))
    assert entries["body.1.running_mean"].averaged
    assert entries["body.1.running_var"].averaged
    assert entries["scale"].averaged
    assert not entries["body.1.num_batches_tracked"].averaged  # integer: always copied
    assert all(entries[name].averaged for name in ("embed.weight", "body.0.weight", "body.1.bias"))


def test_buffer_policy_copy() -> None:
    entries = by_name(bind_module(TiedNet(), buffers="copy"))
    for name in ("body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked", "scale"):
        assert not entries[name].averaged
    assert entries["body.0.weight"].averaged


def test_buffer_policy_ignore() -> None:
    model = TiedNet()
    entries = by_name(bind_module(model, buffers="ignore"))
    assert set(entries) == {name for name, _ in model.named_parameters()}


def test_buffer_policies_in_the_engine() -> None:
    """'average' averages float buffers, 'copy' takes the live value; integer buffers are copied and stay integer."""
    rule = EMA(decay=0.75, warmup="none")
    model = TiedNet()
    averaging = Averager(model, rule, buffers="average")
    copying = Averager(model, rule, buffers="copy")
    start = model.body[1].running_mean.clone()
    model.train()
    model(torch.arange(8).reshape(8, 1).squeeze(1))
    averaging.step()
    copying.step()
    live_mean = model.body[1].running_mean
    torch.testing.assert_close(averaging.averaged_tensors()["body.1.running_mean"], 0.75 * start + 0.25 * live_mean)
    assert torch.equal(copying.averaged_tensors()["body.1.running_mean"], live_mean)
    for averager in (averaging, copying):
        count = averager.averaged_tensors()["body.1.num_batches_tracked"]
        assert count.dtype == torch.long
        assert torch.equal(count, model.body[1].num_batches_tracked)


def test_include_and_exclude_globs_on_canonical_names() -> None:
    model = TiedNet()
    assert [e.name for e in bind_module(model, include="body.0.*")] == ["body.0.weight", "body.0.bias"]
    names = {e.name for e in bind_module(model, exclude=["*.bias", "scale", "body.1.*"])}
    assert names == {"embed.weight", "body.0.weight"}
    names = {e.name for e in bind_module(model, include=["body.*"], exclude="*running*")}
    assert names == {"body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias", "body.1.num_batches_tracked"}
    # Patterns match the canonical name only: the tied head weight goes by its embedding's name.
    assert "embed.weight" not in {e.name for e in bind_module(model, exclude="embed.*")}


def test_error_pattern_matching_nothing_quotes_it_and_lists_names() -> None:
    """A pattern that matches no name is a typo (it would silently follow everything, or not what was meant)."""
    model = TiedNet()
    with pytest.raises(ValueError, match=r"include=\['nothing.\*'\]: pattern 'nothing.\*' matches no .*'embed.weight'"):
        bind_module(model, include="nothing.*")
    with pytest.raises(ValueError, match=r"exclude=\['\*.bias', 'bdy.\*'\]: pattern 'bdy.\*' .*'body.0.bias'"):
        Averager(model, EMA(), exclude=["*.bias", "bdy.*"])
    with pytest.raises(ValueError, match=r"pattern 'head.\*' .* only tied names \['head.weight'\]"):
        Averager(model, EMA(), exclude="head.*")
    # Patterns on buffers the policy leaves out still name something in the model: no error.
    names = {e.name for e in bind_module(model, buffers="ignore", exclude="*running*")}
    assert "body.1.running_mean" not in names and "body.0.weight" in names


def test_parameters_restriction() -> None:
    model = TiedNet()
    chosen = [model.body[0].weight, model.embed.weight]
    entries = by_name(bind_module(model, parameters=chosen))
    parameter_names = {name for name in entries if not name.startswith(("body.1.running", "body.1.num", "scale"))}
    assert parameter_names == {"body.0.weight", "embed.weight"}
    assert "body.1.running_mean" in entries  # buffers are still followed
    assert entries["embed.weight"].names == ("embed.weight", "head.weight")


def test_bind_tensors_names_by_position_and_skips_repeats() -> None:
    first, second = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    entries = bind_tensors([first, second, first], prefix="p")
    assert [e.name for e in entries] == ["p0", "p1"]
    assert entries[0].tensor is first and entries[1].tensor is second


def test_error_unknown_buffer_policy() -> None:
    with pytest.raises(ValueError, match=r"buffers='keep'.*allowed: 'average', 'copy', 'ignore'"):
        bind_module(TiedNet(), buffers="keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"buffers='keep'"):
        Averager(TiedNet(), EMA(), buffers="keep")  # type: ignore[arg-type]


def test_error_no_floating_tensors() -> None:
    with pytest.raises(ValueError, match=r"module OnlyIntegers has no floating parameters or buffers"):
        bind_module(OnlyIntegers())
    with pytest.raises(ValueError, match=r"module TiedNet has no floating"):
        bind_module(TiedNet(), include="body.1.num_batches_tracked")
    with pytest.raises(ValueError, match=r"module TiedNet has no floating"):
        bind_module(TiedNet(), buffers="copy", include="body.1.running_*")
    with pytest.raises(ValueError, match=r"given parameters has no floating"):
        bind_tensors([torch.zeros(2, dtype=torch.long)])


def test_error_parameter_not_owned_by_module() -> None:
    stranger = nn.Parameter(torch.zeros(2))
    model = TiedNet()
    with pytest.raises(ValueError, match=r"module= does not own 1 of"):
        bind_module(model, parameters=[model.body[0].weight, stranger])
    with pytest.raises(ValueError, match=r"module= does not own 1 of"):
        Averager(model, EMA(), parameters=[stranger])


def test_error_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module, got list"):
        bind_module([torch.zeros(2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"include=\[1\]"):
        bind_module(TiedNet(), include=[1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"got int at index 1"):
        bind_tensors([torch.zeros(2), 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"include=/exclude= .* need a module"):
        Averager([nn.Parameter(torch.zeros(2))], EMA(), include="*")


# ------------------------------------------------------------------------------------------- compiled and wrapped
def _plain() -> nn.Module:
    torch.manual_seed(0)
    return TiedNet()


def test_wrappers_attributes_are_left_out_of_names_and_kept_as_module_keys() -> None:
    """torch.compile (the whole model or a submodule), DataParallel and a one-process DDP: the averager's names are
    the plain architecture's (``state_dict`` of the unwrapped model, tied names included); ``module_keys`` gives the
    wrapped model's own keys."""
    import torch.distributed as dist

    plain_names = [entry.names for entry in bind_module(_plain())]
    compiled = torch.compile(_plain(), backend="eager")
    assert [entry.names for entry in bind_module(compiled)] == plain_names
    assert all(entry.module_keys == tuple(f"_orig_mod.{n}" for n in entry.names) for entry in bind_module(compiled))
    inner = _plain()
    inner.body = torch.compile(inner.body, backend="eager")  # type: ignore[assignment]
    entries = bind_module(inner)
    assert [entry.names for entry in entries] == plain_names
    assert {k for entry in entries for k in entry.module_keys} == set(inner.state_dict())
    assert "body._orig_mod.0.weight" in inner.state_dict()
    assert [entry.names for entry in bind_module(nn.DataParallel(_plain()))] == plain_names
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_plain())
        entries = bind_module(ddp)
        assert [entry.names for entry in entries] == plain_names
        assert {k for entry in entries for k in entry.module_keys} == set(ddp.state_dict())
    finally:
        dist.destroy_process_group()


def test_a_wrapper_whose_own_tensors_collide_with_the_wrapped_names_is_refused() -> None:
    class Holder(nn.DataParallel):  # type: ignore[type-arg]
        def __init__(self, module: nn.Module) -> None:
            super().__init__(module)
            self.register_parameter("weight", nn.Parameter(torch.zeros(3)))

    with pytest.raises(ValueError, match=r"'module.weight' and 'weight' .* both be named 'weight'"):
        bind_module(Holder(nn.Linear(2, 3)))


def test_compiled_exports_load_into_the_plain_model_and_back() -> None:
    """An average of a compiled model exports under plain names (it loads into the architecture with torch's own
    strict ``load_state_dict``); ``load_into_module`` and ``Averager.load_weights`` take a compiled model's prefixed
    state dict and plain files alike; an averaging state written under prefixed names loads."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from weightavg import load_into_module

    compiled = torch.compile(_plain(), backend="eager")
    averager = Averager(compiled, EMA(decay=0.5))
    with torch.no_grad():
        for p in compiled.parameters():
            p.add_(1.0)
    averager.step()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "avg.safetensors"
        averager.save(path)
        plain = _plain()
        plain.load_state_dict(load_file(str(path)), strict=False)  # tied head.weight is filled by load_into_module
        load_into_module(plain, path)
        torch.testing.assert_close(plain.embed.weight, averager.averaged_tensors()["embed.weight"])
        target = torch.compile(_plain(), backend="eager")
        load_into_module(target, path)  # a plain export into a compiled model
        torch.testing.assert_close(target.embed.weight, plain.embed.weight)
    prefixed = {f"_orig_mod.{k}": v + 2 for k, v in _plain().state_dict().items()}
    other = Averager(_plain(), EMA(decay=0.5))
    other.load_weights(prefixed)
    torch.testing.assert_close(other.averaged_tensors()["embed.weight"], prefixed["_orig_mod.embed.weight"])
    state = averager.state_dict()
    state["averaged"] = {f"module.{k}": v for k, v in state["averaged"].items()}  # as a DDP-era state would be
    other.load_state_dict(state)
    torch.testing.assert_close(other.averaged_tensors()["body.0.weight"], averager.averaged_tensors()["body.0.weight"])
