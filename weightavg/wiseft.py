"""WiSE-FT's standalone functions (``weightavg.methods.wiseft``): ``interpolate``, ``diagonal_fisher``,
``choose_alpha`` and the paper's grid ``ALPHAS``. The faces are ``weightavg.callbacks.WiSEFT`` and
``weightavg.optim.WiSEFT``."""

from weightavg.methods.wiseft import ALPHAS, choose_alpha, diagonal_fisher, interpolate

__all__ = ["ALPHAS", "choose_alpha", "diagonal_fisher", "interpolate"]
