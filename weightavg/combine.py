"""``python -m weightavg.combine``: combine saved snapshots (a folder written by ``SnapshotStore`` or any safetensors
files of one model) into one set of weights, written as safetensors.

Examples::

    python -m weightavg.combine runs/snapshots --method uniform --output soup.safetensors
    python -m weightavg.combine runs/snapshots --method ema --decay 0.9 --output ema.safetensors
    python -m weightavg.combine runs/snapshots --method metric --by loss --penalty 2 --output mwa.safetensors
    python -m weightavg.combine a.safetensors b.safetensors --weights 1.5,-0.5 --output extrapolated.safetensors
    python -m weightavg.combine runs/snapshots --method lcsc --fitness mypkg.evaluate:score --output lcsc.safetensors

``--fitness module:function`` names ``function(weights: dict[str, Tensor]) -> float`` (higher is better unless
``--mode min``); it drives ``lcsc`` and ``greedy`` and scores the other methods. The recipe options and the search
options are generated from ``CombineSettings`` and ``SearchSettings`` (``weightavg.methods.lcsc``), and ``--method``
from its ``RECIPES``, so the command, the callback, the wrapper and the Hydra config take the same settings. Files
are ordered oldest first (by the step their metadata records, else by name); the newest gives the integer buffers.

Every argument is checked before any snapshot is combined (``--output``/``--result`` must be writable files). During
``lcsc`` and ``greedy`` a candidate whose fitness is not finite never wins; a chosen combination without a finite
fitness is an error. ``lcsc`` and ``greedy`` show a progress bar on stderr when it is a terminal (``--no-progress``:
never). Mistakes and failures (a bad argument, an unreadable input, a fitness that cannot be imported or raises, a
full disk, a read-only folder) end with one line ``weightavg.combine: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch

from weightavg.core import io
from weightavg.core.checks import check_output_file
from weightavg.core.io import describe_error
from weightavg.core.settings import field_docs
from weightavg.core.snapshots import SnapshotInfo, SnapshotStore, combine, open_snapshot_file
from weightavg.methods.lcsc import RECIPES, CombineSettings, SearchResult, SearchSettings, choose_weights


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


def recipe_from(args: argparse.Namespace) -> CombineSettings:
    """The ``CombineSettings`` the arguments give (checked: a bad value names the setting and what is allowed)."""
    given = {name: getattr(args, name) for name in _fields(SearchSettings) if getattr(args, name) is not None}
    recipe = {name: getattr(args, name) for name in _fields(CombineSettings) if name != "settings"}
    settings = CombineSettings(**recipe, settings=SearchSettings(**given) if given else None)
    settings.warn_unused()  # the command runs this one recipe
    return settings


def _named_as_options(message: str) -> str:
    """A settings check's message, naming the command's options (``--decay 1.5 ...``) instead of the settings."""
    searched = r"^CombineSettings: settings=SearchSettings\(.*?\) is (.*) \(it is"
    message = re.sub(searched, r"the search options are \1 (they are", message)
    message = re.sub(r"^CombineSettings: ", "", message)
    message = re.sub(r"method='(\w+)'", r"--method \1", message)
    for name in (*_fields(CombineSettings), *_fields(SearchSettings)):
        if message.startswith(f"{name}="):
            return f"--{name.replace('_', '-')} {message[len(name) + 1 :]}"
    return message


def check_arguments(args: argparse.Namespace) -> CombineSettings:
    """Refuse bad arguments before reading any snapshot (the values the parser cannot check), naming the option."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recipe = recipe_from(args)
    except (TypeError, ValueError) as error:
        raise CommandError(_named_as_options(str(error))) from None
    for warning in caught:  # options the chosen recipe ignores: one line each, as the command's other messages
        print(f"weightavg.combine: {_named_as_options(str(warning.message))}", file=sys.stderr)
    check_output_file("--output", args.output)
    if args.result is not None:
        check_output_file("--result", args.result)
        if Path(args.result).resolve() == Path(args.output).resolve():
            raise CommandError(f"--result {args.result!r} is the --output file: give them different paths")
    if args.weights is None and RECIPES[args.method].needs_fitness and args.fitness is None:
        raise CommandError(f"--method {args.method} needs --fitness module:function to score candidates")
    return recipe


