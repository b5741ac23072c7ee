"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): interpolate the zero-shot weights
theta_0 and the weights theta_1 fine-tuned from them,

    theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1        over every floating entry, the head included;

integer buffers (BatchNorm's ``num_batches_tracked``) come from theta_1. ``alpha = 0.5`` is the choice without
tuning; otherwise pick the best alpha on held-out in-distribution data. The Fisher-weighted variant of the official
code weighs each entry by diagonal Fisher information (each floored at ``1e-8``):

    theta = ((1 - alpha) F_0 theta_0 + alpha F_1 theta_1) / ((1 - alpha) F_0 + alpha F_1)

``WiSEFTSettings`` declares the settings once; the faces (``weightavg.callbacks.WiSEFT``, ``weightavg.optim.WiSEFT``,
the Hydra config ``averaging=wiseft``) inherit them and keep theta_0 in an ``Averager`` with the ``Snapshot`` rule;
``blend``/``blended``/``apply_blend`` below interpolate it with the live weights through the engine's derived swap
(one copy and one ``lerp_`` per group, swapped in by pointer). This file also holds the standalone functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from weightavg.core import io, kernels
from weightavg.core.averager import Averager
from weightavg.core.call import Forward, call_with, eval_mode
from weightavg.core.checks import check_choice, check_number
from weightavg.core.settings import Settings

#: The paper's grid: 0, 0.1, ..., 1.
ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


def check_alphas(alphas: Iterable[float]) -> tuple[float, ...]:
    """The grid as a tuple of floats; ``ValueError`` for an empty, non-numeric or repeated grid."""
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Iterable):
        raise TypeError(f"alphas={alphas!r} must be a sequence of numbers, e.g. weightavg.wiseft.ALPHAS")
    grid = tuple(alphas)
    if not grid:
        raise ValueError("alphas=() is empty: give at least one alpha")
    for alpha in grid:
        check_number("alphas", alpha)
    if len(set(grid)) != len(grid):
        raise ValueError(f"alphas={grid!r} repeats a value")
    return tuple(float(alpha) for alpha in grid)


@dataclass(eq=False, repr=False)
class WiSEFTSettings(Settings):
    """The settings of a WiSE-FT interpolation (checked when built)."""

    alphas: Sequence[float] = ALPHAS
    """The grid of alphas evaluated (default the paper's 0, 0.1, ..., 1; a fixed ``alpha`` is evaluated with it)."""
    _: KW_ONLY
    alpha: float | None = None
    """A fixed interpolation (0 gives theta_0, 1 the fine-tuned weights; outside [0, 1] extrapolates). ``None``: the
    best on the sweep's metric, or 0.5 (the paper's choice without tuning) when there is nothing to sweep with."""
    anchor: io.WeightSource | None = None
    """theta_0 from a module, a state dict, a safetensors file or a checkpoint (a Lightning ``.ckpt`` gives its
    ``state_dict``); default: the model's weights when fit starts (the callback) or the wrapper is built."""

    def __post_init__(self) -> None:
        self.alphas = check_alphas(self.alphas)
        if self.alpha is not None:
            check_number("alpha", self.alpha)
            self.alpha = float(self.alpha)
        anchor = self.anchor
        if anchor is not None and not isinstance(anchor, (nn.Module, Mapping, str, os.PathLike)):
            raise TypeError(
                f"anchor={anchor!r} must be a module, a state dict, a safetensors or checkpoint path, or None"
            )
        if isinstance(anchor, (str, os.PathLike)) and not os.path.isfile(anchor):
            raise FileNotFoundError(f"anchor={str(anchor)!r}: no such file")
        super().__post_init__()

    def evaluated_alphas(self) -> tuple[float, ...]:
        """``alphas`` with a fixed ``alpha`` added, in increasing order."""
        return tuple(self.alphas) if self.alpha is None else tuple(sorted({*self.alphas, self.alpha}))


_TAG = "wiseft"


def blend(anchor: Averager, alpha: float) -> None:
    """Put ``(1 - alpha) * theta_0 + alpha * live`` into the model (``anchor`` holds theta_0 as its "average").

    Averaged tensors get the blend, computed in the live dtype into buffers allocated on the first call (one
    model's worth) and swapped in by pointer; copied tensors (integer buffers, ``buffers="copy"``) keep their live
    values. Call again for another ``alpha`` (still from the live weights); ``anchor.swap()`` puts the live weights
    back exactly. ``alpha`` outside [0, 1] extrapolates."""
    check_number("alpha", alpha)
    weight = float(alpha)

    def derive(out: list[torch.Tensor], theta_0: list[torch.Tensor], live: list[torch.Tensor]) -> None:
        kernels.copy_(out, theta_0)
        kernels.lerp_(out, live, weight)

    anchor.swap_in_derived(derive, (_TAG, weight))


