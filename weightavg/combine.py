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
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from weightavg.core import io
from weightavg.core.snapshots import SnapshotInfo, SnapshotStore, combine, open_weights
from weightavg.methods.lcsc import METHODS, SearchResult, SearchSettings, choose_weights


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
    """``module:function`` -> the function."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--fitness {spec!r} must look like package.module:function")
    function = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(function):
        raise ValueError(f"--fitness {spec!r}: {attribute!r} is not a callable in {module_name!r}")
    return function  # type: ignore[no-any-return]


def run(args: argparse.Namespace) -> SearchResult:
    snapshots = find_snapshots(args.snapshots, skip_damaged=args.skip_damaged)
    k = len(snapshots)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    scorer = load_fitness(args.fitness) if args.fitness else None

    def fitness(weights: torch.Tensor) -> float:
        assert scorer is not None
        return float(scorer(combine(snapshots, weights, dtype=dtype)))

    if args.weights is None and args.method in ("lcsc", "greedy") and scorer is None:
        raise ValueError(f"--method {args.method} needs --fitness module:function to score candidates")
    if args.weights is not None:
        weights = [float(w) for w in args.weights.split(",")]
        if len(weights) != k:
            raise ValueError(f"--weights has {len(weights)} values for {k} snapshots")
        value = fitness(torch.tensor(weights, dtype=torch.float64)) if scorer is not None else float("nan")
        result = SearchResult(weights, value, args.mode, int(scorer is not None), 0)
    else:
        settings = SearchSettings(population=args.population, generations=args.generations, seed=args.seed)
        result = choose_weights(
            args.method, snapshots, fitness if scorer is not None else None, mode=args.mode, settings=settings,
            decay=args.decay, penalty=args.penalty, by=args.by, metric_key=args.metric_key, rule=args.rule,
            progress=args.method == "lcsc",
        )
    combined = combine(snapshots, result.weights, dtype=dtype)
    assert snapshots[-1].path is not None
    with open_weights(snapshots[-1].path) as newest:
        dtypes = {name: newest[name].dtype for name in combined}
    cast = None if args.save_dtype == "same" else getattr(torch, args.save_dtype)
    tensors = {
        name: value.to(cast or dtypes[name]) if value.is_floating_point() else value for name, value in combined.items()
    }
    io.save_safetensors(tensors, args.output)
    if args.result is not None:
        result.save(args.result)
    return result


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
    parser.add_argument("--population", type=int, default=16, help="for --method lcsc")
    parser.add_argument("--generations", type=int, default=25, help="for --method lcsc")
    parser.add_argument("--seed", type=int, default=0, help="for --method lcsc")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="accumulation dtype")
    parser.add_argument("--save-dtype", choices=("same", "float32", "float16", "bfloat16"), default="same")
    parser.add_argument("--result", help="write the coefficients and the search history here (JSON)")
    parser.add_argument("--skip-damaged", action="store_true",
                        help="skip unreadable snapshot files in folders (each named on stderr) instead of refusing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"weightavg.combine: {error}", file=sys.stderr)
        return 2
    weights = ", ".join(f"{w:.4g}" for w in result.weights)
    print(f"coefficients: [{weights}]; fitness {result.fitness:.6g}; written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
