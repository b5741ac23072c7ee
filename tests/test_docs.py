"""Every ```python block of README.md and docs/*.md runs as written.

The runner understands three markers, each written where a reader sees it or next to text that says the same:

- a block whose first line starts with ``# fragment`` is shown, not run (it says so in the rendered page);
- ``<!-- docs-test: setup -->`` on the line before a block: the page's setup (the page says its examples run after
  it); it runs once, and every later block of the page runs in a fresh copy of the names it defined;
- ``<!-- docs-test: setup from PAGE.md -->`` anywhere in a page: its blocks run after the setup block of ``PAGE.md``;
- a block whose first line is ``# torchrun --nproc_per_node=N train.py`` or ``# python train.py`` is a script: it is
  saved as that file in a fresh folder and run with that command (several processes, as the page says), alone.

Each page runs in one subprocess (imports once: two cores must run the whole set in about two minutes), each block
in a fresh namespace and a fresh temporary working directory, as ``__main__`` with no command-line arguments.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETUP = "<!-- docs-test: setup -->"
SETUP_FROM = re.compile(r"<!-- docs-test: setup from ([\w./-]+\.md) -->")
SCRIPT = re.compile(r"# (?:torchrun --nproc_per_node=(\d+)|python) ([\w.-]+\.py)[ \t]*$")
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
#: Seconds one page may take (the slowest page trains a few small models for a few epochs).
PAGE_TIMEOUT = 300


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    setup: bool
    fragment: bool

    @property
    def script(self) -> re.Match[str] | None:
        """The command on its first line, for a block that is a script (see the module docstring)."""
        return SCRIPT.match(self.code.split("\n", 1)[0])


def blocks(page: Path) -> list[Block]:
    """The ```python blocks of ``page`` in order, with their markers."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        code = match.group(1)
        found.append(Block(page.name, line, code, before == SETUP, code.lstrip().startswith("# fragment")))
    return found


def plan(page: Path) -> tuple[list[Block], list[Block]]:
    """(setup blocks, blocks to run) for ``page``: its own setup, or the one it names with ``setup from``."""
    own = blocks(page)
    setup = [b for b in own if b.setup]
    named = SETUP_FROM.search(page.read_text())
    if named is not None:
        other = (page.parent / named.group(1)).resolve()
        assert other.is_file(), f"{page.name}: 'setup from {named.group(1)}' names no page"
        setup = [b for b in blocks(other) if b.setup] + setup
        assert setup, f"{page.name}: {named.group(1)} has no '{SETUP}' block"
    return setup, [b for b in own if not b.setup and not b.fragment and b.script is None]


def run_script(block: Block, env: dict[str, str]) -> str | None:
    """Run a script block with the command its first line gives; the error (its output's tail), or None."""
    match = block.script
    assert match is not None
    processes, name = match.groups()
    with tempfile.TemporaryDirectory(prefix="weightavg-docs-") as work:
        (Path(work) / name).write_text(block.code)
        command = [sys.executable, name]
        if processes is not None:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
            command.append(name)
        done = subprocess.run(command, capture_output=True, text=True, cwd=work, env=env, timeout=PAGE_TIMEOUT)
    if done.returncode == 0:
        return None
    return f"{block.page}:{block.line}: {' '.join(command[1:])} exited {done.returncode}\n{done.stderr[-3000:]}"


def run_page(page: Path) -> list[dict[str, object]]:
    """Run in this process (the subprocess side): each block in a fresh namespace and temporary directory."""
    import torch

    torch.set_num_threads(1)  # two shared cores: one thread is the fastest for these tiny models
    setup, todo = plan(page)
    base: dict[str, object] = {"__name__": "__main__"}
    reports: list[dict[str, object]] = []
    start_dir = os.getcwd()
    sys.argv = ["docs-block"]
    runner_main = sys.modules["__main__"]
    for block in [*setup, *todo]:
        # The block's namespace is the __main__ module's, as in a script (dataclasses, typing.get_type_hints and
        # pickle look names up in sys.modules["__main__"]).
        main = types.ModuleType("__main__")
        main.__dict__.update(base if block.setup else dict(base))
        work = tempfile.mkdtemp(prefix="weightavg-docs-")
        os.chdir(work)
        sys.modules["__main__"] = main
        began = time.perf_counter()
        error = None
        try:
            exec(compile(block.code, f"{block.page}:{block.line}", "exec"), main.__dict__)
        except BaseException:
            error = traceback.format_exc(limit=-8)
        finally:
            sys.modules["__main__"] = runner_main
            os.chdir(start_dir)
        if block.setup:
            base = dict(main.__dict__)
        reports.append({"page": block.page, "line": block.line, "seconds": time.perf_counter() - began, "error": error})
        if error is not None and block.setup:
            break
    return reports


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_python_block_runs_as_written(page: Path) -> None:
    setup, todo = plan(page)
    scripts = [b for b in blocks(page) if b.script is not None and not b.fragment]
    if not todo and not scripts:
        pytest.skip(f"{page.name} has no python block to run")
    from tests.helpers import clean_environment

    env = {
        **clean_environment(),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
    }
    result = subprocess.run(
        [sys.executable, __file__, str(page)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=PAGE_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports = json.loads(result.stdout.rsplit("\n@@reports@@\n", 1)[1])
    failures = [f"{r['page']}:{r['line']}\n{r['error']}" for r in reports if r["error"] is not None]
    failures += [error for error in (run_script(block, env) for block in scripts) if error is not None]
    assert not failures, "\n".join(failures)
    assert len(reports) == len(setup) + len(todo)


def test_markers_are_understood() -> None:
    """The runner's own parsing: fragments skipped, setup found, ``setup from`` resolved (on a synthetic page)."""
    with tempfile.TemporaryDirectory() as folder:
        base, page = Path(folder) / "base.md", Path(folder) / "page.md"
        base.write_text(f"{SETUP}\n```python\nx = 1\n```\n")
        page.write_text(
            "<!-- docs-test: setup from base.md -->\n```python\nassert x == 1\n```\n"
            "```python\n# fragment: not run\nundefined_name\n```\n"
        )
        setup, todo = plan(page)
        assert [b.code for b in setup] == ["x = 1\n"]
        assert [b.code for b in todo] == ["assert x == 1\n"]
        assert [r["error"] for r in run_page(page)] == [None, None]
        page.write_text("```python\nundefined_name\n```\n")  # a NameError is reported, with its page and line
        (report,) = run_page(page)
        assert report["line"] == 1 and "NameError" in str(report["error"])
        page.write_text("```python\n# python job.py\nimport sys\nsys.exit(3)\n```\n")  # a script, run alone
        (block,) = blocks(page)
        assert plan(page)[1] == [] and block.script is not None
        assert "job.py exited 3" in str(run_script(block, dict(os.environ)))