def blend_alpha(anchor: Averager) -> float | None:
    """The ``alpha`` of the blend in the model, or ``None`` when no blend is swapped in."""
    tag = anchor.derived_tag
    return float(tag[1]) if isinstance(tag, tuple) and tag[:1] == (_TAG,) else None


@contextmanager
def blended(anchor: Averager, alpha: float) -> Iterator[None]:
    """Run the body with ``blend(anchor, alpha)`` in the model; the live weights (or what was in before) return
    after, even on error."""
    previous = blend_alpha(anchor)
    average_in = anchor.is_swapped and previous is None
    blend(anchor, alpha)
    try:
        yield
    finally:
        if previous is not None:
            blend(anchor, previous)
        else:
            if anchor.is_swapped:  # unless the body already put the live weights back (apply_blend)
                anchor.swap()
            if average_in:
                anchor.swap()


def apply_blend(anchor: Averager, alpha: float) -> None:
    """Make ``(1 - alpha) * theta_0 + alpha * live`` the model's live weights, in place (the tensors keep their
    storage, so optimizers and contiguous layouts stay valid)."""
    check_number("alpha", alpha)
    weight = 1.0 - float(alpha)
    anchor.derive_into_live(lambda live, theta_0: kernels.lerp_(live, theta_0, weight))


