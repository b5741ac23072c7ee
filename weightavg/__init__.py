"""weightavg: weight averaging (EMA, SWA, WiSE-FT, ZSCL, ...) as a one-line, near-free addition to training.

Faces: ``weightavg.callbacks`` (Lightning), ``weightavg.optim`` (plain loops), ``weightavg.config`` (Hydra).
The top-level ``EMA``, ``SWA`` and ``ZSCL`` are the rules (``weightavg.methods``) for ``Averager``; in a ``Trainer``
use ``weightavg.callbacks.EMA`` (a rule passed there by mistake raises an error that says so).
"""

from weightavg.core import Averager, Clock, Rule, Snapshot, load_into_module
from weightavg.methods import EMA, SWA, ZSCL

__version__ = "0.1.0"

__all__ = ["EMA", "SWA", "ZSCL", "Averager", "Clock", "Rule", "Snapshot", "__version__", "load_into_module"]
