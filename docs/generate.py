"""Regenerate the knob tables of the docs pages from the settings dataclasses, where each setting is declared once
(type, default and docstring: ``weightavg.core.settings``).

    python docs/generate.py          # rewrite the tables between <!-- knobs: NAME --> and <!-- /knobs -->
    python docs/generate.py --check  # exit 1 naming the tables that are out of date (tests/test_docs.py runs it)
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
MARKER = re.compile(r"(<!-- knobs: (?P<name>[\w-]+) -->\n)(?P<table>.*?)(<!-- /knobs -->)", re.S)


def tables() -> dict[str, tuple[list[type], dict[str, Any]]]:
    """Table name -> (the settings classes whose fields are its rows, the faces whose defaults it shows)."""
    import weightavg.callbacks as cb
    import weightavg.optim as wo
    from weightavg.core.settings import DtypeOption, EngineOptions, TensorOptions
    from weightavg.methods.ema import EMASettings
    from weightavg.methods.ewa import ConversionSettings, ShareSettings
    from weightavg.methods.lcsc import CombineSettings, SearchSettings, SnapshotSettings
    from weightavg.methods.noloco import DiLoCoSettings, NoLoCoSettings
    from weightavg.methods.swa import SWASettings
    from weightavg.methods.wiseft import WiSEFTSettings
    from weightavg.methods.zscl import DistillationSettings, EnsembleSettings

    both = "Lightning, Hydra"
    return {
        "ema": ([EMASettings], {both: cb.EMA, "optimizer": wo.EMA}),
        "swa": ([SWASettings], {both: cb.SWA, "optimizer": wo.SWA}),
        "swa-lightning": ([cb.BatchNormOptions], {both: cb.SWA}),
        "wiseft": ([WiSEFTSettings], {both: cb.WiSEFT, "optimizer": wo.WiSEFT}),
        "wiseft-lightning": ([cb.WiSEFT, cb.FitnessOptions, cb.OutputOptions], {both: cb.WiSEFT}),
        "zscl": ([EnsembleSettings, DistillationSettings], {both: cb.ZSCL, "optimizer": wo.ZSCL}),
        "lcsc-snapshots": ([SnapshotSettings], {both: cb.LCSC, "optimizer": wo.LCSC}),
        "lcsc-recipe": ([CombineSettings], {both: cb.LCSC, "optimizer": wo.LCSC}),
        "lcsc-search": ([SearchSettings], {"SearchSettings": SearchSettings}),
        "lcsc-lightning": (
            [cb.LCSC, cb.FitnessOptions, cb.OutputOptions, cb.BatchNormOptions],
            {both: cb.LCSC},
        ),
        "callback-options": ([cb.OutputOptions, cb.HostOptions, cb.CallbackOptions], {both: cb.EMA}),
        "wrapper-options": ([wo.InnerOptimizer, wo.WrapperOptions], {"optimizer": wo.EMA}),
        "model-options": ([wo.InnerOptimizer, wo.ModelOptions], {"optimizer": wo.WiSEFT}),
        "engine-options": ([DtypeOption, TensorOptions, EngineOptions], {both: cb.EMA, "optimizer": wo.EMA}),
        "tensor-options": ([TensorOptions], {both: cb.WiSEFT, "optimizer": wo.WiSEFT}),
        "noloco": ([NoLoCoSettings], {both: cb.NoLoCo, "optimizer": wo.NoLoCo}),
        "diloco": ([DiLoCoSettings], {both: cb.DiLoCo, "optimizer": wo.DiLoCo}),
        "ewa": ([ShareSettings, ConversionSettings, cb.EWA, cb.OutputOptions], {both: cb.EWA}),
        "outer-options": ([cb.OuterOptions], {both: cb.NoLoCo}),
        "replica-options": ([wo.ReplicaOptions], {"optimizer": wo.NoLoCo}),
    }


def recipes() -> str:
    """The table of LCSC's recipe registry (``weightavg.methods.lcsc.RECIPES``)."""
    from weightavg.methods.lcsc import RECIPES

    rows = ["| `method` | needs a fitness | the coefficients | source |", "|---|---|---|---|"]
    for name, recipe in RECIPES.items():
        rows.append(
            f"| `{name}` | {'yes' if recipe.needs_fitness else 'no (scored when given)'} | "
            f"{markdown(recipe.description)} | {markdown(recipe.paper)} |"
        )
    return "\n".join(rows) + "\n"


def own_fields(group: type) -> list[str]:
    """The fields ``group`` declares itself (a face declares only its own extras; a settings class all of its)."""
    annotations = vars(group).get("__annotations__", {})
    return [f.name for f in dataclasses.fields(group) if f.name in annotations and f.name != "_"]  # type: ignore[arg-type]


def markdown(text: str) -> str:
    """A docstring as one table cell: RST literals as Markdown code, one line, pipes escaped."""
    return " ".join(text.replace("``", "`").split()).replace("|", "\\|")


def value(default: Any) -> str:
    if default is inspect.Parameter.empty:
        return "required"
    if isinstance(default, float) and len(repr(default)) > 8:
        return f"`{default:.4g}`"
    if isinstance(default, str):
        return f'`"{default}"`'
    return f"`{default!r}`"


def table(groups: list[type], faces: dict[str, Any]) -> str:
    from weightavg.core.settings import field_docs

    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for group in groups:
        docs = field_docs(group)
        for name in own_fields(group):
            defaults = {face: inspect.signature(cls).parameters[name].default for face, cls in faces.items()}
            if len({repr(d) for d in defaults.values()}) == 1:
                default = value(next(iter(defaults.values())))
            else:
                default = "; ".join(f"{value(d)} ({face})" for face, d in defaults.items())
            rows.append(f"| `{name}` | {default} | {markdown(docs.get(name, ''))} |")
    return "\n".join(rows) + "\n"


def regenerate(page: Path) -> tuple[str, list[str]]:
    """The page's text with its knob tables regenerated, and the names of the tables that changed."""
    known, changed = tables(), []
    text = page.read_text()

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name != "recipes" and name not in known:
            raise KeyError(f"{page.name}: unknown knob table {name!r}; known: {sorted(known)}")
        fresh = recipes() if name == "recipes" else table(*known[name])
        if fresh != match["table"]:
            changed.append(f"{page.name}:{name}")
        return match[1] + fresh + match[4]

    return MARKER.sub(replace, text), changed


def main(argv: list[str]) -> int:
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text, changed = regenerate(page)
        stale += changed
        if changed and "--check" not in argv:
            page.write_text(text)
    if stale and "--check" in argv:
        print("out of date (run python docs/generate.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(DOCS.parent))
    raise SystemExit(main(sys.argv[1:]))
