"""The ``local_ddp`` strategy, at its former path: it lives in ``weightavg.callbacks.strategy``, beside the Lightning
face (importing either registers ``local_ddp`` with Lightning)."""

from weightavg.callbacks.strategy import NAME, LocalDDPStrategy, rank_path, register_strategies

__all__ = ["NAME", "LocalDDPStrategy", "rank_path", "register_strategies"]
