"""EWA (Huang et al. 2023, "Experts Weights Averaging: A New General Training Scheme for Vision Transformers"):
train some FFNs as random-partition mixtures of experts whose weights are pulled toward each other, then merge.

- Conversion (``to_moe``): a chosen FFN becomes a ``RandomPartitionMoE`` of N experts, copies of the FFN. Each forward
  draws one random permutation of the tokens, splits it into N near-equal groups, sends each group through one expert
  and restores the original order: the FLOPs of the dense FFN, no router.
- Update (``MoE.share(beta)``, after every optimizer step), from the pre-update values:
  ``W_i <- (1 - beta) W_i + beta/(N-1) * sum_{j != i} W_j``, i.e. ``W_i <- lerp(W_i, mean_j W_j, beta N/(N-1))``:
  the mean is unchanged and the deviations shrink by ``1 - beta N/(N-1)``; ``beta = (N-1)/N`` collapses the experts.
  The experts of one layer are stored stacked (one tensor per FFN parameter, experts along dim 0), so a layer's update
  is one batched ``lerp_`` over its stacks, never a loop over experts.
- Merge (``to_dense``): each mixture becomes the original FFN class holding the experts' mean; in eval mode a mixture
  already computes exactly that, so validation during training measures the model that will be deployed.

No official code exists; which blocks, N and the schedule are configurable (defaults: every other block's MLP, N=4,
beta ramped linearly to 0.3 over 10k steps in the closely related implementation the design notes cite).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
from torch import nn

from weightavg.core import kernels
from weightavg.core.checks import check_number
from weightavg.core.settings import Settings


class RandomPartitionMoE(nn.Module):
    """N experts of one FFN, stacked; tokens split at random into N near-equal groups, one per expert.

    Args:
        ffn: the FFN to copy (kept as the template whose forward the experts run, with their own tensors).
        num_experts: N (at least 2).
        seed: seeds this layer's token permutations (drawn on the input's device); ``None`` uses torch's global RNG.
    """

    def __init__(self, ffn: nn.Module, num_experts: int = 4, seed: int | None = None) -> None:
        super().__init__()
        check_number("num_experts", num_experts, low=2, integer=True)
        if any(True for _ in ffn.buffers()):
            raise ValueError(f"{type(ffn).__name__} has buffers; EWA mixes FFNs made of parameters only")
        self.num_experts = num_experts
        self.names = [name for name, _ in ffn.named_parameters()]
        # The template holds no parameters of its own: its forward runs with an expert's (or the mean's) tensors.
        template = copy.deepcopy(ffn)
        self._template = [template]  # a list: not a registered submodule
        self.keys = [name.replace(".", "__") for name in self.names]
        for key, (_, parameter) in zip(self.keys, ffn.named_parameters(), strict=True):
            stacked = parameter.detach().unsqueeze(0).repeat(num_experts, *([1] * parameter.dim())).clone()
            self.register_parameter(key, nn.Parameter(stacked, requires_grad=parameter.requires_grad))
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending: dict[str, Any] | None = None

    @property
    def template(self) -> nn.Module:
        return self._template[0]

    def stacks(self) -> list[torch.Tensor]:
        """The stacked expert tensors (experts along dim 0), in the FFN's parameter order."""
        return [getattr(self, key) for key in self.keys]

    def expert_tensors(self, index: int) -> dict[str, torch.Tensor]:
        return {name: stack[index] for name, stack in zip(self.names, self.stacks(), strict=True)}

    def mean_tensors(self) -> dict[str, torch.Tensor]:
        return {name: stack.mean(0) for name, stack in zip(self.names, self.stacks(), strict=True)}

    def _permutation(self, count: int, device: torch.device) -> torch.Tensor:
        if self.seed is None:
            return torch.randperm(count, device=device)
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            self._restore_generator()
        return torch.randperm(count, device=device, generator=self._generator)

    # The permutation stream is part of the state, so a resumed run draws the partitions an uninterrupted one would.
    def get_extra_state(self) -> dict[str, Any]:
        if self._generator is None:
            return self._pending or {"generator": None, "device": None}
        return {"generator": self._generator.get_state(), "device": self._generator.device.type}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._pending = dict(state)
        self._restore_generator()

    def _restore_generator(self) -> None:
        pending = self._pending
        if pending is None or pending.get("generator") is None or self._generator is None:
            return
        if self._generator.device.type == pending["device"]:
            self._generator.set_state(pending["generator"])
            self._pending = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # the merged FFN: what the deployed model computes
            # The mean is recomputed on each call: a cache keyed on the stacks could not see weights swapped in by
            # pointer (WiSE-FT blends, LCSC candidates, averages), and it is one cheap pass over the experts.
            return torch.func.functional_call(self.template, self.mean_tensors(), (x,))  # type: ignore[no-any-return]
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        if tokens.shape[0] == 0:  # nothing to partition: the right (empty) output from one expert
            return torch.func.functional_call(self.template, self.expert_tensors(0), (x,))  # type: ignore[no-any-return]
        order = self._permutation(tokens.shape[0], tokens.device)
        # unbind, not stack[i]: its backward stacks the N gradients once instead of adding N stack-sized ones.
        experts = list(zip(*(stack.unbind(0) for stack in self.stacks()), strict=True))
        outputs = []
        groups = torch.tensor_split(order, self.num_experts)
        for index, group in enumerate(groups):
            if group.numel() == 0:
                continue
            weights = dict(zip(self.names, experts[index], strict=True))
            outputs.append(torch.func.functional_call(self.template, weights, (tokens[group],)))
        merged = torch.cat(outputs)
        restored = torch.empty_like(merged)
        restored[torch.cat([g for g in groups if g.numel()])] = merged
        return restored.reshape(*shape[:-1], restored.shape[-1])

    @torch.no_grad()
    def share(self, beta: float) -> None:
        """The EWA update with share rate ``beta`` in [0, (N-1)/N]: one batched ``lerp_`` over the layer's stacks."""
        n = self.num_experts
        check_number("beta", beta, low=0.0, high=(n - 1) / n)
        if beta == 0.0:
            return
        stacks = self.stacks()
        means = [stack.mean(0, keepdim=True).expand_as(stack) for stack in stacks]
        kernels.lerp_(stacks, means, beta * n / (n - 1))

    @torch.no_grad()
    def spread(self) -> float:
        """Root-mean-square distance of the experts from their mean, over every tensor (a diagnostic: one host sync)."""
        total = torch.stack([(stack - stack.mean(0, keepdim=True)).double().pow(2).sum() for stack in self.stacks()])
        count = sum(stack.numel() for stack in self.stacks())
        return float((total.sum() / count).sqrt())  # one host sync

    def to_dense(self) -> nn.Module:
        """The original FFN class holding the experts' mean."""
        dense = copy.deepcopy(self.template)
        with torch.no_grad():
            for name, tensor in self.mean_tensors().items():
                dense.get_parameter(name).copy_(tensor)
        return dense