def table_rows(page: Path, header: str) -> list[list[str]]:
    """The rows (cells without backticks) of the markdown table under the line ``header`` in ``page``."""
    lines = page.read_text().splitlines()
    start = lines.index(header) + 2  # the header and its |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def generator() -> types.ModuleType:
    """docs/generate.py, imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_knob_tables_are_generated_from_the_declarations() -> None:
    """Every docs table between knob markers is what ``python docs/generate.py`` writes from the settings
    dataclasses: a setting added in one place reaches the docs (or this test names the stale table)."""
    module = generator()
    pages = sorted((ROOT / "docs").glob("*.md"))
    stale = [name for page in pages for name in module.regenerate(page)[1]]
    assert not stale, f"run python docs/generate.py: {stale}"
    used = sorted(name for page in pages for name in re.findall(r"<!-- knobs: ([\w-]+) -->", page.read_text()))
    assert used == sorted([*module.tables(), "recipes"])  # each table once, LCSC's recipe registry included


def test_the_ema_tables_list_every_config_field() -> None:
    """docs/ema.md's generated tables cover every field of ``averaging=ema`` (the config is generated from the
    callback's signature), with the config's defaults; the page names every option of the ``averaging`` group."""
    from dataclasses import fields

    from weightavg.config import CONFIGS, EMAConfig

    page = ROOT / "docs" / "ema.md"
    rows = [
        row
        for start in ("<!-- knobs: ema -->", "<!-- knobs: callback-options -->", "<!-- knobs: engine-options -->")
        for row in table_rows(page, start)[1:]
    ]
    documented = {row[0]: eval(row[1]) for row in rows}  # the defaults as written (Python literals)
    expected = {f.name: f.default for f in fields(EMAConfig) if f.name != "_target_"}
    assert documented == pytest.approx(expected, rel=1e-3)  # 2/3 is written 0.6667
    assert all(row[2] for row in rows), "every field needs a meaning"
    options = re.search(r"registers the\s+group `averaging` with the options (.*?) \(no", page.read_text(), re.S)
    assert options is not None
    assert set(re.findall(r"`(\w+)`", options.group(1))) == {*CONFIGS, "none"}


@pytest.mark.parametrize("name", ["EMA", "SWA", "ZSCL"])
def test_a_top_level_rule_in_a_trainer_names_the_callback(name: str) -> None:
    """``weightavg.EMA`` is the rule: passed to a real ``Trainer`` by mistake, the error names the callback."""
    import weightavg
    from tests.helpers import DigitsModule, digits_loaders, trainer

    rule = getattr(weightavg, name)(**({"start": 1, "start_unit": "step"} if name == "SWA" else {}))
    train, val = digits_loaders(train_size=64, val_size=64)
    with pytest.raises(AttributeError, match=rf"pass weightavg\.callbacks\.{name}\(\.\.\.\) to Trainer"):
        trainer(callbacks=[rule], max_steps=1).fit(DigitsModule(), train, val)
    assert not hasattr(rule, "no_such_attribute")  # other lookups still fail the ordinary way


if __name__ == "__main__":
    outcome = run_page(Path(sys.argv[1]))
    print("\n@@reports@@\n" + json.dumps(outcome))
