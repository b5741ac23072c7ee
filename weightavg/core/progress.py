"""Progress bars for the long loops after training (LCSC search, WiSE-FT sweep, ``python -m weightavg.combine``).

Only the bar itself lives here (tqdm, written to stderr); whether to show one is the face's decision: the Lightning
callbacks follow the Trainer's progress bar, the command line shows one when stderr is a terminal.
"""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, description: str, *, enabled: bool = True, unit: str = "eval") -> Any:
    """A tqdm bar over ``total`` steps, or ``None`` when ``enabled`` is false or tqdm is not installed.

    The bar has tqdm's ``update(n)``, ``set_postfix(...)`` and ``close()``; callers skip them on ``None``.
    """
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no progress bar without tqdm (it comes with Lightning)
        return None
    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)