Selector = str | Iterable[str] | Callable[[str, nn.Module], bool]


def default_ffn_names(model: nn.Module) -> list[str]:
    """Every other block's MLP for common layouts: submodules named ``*.mlp`` or ``*.ffn`` or ``*.feed_forward``
    (timm ViT, many hand-written ViTs), taking the 2nd, 4th, ... in model order."""
    found = [name for name, _ in model.named_modules() if name.split(".")[-1] in ("mlp", "ffn", "feed_forward")]
    return found[1::2]


def check_selector(select: Any) -> None:
    """Raise ``TypeError`` unless ``select`` is ``None``, a glob pattern, a list of them, or a predicate (checked when
    a face is built, before the model it selects from is known)."""
    if select is None or isinstance(select, str) or (callable(select) and not isinstance(select, type)):
        return
    patterns = list(select) if isinstance(select, Iterable) else []
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"select={select!r} must be a glob pattern, a list of them, or a predicate")


def to_moe(
    model: nn.Module, select: Selector | None = None, *, num_experts: int = 4, seed: int | None = 0
) -> list[str]:
    """Replace the selected FFN submodules of ``model`` (in place) by ``RandomPartitionMoE`` mixtures.

    Args:
        select: glob pattern(s) on submodule names, or ``predicate(name, module)``; default ``default_ffn_names``.
        num_experts: N.
        seed: base seed of the token permutations (layer i uses ``seed + i``); ``None``: torch's global RNG.

    Returns:
        The names of the converted submodules.

    Raises:
        ValueError: when nothing matches.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed={seed!r} must be an int or None")
    check_number("num_experts", num_experts, low=2, integer=True)
    if select is None:
        names = default_ffn_names(model)
    else:
        modules = dict(model.named_modules())
        if callable(select) and not isinstance(select, str):
            names = [name for name, module in modules.items() if name and select(name, module)]
        else:
            patterns = [select] if isinstance(select, str) else list(select) if isinstance(select, Iterable) else []
            if not patterns or not all(isinstance(p, str) for p in patterns):
                raise TypeError(f"select={select!r} must be a glob pattern, a list of them, or a predicate")
            names = [name for name in modules if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not names:
        raise ValueError(f"select={select!r} matches no submodule of {type(model).__name__} to turn into a mixture")
    for outer in names:
        inner = next((n for n in names if n.startswith(outer + ".")), None)
        if inner is not None:
            raise ValueError(f"select={select!r} matches both {outer!r} and {inner!r} inside it; select the FFNs only")
    for name in names:  # every check before the first replacement: a refused call leaves the model as it was
        module = model.get_submodule(name)
        if isinstance(module, RandomPartitionMoE):
            raise ValueError(f"{name!r} is already a mixture")
        if any(True for _ in module.buffers()):
            raise ValueError(f"{name!r} ({type(module).__name__}) has buffers; EWA mixes FFNs made of parameters only")
    for index, name in enumerate(names):
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ffn = getattr(parent, attribute)
        setattr(parent, attribute, RandomPartitionMoE(ffn, num_experts, None if seed is None else seed + index))
    return names


def mixtures(model: nn.Module) -> list[RandomPartitionMoE]:
    return [module for module in model.modules() if isinstance(module, RandomPartitionMoE)]


def to_dense(model: nn.Module) -> int:
    """Replace every mixture in ``model`` (in place) by its merged dense FFN; returns how many were merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, RandomPartitionMoE):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attribute, module.to_dense())
            merged += 1
    return merged