def check_output_is_no_input(args: argparse.Namespace, snapshots: Sequence[SnapshotInfo]) -> None:
    """Refuse an ``--output``/``--result`` that is one of the snapshots (it would be overwritten, and its run's
    snapshot lost) or a snapshot file name inside an input folder, and inputs given twice (counted twice)."""
    inputs = [Path(s.path).resolve() for s in snapshots if s.path is not None]
    repeated = sorted({str(path) for path in inputs if inputs.count(path) > 1})
    if repeated:
        raise CommandError(f"snapshots given more than once (each would count twice): {repeated}")
    folders = {Path(name).resolve() for name in args.snapshots if Path(name).is_dir()}
    for option, value in (("--output", args.output), ("--result", args.result)):
        if value is None:
            continue
        path = Path(value).resolve()
        if path in inputs or (path.parent in folders and path.name.startswith("snapshot-")):
            raise CommandError(f"{option} {value!r} is one of the snapshots being combined: write it elsewhere")


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
    recipe = check_arguments(args)
    scorer = _scorer(args.fitness, load_fitness(args.fitness)) if args.fitness else None
    snapshots = find_snapshots(args.snapshots, skip_damaged=args.skip_damaged)
    check_readable(snapshots)
    check_output_is_no_input(args, snapshots)
    k = len(snapshots)
    dtype = recipe.accumulation_dtype
    weights = None if args.weights is None else parse_weights(args.weights, k)

    def fitness(weights: torch.Tensor) -> float:
        assert scorer is not None
        return scorer(combine(snapshots, weights, dtype=dtype))

    if weights is not None:
        value = fitness(torch.tensor(weights, dtype=torch.float64)) if scorer is not None else float("nan")
        result = SearchResult(weights, value, args.mode, int(scorer is not None), 0)
    else:
        result = choose_weights(
            recipe,
            snapshots,
            fitness if scorer is not None else None,
            mode=args.mode,
            progress=RECIPES[args.method].needs_fitness and args.progress and sys.stderr.isatty(),
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


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "_"]  # type: ignore[arg-type]


def _parsed_as(kind: Any) -> dict[str, Any]:
    """``add_argument`` options parsing a value of type ``kind`` (a ``None`` in a union is written ``none``)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return {"choices": list(args)}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": args[0], "nargs": "+"}
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        parse = _parsed_as(inner)["type"]
        return {"type": lambda text: None if text.lower() == "none" else parse(text)}
    return {"type": kind}


def add_settings(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    title: str,
    skip: tuple[str, ...] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
    aliases: dict[str, tuple[str, ...]] | None = None,
    defaults: bool = True,
) -> None:
    """One option per field of the settings dataclass ``cls`` (``--metric-key`` for ``metric_key``), typed from its
    annotation and explained by its docstring: a setting added to the class appears here as well. With
    ``defaults=False`` an option not given is ``None`` (the class's default then applies)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not field.init or field.name == "_" or field.name in skip:
            continue
        options = {**_parsed_as(hints[field.name]), **(overrides or {}).get(field.name, {})}
        default = options.pop("default", field.default)
        extra = options.pop("help_extra", "")
        text = " ".join(f"{docs.get(field.name, '')} {extra}".replace("``", "").split()).replace("%", "%%")
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            default=default if defaults else None,
            help=f"{text} (default: {shown})",
            **options,
        )
        for alias in (aliases or {}).get(field.name, ()):
            group.add_argument(alias, dest=field.name, action=_FormerName, help=argparse.SUPPRESS, **options)


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, as every other failure of the command (``--help`` has the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"weightavg.combine: {message} (python -m weightavg.combine --help lists the options)\n")


class _FormerName(argparse.Action):
    """An option's former name: works for a release, with a line on stderr naming the new one."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"weightavg.combine: {option} is now {new} ({option} will be removed)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """The command's parser: its recipe and search options generated from ``CombineSettings`` and
    ``SearchSettings``, ``--method`` from ``RECIPES``."""
    parser = _Parser(
        prog="python -m weightavg.combine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("snapshots", nargs="+", help="snapshot folders and/or safetensors files")
    parser.add_argument("--output", required=True, help="where to write the combined weights (safetensors)")
    parser.add_argument("--weights", help="comma-separated coefficients, one per snapshot (overrides --method)")
    parser.add_argument("--fitness", help="module:function scoring a state dict (drives lcsc and greedy)")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="whether a higher fitness is better")
    recipes = "; ".join(f"{name}: {recipe.description}" for name, recipe in RECIPES.items())
    add_settings(
        parser,
        CombineSettings,
        title="the recipe (weightavg.methods.lcsc.CombineSettings)",
        skip=("settings",),
        overrides={
            "method": {"default": "uniform", "help_extra": recipes},
            "dtype": {"choices": ["float32", "float64"], "type": str},
        },
        aliases={"greedy_rule": ("--rule",)},  # its name before the setting was declared once
    )
    add_settings(
        parser,
        SearchSettings,
        title="the search of --method lcsc (weightavg.methods.lcsc.SearchSettings)",
        defaults=False,
    )
    parser.add_argument(
        "--save-dtype",
        choices=("same", "float32", "float16", "bfloat16"),
        default="same",
        help="the dtype of the written tensors (default: same: each as in the newest snapshot)",
    )
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
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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
