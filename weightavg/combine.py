"""``python -m weightavg.combine``: combine saved snapshots (a folder written by ``SnapshotStore`` or any safetensors
files of one model) into one set of weights, written as safetensors.

Examples::

    python -m weightavg.combine runs/snapshots --method uniform --output soup.safetensors
    python -m weightavg.combine runs/snapshots --method ema --decay 0.9 --output ema.safetensors
    python -m weightavg.combine runs/snapshots --method metric --by loss --penalty 2 --output mwa.safetensors
    python -m weightavg.combine a.safetensors b.safetensors --weights 1.5,-0.5 --output extrapolated.safetensors
    python -m weightavg.combine runs/snapshots --method lcsc --fitness mypkg.evaluate:score --output lcsc.safetensors

``--fitness module:function`` names ``function(weights: dict[str, Tensor]) -> float`` (higher is better unless
``--mode min``); it drives ``lcsc`` and ``greedy`` and scores the other methods. Files are ordered oldest first (by the
step their metadata records, else by name); the newest gives the integer buffers.

Every argument is checked before any snapshot is combined (``--output``/``--result`` must be writable files). During
``lcsc`` and ``greedy`` a candidate whose fitness is not finite never wins; a chosen combination without a finite
fitness is an error. ``lcsc`` and ``greedy`` show a progress bar on stderr when it is a terminal (``--no-progress``:
never). Mistakes and failures (a bad argument, an unreadable input, a fitness that cannot be imported or raises, a
full disk, a read-only folder) end with one line ``weightavg.combine: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from weightavg.core import io
from weightavg.core.checks import check_number, check_output_file
from weightavg.core.io import describe_error
from weightavg.core.snapshots import SnapshotInfo, SnapshotStore, combine, open_snapshot_file
from weightavg.methods.lcsc import (
    METHODS,
    SearchResult,
    SearchSettings,
    check_options,
    choose_weights,
)


class CommandError(ValueError):
    """A failure the command reports in one line (the message names the argument or the file)."""


def find_snapshots(paths: Sequence[str], *, skip_damaged: bool = False) -> list[SnapshotInfo]:
    """Snapshots from folders (a ``SnapshotStore``'s, or any ``*.safetensors`` in them) and files, oldest first.

    Folders are only read (a run may be writing them). A damaged snapshot file is refused by name, or with
    ``skip_damaged`` skipped with a line on stderr naming it."""
    found: list[SnapshotInfo] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reported below, whatever the warning filters
                store = SnapshotStore(path, read_only=True, skip_damaged=skip_damaged)
            for skipped, reason in store.skipped:
                print(f"weightavg.combine: skipping damaged snapshot file {skipped} ({reason})", file=sys.stderr)
            listed = store.snapshots
            found += listed or [SnapshotInfo(i, path=p) for i, p in enumerate(sorted(path.glob("*.safetensors")))]
        elif path.is_file():
            found.append(SnapshotInfo(len(found), path=path))
        else:
            raise FileNotFoundError(f"{name!r}: no such file or folder")
    if not found:
        raise ValueError(f"no snapshots found in {list(paths)}")
    return found


def load_fitness(spec: str) -> Callable[[dict[str, torch.Tensor]], float]:
    """``module:function`` -> the function; ``CommandError`` naming what is missing or broken."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CommandError(f"--fitness {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise CommandError(f"--fitness {spec!r}: no module named {error.name!r} (is it on PYTHONPATH?)") from None
    except Exception as error:  # the user's module failed while importing: say how, in one line
        raise CommandError(f"--fitness {spec!r}: importing {module_name!r} failed: {describe_error(error)}") from None
    if not hasattr(module, attribute):
        raise CommandError(f"--fitness {spec!r}: {module_name!r} has no attribute {attribute!r}")
    function = getattr(module, attribute)
    if not callable(function):
        raise CommandError(
            f"--fitness {spec!r}: {attribute!r} is not callable ({type(function).__name__}): name a function"
        )
    return function  # type: ignore[no-any-return]


Scorer = Callable[[dict[str, torch.Tensor]], float]


def _scorer(spec: str, function: Callable[[dict[str, torch.Tensor]], Any]) -> Scorer:
    """``function`` whose failures (raising, returning something that is not a number) become ``CommandError``."""

    def score(weights: dict[str, torch.Tensor]) -> float:
        try:
            value = function(weights)
        except Exception as error:  # the user's function: report it in one line instead of a traceback
            raise CommandError(f"--fitness {spec!r} raised {describe_error(error)}") from None
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with more than one element
            raise CommandError(f"--fitness {spec!r} returned {value!r}, not a number") from None

    return score


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad arguments before reading any snapshot (the values the parser cannot check)."""
    check_options(
        method=args.method,
        mode=args.mode,
        decay=args.decay,
        penalty=args.penalty,
        by=args.by,
        metric_key=args.metric_key,
        rule=args.rule,
    )
    check_number("--population", args.population, low=1, integer=True)
    check_number("--generations", args.generations, low=0, integer=True)
    check_output_file("--output", args.output)
    if args.result is not None:
        check_output_file("--result", args.result)
        if Path(args.result).resolve() == Path(args.output).resolve():
            raise CommandError(f"--result {args.result!r} is the --output file: give them different paths")
    if args.weights is None and args.method in ("lcsc", "greedy") and args.fitness is None:
        raise CommandError(f"--method {args.method} needs --fitness module:function to score candidates")


def check_readable(snapshots: Sequence[SnapshotInfo]) -> None:
    """Open every snapshot's header before combining any (cheap: no tensor is read), so that a damaged or foreign
    file is named (``DamagedFileError``) before work is done, not found half-way through a search."""
    for snapshot in snapshots:
        if snapshot.path is not None:
            with open_snapshot_file(snapshot):
                pass


def parse_weights(text: str, k: int) -> list[float]:
    """``--weights 1.5,-0.5`` -> ``[1.5, -0.5]``: finite numbers, one per snapshot."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise CommandError(f"--weights {text!r} must be comma-separated numbers, e.g. 1.5,-0.5") from None
    if not all(math.isfinite(w) for w in weights):
        raise CommandError(f"--weights {text!r} must be finite numbers")
    if len(weights) != k:
        raise CommandError(f"--weights has {len(weights)} values for {k} snapshots")
    return weights


def run(args: argparse.Namespace) -> SearchResult:
    check_arguments(args)
    scorer = _scorer(args.fitness, load_fitness(args.fitness)) if args.fitness else None
    snapshots = find_snapshots(args.snapshots, skip_damaged=args.skip_damaged)
    check_readable(snapshots)
    k = len(snapshots)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    weights = None if args.weights is None else parse_weights(args.weights, k)

    def fitness(weights: torch.Tensor) -> float:
        assert scorer is not None
        return scorer(combine(snapshots, weights, dtype=dtype))

    if weights is not None:
        value = fitness(torch.tensor(weights, dtype=torch.float64)) if scorer is not None else float("nan")
        result = SearchResult(weights, value, args.mode, int(scorer is not None), 0)
    else:
        # parents may not exceed population; the command has no --parents, so a small population breeds from all
        settings = SearchSettings(
            population=args.population,
            parents=min(SearchSettings.parents, args.population),
            generations=args.generations,
            seed=args.seed,
        )
        result = choose_weights(
            args.method,
            snapshots,
            fitness if scorer is not None else None,
            mode=args.mode,
            settings=settings,
            decay=args.decay,
            penalty=args.penalty,
            by=args.by,
            metric_key=args.metric_key,
            rule=args.rule,
            progress=args.method in ("lcsc", "greedy") and args.progress and sys.stderr.isatty(),
        )
    if scorer is not None and not math.isfinite(result.fitness):
        raise CommandError(
            f"--fitness {args.fitness!r} gave no finite score (the chosen coefficients [{_listed(result.weights)}] "
            f"scored {result.fitness}); nothing was written"
        )
    combined = combine(snapshots, result.weights, dtype=dtype)
    assert snapshots[-1].path is not None
    with open_snapshot_file(snapshots[-1]) as newest:
        dtypes = {name: newest[name].dtype for name in combined}
    cast = None if args.save_dtype == "same" else getattr(torch, args.save_dtype)
    tensors = {
        name: value.to(cast or dtypes[name]) if value.is_floating_point() else value for name, value in combined.items()
    }
    _write("--output", args.output, lambda: io.save_safetensors(tensors, args.output))
    if args.result is not None:
        _write("--result", args.result, lambda: result.save(args.result))
    return result


def _listed(weights: Sequence[float]) -> str:
    return ", ".join(f"{w:.4g}" for w in weights)


def _write(argument: str, path: str, write: Callable[[], object]) -> None:
    """Run ``write``; a failure (disk full, a folder made read-only meanwhile) names the argument and the file."""
    try:
        write()
    except OSError as error:
        raise CommandError(f"writing {argument} {path!r} failed: {describe_error(error)}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m weightavg.combine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("snapshots", nargs="+", help="snapshot folders and/or safetensors files")
    parser.add_argument("--output", required=True, help="where to write the combined weights (safetensors)")
    parser.add_argument("--method", choices=METHODS, default="uniform")
    parser.add_argument("--weights", help="comma-separated coefficients, one per snapshot (overrides --method)")
    parser.add_argument("--fitness", help="module:function scoring a state dict (drives lcsc and greedy)")
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    parser.add_argument("--decay", type=float, default=0.9, help="for --method ema")
    parser.add_argument("--by", choices=("loss", "step"), default="loss", help="for --method metric")
    parser.add_argument("--penalty", type=float, default=1.0, help="for --method metric")
    parser.add_argument("--metric-key", default="train_loss", help="for --method metric --by loss")
    parser.add_argument("--rule", choices=("strict", "not_worse"), default="strict", help="for --method greedy")
    parser.add_argument(
        "--population",
        type=int,
        default=16,
        help="for --method lcsc (children are bred from the best min(4, population))",
    )
    parser.add_argument("--generations", type=int, default=25, help="for --method lcsc")
    parser.add_argument("--seed", type=int, default=0, help="for --method lcsc")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="accumulation dtype")
    parser.add_argument("--save-dtype", choices=("same", "float32", "float16", "bfloat16"), default="same")
    parser.add_argument("--result", help="write the coefficients and the search history here (JSON)")
    parser.add_argument(
        "--skip-damaged",
        action="store_true",
        help="skip unreadable snapshot files in folders (each named on stderr) instead of refusing",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (shown for lcsc and greedy when stderr is a terminal)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, OSError) as error:
        # One line, no traceback: these are the user's arguments, inputs, fitness or disk, never a bug to debug here.
        # (ValueError includes DamagedFileError; OSError: unreadable inputs, a snapshot deleted by a run writing the
        # folder, a full disk, a read-only folder.)
        print(f"weightavg.combine: {_oneline(error)}", file=sys.stderr)
        return 2
    scored = f"fitness {result.fitness:.6g}" if math.isfinite(result.fitness) else "not scored (no --fitness)"
    print(f"coefficients: [{_listed(result.weights)}]; {scored}; written {args.output}")
    return 0


def _oneline(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