def share_all(model: nn.Module, beta: float) -> None:
    """The EWA update on every mixture of ``model``."""
    for moe in mixtures(model):
        moe.share(beta)


def linear_ramp(step: int, maximum: float = 0.3, ramp_steps: int = 10_000) -> float:
    """The share-rate schedule of the closely related implementation: linear from 0 to ``maximum`` over
    ``ramp_steps`` optimizer steps, then constant."""
    check_number("maximum", maximum, low=0.0, high=1.0)
    check_number("ramp_steps", ramp_steps, low=0, integer=True)
    if ramp_steps == 0:
        return maximum
    return maximum * min(1.0, step / ramp_steps)


__all__ = ["RandomPartitionMoE", "default_ffn_names", "linear_ramp", "mixtures", "share_all", "to_dense", "to_moe"]


@dataclass(eq=False, repr=False)
class ShareSettings(Settings):
    """How strongly EWA pulls each mixture's experts together after every optimizer step (checked when built)."""

    beta: float = 0.3
    """The share rate at full strength, in [0, (N-1)/N] for N experts per mixture (checked against the mixtures when
    training starts)."""
    _: KW_ONLY
    ramp_steps: int = 0
    """Reach ``beta`` linearly over this many optimizer steps (0: constant from the first step)."""

    def __post_init__(self) -> None:
        check_number("beta", self.beta, low=0.0, high=1.0, high_open=True)
        check_number("ramp_steps", self.ramp_steps, low=0, integer=True)
        super().__post_init__()

    def beta_at(self, step: int) -> float:
        """The share rate after optimizer step ``step``."""
        return linear_ramp(step, self.beta, self.ramp_steps)

    def check_mixtures(self, model: nn.Module, who: str) -> None:
        """Refuse a model without mixtures, or a ``beta`` above (N-1)/N for its smallest mixture."""
        layers = mixtures(model)
        if not layers:
            raise ValueError(f"{who} found no mixture in the model: convert it with weightavg.ewa.to_moe(model)")
        check_number(
            "beta", self.beta, low=0.0, high=min((layer.num_experts - 1) / layer.num_experts for layer in layers)
        )


@dataclass(eq=False, repr=False)
class ConversionSettings(Settings):
    """Which FFNs become mixtures, and how (``to_moe``'s arguments, checked when built)."""

    _: KW_ONLY
    select: Selector | None = None
    """Which FFNs to convert: glob pattern(s) on submodule names, or ``predicate(name, module)``; default: every
    other ``*.mlp``/``*.ffn``/``*.feed_forward`` block (``default_ffn_names``)."""
    num_experts: int = 4
    """N, the experts per mixture (at least 2)."""
    seed: int | None = 0
    """Base seed of the token permutations (layer i uses ``seed + i``); ``None``: torch's global RNG."""

    def __post_init__(self) -> None:
        check_selector(self.select)
        check_number("num_experts", self.num_experts, low=2, integer=True)
        if self.seed is not None:
            check_number("seed", self.seed, integer=True)
        super().__post_init__()

    def convert(self, model: nn.Module) -> list[str]:
        """Turn the selected FFNs of ``model`` into mixtures (``to_moe``); returns their names."""
        return to_moe(model, self.select, num_experts=self.num_experts, seed=self.seed)
