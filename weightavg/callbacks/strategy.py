"""Lightning strategy for replicas that train alone (NoLoCo, DiLoCo): processes and distributed samplers as DDP,
without the per-step gradient all-reduce.

``Trainer(strategy="local_ddp", devices=N, callbacks=[weightavg.callbacks.NoLoCo()])``. It lives beside the
Lightning face it serves: the name ``local_ddp`` is added to Lightning's strategy registry (idempotently, and only that
name) when the Lightning face is imported (``weightavg.callbacks`` imports this module); ``import weightavg`` alone
registers nothing. ``Trainer(strategy=LocalDDPStrategy(...))`` needs no registration.
"""

from __future__ import annotations

import os
import types
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from weightavg.core.checks import check_choice

NAME = "local_ddp"


def rank_path(path: _PATH, rank: int) -> _PATH:
    """Where ``rank`` keeps its own checkpoint for ``path``: rank 0 at ``path``, rank r in a ``rank{r}`` folder beside
    it (out of the way of Lightning's scans of the checkpoint folder). Remote paths (``s3://...``) keep their form."""
    if rank == 0:
        return path
    head, tail = os.path.split(str(path))
    return f"{head}/rank{rank}/{tail}" if head else f"rank{rank}/{tail}"


class LocalDDPStrategy(DDPStrategy):
    """DDP's processes, devices and distributed samplers, but the model is not wrapped in
    ``DistributedDataParallel``: gradients stay local, and replicas meet only through an outer-step callback
    (``weightavg.callbacks.NoLoCo`` / ``DiLoCo``). Rank 0's weights are broadcast once at setup.

    Args:
        checkpoints: ``"per_rank"`` (default): every rank writes its own checkpoint (rank 0 at the usual path, rank r
            under ``rank{r}/`` beside it) and resumes from its own, since replicas differ between outer steps;
            ``"rank_zero"``: Lightning's default, rank 0's replica only (resuming then starts every rank from it).
        sigterm: ``"local"`` (default): each rank checks its own SIGTERM flag; Lightning's default, ``"broadcast"``,
            broadcasts rank 0's flag before every training batch, a blocking collective per step that makes every
            replica wait for the slowest (what NoLoCo avoids).
        **kwargs: as for ``DDPStrategy`` (``start_method``, ``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = NAME

    def __init__(
        self,
        *,
        checkpoints: Literal["per_rank", "rank_zero"] = "per_rank",
        sigterm: Literal["local", "broadcast"] = "local",
        **kwargs: Any,
    ) -> None:
        check_choice("checkpoints", checkpoints, ("per_rank", "rank_zero"))
        check_choice("sigterm", sigterm, ("local", "broadcast"))
        super().__init__(**kwargs)
        self.checkpoints = checkpoints
        self.sigterm = sigterm

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # After the start-of-fit broadcast of rank 0's weights, so each rank then resumes its own replica.
        return True

    @override
    def configure_ddp(self) -> None:
        assert self.model is not None
        _sync_module_states(self.model)  # one broadcast from rank 0, as DistributedDataParallel does at wrap time

    @override
    def setup_environment(self) -> None:
        if self._layer_sync is not None:  # refused before any process group exists
            raise ValueError(
                "Trainer(sync_batchnorm=True) all-reduces BatchNorm statistics in every forward pass; strategy="
                f"{NAME!r} keeps replicas apart between outer steps: use sync_batchnorm=False"
            )
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self.sigterm == "local":
            loop = trainer.fit_loop.epoch_loop
            if not hasattr(loop, "_broadcast_sigterm_tensor"):
                rank_zero_warn("weightavg: this Lightning version has no per-batch SIGTERM broadcast to replace")
                return

            def local_sigterm(self_: Any) -> None:
                if getattr(trainer, "received_sigterm", False):
                    raise SIGTERMException()

            loop._broadcast_sigterm_tensor = types.MethodType(local_sigterm, loop)  # type: ignore[method-assign]

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if self.checkpoints == "rank_zero":
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        # Every rank saves at the same point; rank 0 names the file (ModelCheckpoint formats names from each rank's
        # own metrics, which differ between replicas).
        filepath = self.broadcast(filepath)
        self.checkpoint_io.save_checkpoint(checkpoint, rank_path(filepath, self.global_rank), storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.checkpoints == "rank_zero":
            super().remove_checkpoint(filepath)
            return
        filepath = self.broadcast(filepath)
        self.checkpoint_io.remove_checkpoint(rank_path(filepath, self.global_rank))

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = checkpoint_path
        if self.checkpoints == "per_rank" and self.global_rank > 0:
            path = rank_path(checkpoint_path, self.global_rank)
            if not get_filesystem(path).exists(path):
                raise FileNotFoundError(
                    f"rank {self.global_rank} has no checkpoint of its own for ckpt_path={str(checkpoint_path)!r} "
                    f"(looked for {path}); it was saved with fewer processes or with checkpoints='rank_zero'"
                )
        return super().load_checkpoint(path, weights_only=weights_only)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            NAME,
            cls,
            description="DDP processes and samplers without gradient all-reduce (NoLoCo, DiLoCo)",
            override=True,
        )


def register_strategies() -> None:
    """Register ``"local_ddp"`` in Lightning's strategy registry (done when this module is imported)."""
    LocalDDPStrategy.register_strategies(StrategyRegistry)


register_strategies()

__all__ = ["LocalDDPStrategy", "NAME", "rank_path", "register_strategies"]
