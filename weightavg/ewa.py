"""EWA's model surgery and update (``weightavg.methods.ewa``): ``to_moe``, ``to_dense``, ``share_all``, ``linear_ramp``
and the ``RandomPartitionMoE`` layer. Faces: ``weightavg.callbacks.EWA``, ``weightavg.optim.EWA``, Hydra
``averaging=ewa``; see docs/ewa.md."""

from weightavg.methods.ewa import (
    RandomPartitionMoE,
    default_ffn_names,
    linear_ramp,
    mixtures,
    share_all,
    to_dense,
    to_moe,
)

__all__ = ["RandomPartitionMoE", "default_ffn_names", "linear_ramp", "mixtures", "share_all", "to_dense", "to_moe"]
