"""The WiSE-FT wrapper: the anchor theta_0 and ``weightavg.methods.wiseft``'s interpolations."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from weightavg.core.checks import check_number, check_output_file
from weightavg.core.rule import Snapshot
from weightavg.core.settings import TensorOptions, describe_arguments
from weightavg.methods.wiseft import WiSEFTSettings, apply_blend, blended, check_alphas
from weightavg.optim.base import AveragingOptimizer, ModelOptions


@dataclass(eq=False, repr=False)
class WiSEFT(TensorOptions, WiSEFTSettings, ModelOptions, AveragingOptimizer):  # signature: last base's fields first
    """``optimizer`` plus the zero-shot anchor theta_0 for WiSE-FT (``weightavg.methods.wiseft``).

    theta_0 is the model's state (``module=``, buffers included) when the wrapper is built, or ``anchor=``; stepping
    fine-tunes theta_1 as usual. Then ``with opt.interpolated(alpha): evaluate(model)`` evaluates
    ``(1 - alpha) * theta_0 + alpha * theta_1`` (swapped in, the live weights return after), ``opt.sweep(evaluate)``
    does it for the grid ``alphas``, and ``opt.apply(alpha)`` makes one permanent; a method given no alpha uses
    ``alpha`` (default 0.5, the paper's choice without tuning).

    Its arguments: ``ModelOptions``, the method's ``WiSEFTSettings`` and ``TensorOptions`` (Args below).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = WiSEFT(torch.optim.SGD(model.parameters(), lr=0.1), module=model)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
        >>> with opt.interpolated(0.5):
        ...     _ = model(torch.randn(8, 4))
        >>> opt.apply(0.5)
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_wrapping(Snapshot())
        self._read_settings(WiSEFTSettings)
        if self.anchor is not None:
            self.averager.load_weights(self.anchor, argument="anchor")

    def _alpha(self, alpha: float | None) -> float:
        if alpha is None:
            return 0.5 if self.alpha is None else self.alpha
        check_number("alpha", alpha)
        return float(alpha)

    def interpolated(self, alpha: float | None = None) -> AbstractContextManager[None]:
        """``with opt.interpolated(alpha):`` the model holds ``(1 - alpha) * theta_0 + alpha * theta_1``."""
        return blended(self.averager, self._alpha(alpha))

    def sweep(self, evaluate: Callable[[], Any], alphas: Sequence[float] | None = None) -> dict[float, Any]:
        """``{alpha: evaluate()}`` with each interpolation in the model in turn (default grid: ``alphas``, with a
        fixed ``alpha``); the live weights return after."""
        results = {}
        for alpha in self.evaluated_alphas() if alphas is None else check_alphas(alphas):
            with self.interpolated(alpha):
                results[alpha] = evaluate()
        return results

    def apply(self, alpha: float | None = None) -> None:
        """Make the interpolation at ``alpha`` the model's weights, in place (theta_0 is kept)."""
        apply_blend(self.averager, self._alpha(alpha))

    def save_interpolated(self, path: str | os.PathLike[str], alpha: float | None = None) -> None:
        """Export the interpolation at ``alpha`` as safetensors (atomic write; a folder or an unwritable path is
        refused)."""
        check_output_file("path", path)
        with self.interpolated(alpha):
            self.averager.save_model(path)


describe_arguments(WiSEFT)