def interpolate(
    zero_shot: io.WeightSource,
    fine_tuned: io.WeightSource,
    alpha: float,
    *,
    fisher: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    fisher_floor: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """The WiSE-FT weights ``(1 - alpha) * zero_shot + alpha * fine_tuned`` as a new state dict.

    Args:
        zero_shot, fine_tuned: modules, state dicts, or paths to safetensors files / torch checkpoints (a Lightning
            ``.ckpt`` gives its ``state_dict``). Both must have the same keys and shapes.
        alpha: the weight of the fine-tuned model (0 gives ``zero_shot``, 1 gives ``fine_tuned``; outside [0, 1]
            extrapolates, except with ``fisher``).
        fisher: optional diagonal Fisher information ``(F_0, F_1)`` of the two models (``diagonal_fisher``), keyed
            like the state dicts; entries present in both are Fisher-weighted, the others interpolated plainly.
        fisher_floor: lower bound applied to each Fisher value (the official code's ``1e-8``).

    Returns:
        Name -> tensor on ``fine_tuned``'s devices and dtypes: new tensors for floating entries (computed in at
        least fp32), ``fine_tuned``'s own tensors for integer ones.

    Raises:
        ValueError: naming missing, unexpected or mis-shaped keys, or Fisher keys present in only one of the two.
    """
    check_number("alpha", alpha)
    check_number("fisher_floor", fisher_floor, low=0.0, low_open=True)
    if fisher is not None:
        check_number("alpha", alpha, low=0.0, high=1.0)  # outside [0, 1] a Fisher-weighted mean has no meaning
    theta_0 = io.read_weights(zero_shot, argument="zero_shot")
    theta_1 = io.read_weights(fine_tuned, argument="fine_tuned")
    # Files written without tied duplicates (safetensors' save_model) name a tied tensor once: fill the other names
    # from whichever argument is a module.
    for module in (zero_shot, fine_tuned):
        if isinstance(module, nn.Module):
            for names in _tied_names(module):
                for weights in (theta_0, theta_1):
                    present = next((name for name in names if name in weights), None)
                    if present is not None:
                        for name in names:
                            weights.setdefault(name, weights[present])
    io.check_keys(
        {name: t.shape for name, t in theta_1.items()},
        {name: t.shape for name, t in theta_0.items()},
        source="zero_shot",
        against="fine_tuned",
    )
    fisher_0, fisher_1 = _check_fisher(fisher, theta_1)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t1 in theta_1.items():
            if not t1.is_floating_point():
                out[name] = t1
                continue
            dtype = torch.promote_types(t1.dtype, torch.float32)
            t0 = theta_0[name].to(device=t1.device, dtype=dtype, copy=True)  # the result is computed in it
            t1_wide = t1.to(dtype)
            if name in fisher_0:
                f0 = fisher_0[name].to(device=t1.device, dtype=dtype).clamp_min(fisher_floor) * (1.0 - alpha)
                f1 = fisher_1[name].to(device=t1.device, dtype=dtype).clamp_min(fisher_floor) * alpha
                merged = (f0 * t0 + f1 * t1_wide) / (f0 + f1)
            else:
                kernels.lerp_([t0], [t1_wide], float(alpha))  # the engine's interpolation (blend's)
                merged = t0
            out[name] = merged.to(t1.dtype)
    return out


def _tied_names(module: nn.Module) -> list[list[str]]:
    """Groups of state_dict names that refer to one tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _check_fisher(
    fisher: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None, theta: Mapping[str, torch.Tensor]
) -> tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]:
    if fisher is None:
        return {}, {}
    if not isinstance(fisher, (tuple, list)) or len(fisher) != 2 or not all(isinstance(f, Mapping) for f in fisher):
        raise TypeError("fisher= must be a pair (F_0, F_1) of name -> tensor mappings, e.g. from diagonal_fisher()")
    fisher_0, fisher_1 = fisher
    only_one = sorted(set(fisher_0) ^ set(fisher_1))
    if only_one:
        raise ValueError(f"fisher= gives F_0 and F_1 for different entries; only in one of them: {only_one}")
    floating = {name: t.shape for name, t in theta.items() if t.is_floating_point()}
    io.check_keys(
        {name: shape for name, shape in floating.items() if name in fisher_0},
        {name: f.shape for name, f in fisher_0.items()},
        source="fisher[0]",
        against="the model's floating entries",
    )
    io.check_keys(
        {name: shape for name, shape in floating.items() if name in fisher_1},
        {name: f.shape for name, f in fisher_1.items()},
        source="fisher[1]",
        against="the model's floating entries",
    )
    return fisher_0, fisher_1


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    return batch, None


def diagonal_fisher(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    labels: Literal["sample", "empirical"] = "sample",
    forward: Forward | None = None,
    max_batches: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of a classifier: the mean over examples of the squared per-example gradient of
    ``log p(y | x)`` for each trainable parameter, with the module in eval mode.

    Args:
        module: the model, returning logits ``(batch, classes)``.
        batches: ``(inputs, targets)`` pairs or bare inputs, on the module's device.
        labels: ``"sample"`` draws ``y`` from the model's own prediction (the Fisher proper, as in Fisher-weighted
            merging); ``"empirical"`` uses the batch's targets.
        forward: ``forward(module, inputs) -> logits``; default ``module(inputs)``.
        max_batches: stop after this many batches.
        seed: seeds the label sampling.

    Returns:
        Parameter name -> fp32 tensor of the parameter's shape.
    """
    check_choice("labels", labels, ("sample", "empirical"))
    if max_batches is not None:
        check_number("max_batches", max_batches, low=1, integer=True)
    call: Forward = forward or (lambda m, x: m(x))
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in module.named_buffers()}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}

    def log_likelihood(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = call_with(module, {**weights, **buffers}, x.unsqueeze(0), forward)
        return F.log_softmax(logits.float(), dim=-1)[0].gather(0, y.reshape(1)).squeeze(0)

    per_example = torch.func.vmap(torch.func.grad(log_likelihood), in_dims=(None, 0, 0), randomness="different")
    count = 0
    generator: torch.Generator | None = None
    with eval_mode(module):
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            inputs, targets = _split(batch)
            if labels == "sample":
                with torch.no_grad():
                    probs = F.softmax(call(module, inputs).float(), dim=-1)
                if generator is None:
                    generator = torch.Generator(device=probs.device).manual_seed(seed)
                targets = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            elif targets is None:
                raise ValueError("labels='empirical' needs (inputs, targets) batches")
            grads = per_example(params, inputs, targets)
            for name, g in grads.items():
                sums[name] += g.float().square().sum(0)
            count += int(inputs.shape[0])
    if count == 0:
        raise ValueError("batches= yielded no examples")
    return {name: total / count for name, total in sums.items()}


def choose_alpha(curve: Mapping[float, float], *, mode: Literal["max", "min"] = "max") -> float:
    """The alpha with the best value in ``curve`` (alpha -> metric); ties go to the smallest alpha (closest to the
    zero-shot model, the more robust side). NaN values never win."""
    check_choice("mode", mode, ("max", "min"))
    finite = [(alpha, value) for alpha, value in curve.items() if value == value]
    if not finite:
        raise ValueError(f"curve={dict(curve)!r} has no finite value to choose from")
    sign = 1.0 if mode == "max" else -1.0
    best = max(sign * value for _, value in finite)
    return min(alpha for alpha, value in finite if sign * value == best)
