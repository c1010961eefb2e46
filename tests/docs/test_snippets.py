"""Every ```python block of the user guide (``docs/``, built by ``make docs``) runs.

The blocks of a page run in order, as one script, in one fresh subprocess (``sys.executable``, cwd a temporary
directory, the environment as it is), so that a page reads like a script a user can paste. A failure names the
page, the block (its line in the page) and shows the block and the stderr.

A block's backend is that of its tab (titled "PyTorch", "TensorFlow" or "JAX"), else the backend it imports, else the
one it names (``torch.``, ``tf.``, ``jnp.`` / ``nnx.``; comments aside), else that of the previous block outside tabs
(a page continues its script); a page's first blocks without any are neutral. A page runs once per backend it has:
the blocks of that backend and the neutral ones, in order. A backend that is not installed skips its runs (as
``pytest.importorskip``). ``--8<--`` lines (pymdownx.snippets) are replaced by the file they include, as the site
shows it.

Markers, an HTML comment on the line(s) right above a fence (invisible on the site):

* ``<!-- docs-test: skip: REASON -->``: the block is not run; a skipped test item names the block and REASON
  (an included file is still compiled).
* ``<!-- docs-test: needs-cuda -->``: the block runs only where ``torch.cuda.is_available()``; elsewhere it is
  reported as skipped.

Page runs go two at a time (the machine has two cores; each run is mostly one busy thread).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
TIMEOUT_S = 240  # one page run; they take seconds
PARALLEL_RUNS = max(1, min(2, os.cpu_count() or 1))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*\{?[ \t]*\.?(?P<lang>[\w+-]*)")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<kind>skip|needs-cuda)\s*(?::\s*(?P<reason>.*?))?\s*-->$")
_TAB = re.compile(r'^(?P<indent>[ \t]*)===\+?\s+"(?P<title>[^"]*)"')
_SNIPPET = re.compile(r'^(?P<indent>[ \t]*)-{1,}8<-{1,}[ \t]+"(?P<path>[^"]+)"[ \t]*$')
_IMPORTS = {
    "pytorch": re.compile(r"^\s*(import|from)\s+(mlpug\.pytorch|torch)\b", re.M),
    "tensorflow": re.compile(r"^\s*(import|from)\s+(mlpug\.tensorflow|tensorflow|keras)\b", re.M),
    "jax": re.compile(r"^\s*(import|from)\s+(mlpug\.jax|jax|flax|optax)\b", re.M),
}
_NAMES = {"pytorch": re.compile(r"\btorch\."), "tensorflow": re.compile(r"\btf\."), "jax": re.compile(r"\b(jnp|nnx)\.")}
_MODULES = {"pytorch": "torch", "tensorflow": "tensorflow", "jax": "jax"}


@dataclass
class Block:
    page: str  # relative to docs/
    line: int  # 1-based line of the opening fence
    code: str
    backend: Optional[str]  # "pytorch", "tensorflow", "jax" or None (runs with every backend of the page)
    skip: Optional[str] = None  # reason
    needs_cuda: bool = False
    included: list = field(default_factory=list)  # files included with --8<--

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def _resolve_snippets(code: str, where: str) -> tuple[str, list]:
    lines, included = [], []
    for line in code.splitlines():
        match = _SNIPPET.match(line)
        if match is None:
            lines.append(line)
            continue
        path = ROOT / match["path"]
        assert path.is_file(), f"{where}: --8<-- includes {match['path']}, which does not exist"
        included.append(match["path"])
        lines.extend(match["indent"] + text for text in path.read_text().splitlines())
    return "\n".join(lines) + "\n", included


def _backend(code: str, tab: Optional[str], previous: Optional[str], where: str) -> Optional[str]:
    """A tab's backend; else the backend the block imports or names (``torch.``, ``tf.``); else that of the
    previous block outside tabs (a page continues its script); else None."""
    if tab is not None:
        for backend in _MODULES:
            if backend in tab.lower():
                return backend
    without_comments = re.sub(r"#.*", "", code)
    for patterns in (_IMPORTS, _NAMES):
        found = [backend for backend, pattern in patterns.items() if pattern.search(without_comments)]
        assert len(found) <= 1, f"{where}: a block outside a backend tab uses several backends"
        if found:
            return found[0]
    return previous


def parse_page(page: str) -> list[Block]:
    """The python blocks of ``docs/<page>``, with their backend and markers."""
    lines = (DOCS / page).read_text().splitlines()
    blocks: list[Block] = []
    tabs: list[tuple[int, str]] = []  # (indent, title) of the tabs enclosing the current line
    previous: Optional[str] = None  # the backend of the last block outside tabs
    markers = {number for number, line in enumerate(lines) if "docs-test" in line}  # each must mark a python block
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.strip():
            indent = len(line) - len(line.lstrip())
            tabs = [(i, title) for i, title in tabs if i < indent]
        tab_match = _TAB.match(line)
        if tab_match:
            tabs.append((len(tab_match["indent"]), tab_match["title"]))
        match = _FENCE.match(line)
        if not match:
            index += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"].lower()
        end = index + 1
        while end < len(lines) and not re.match(rf"^{re.escape(indent)}{fence[0]}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        assert end < len(lines), f"docs/{page}:{index + 1}: unclosed code fence"
        if lang in ("python", "py"):
            where = f"docs/{page}:{index + 1}"
            body = "\n".join(
                text[len(indent) :] if text.startswith(indent) else text for text in lines[index + 1 : end]
            )
            code, included = _resolve_snippets(textwrap.dedent(body), where)
            tab = tabs[-1][1] if tabs else None
            block = Block(page, index + 1, code, _backend(code, tab, previous, where))
            if tab is None:
                previous = block.backend
            block.included = included
            above = index - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            while above >= 0 and (marker := _MARKER.match(lines[above].strip())):
                if marker["kind"] == "skip":
                    assert marker["reason"], f"{where}: a skip marker needs a reason (docs-test: skip: REASON)"
                    block.skip = marker["reason"]
                else:
                    block.needs_cuda = True
                markers.discard(above)
                above -= 1
            blocks.append(block)
        index = end + 1
    assert not markers, f"docs/{page}: lines {sorted(n + 1 for n in markers)} are no docs-test marker of a python block"
    return blocks


def _pages() -> list[str]:
    return sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md"))


ALL_BLOCKS = [block for page in _pages() for block in parse_page(page)]


@dataclass
class PageRun:
    page: str
    backend: Optional[str]
    blocks: list  # of Block, in page order (markers with conditions are decided when run)

    @property
    def id(self) -> str:
        return f"{self.page}[{self.backend or 'no backend'}]"


def _page_runs() -> list[PageRun]:
    runs = []
    for page in _pages():
        blocks = [block for block in ALL_BLOCKS if block.page == page and block.skip is None]
        backends = sorted({block.backend for block in blocks if block.backend is not None}) or [None]
        for backend in backends:
            runs.append(PageRun(page, backend, [b for b in blocks if b.backend in (None, backend)]))
    return [run for run in runs if run.blocks]


PAGE_RUNS = _page_runs()


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _script(run: PageRun, cuda: bool) -> tuple[str, list]:
    """The page's blocks as one script, and per block its first and last line in the script."""
    parts, spans, line = [], [], 1
    for number, block in enumerate(run.blocks, 1):
        if block.needs_cuda and not cuda:
            continue
        header = f"# ---- block {number}: {block.where} ----\n"
        code = header + block.code
        spans.append((line + 1, line + code.count("\n") - 1, block))
        parts.append(code)
        line += code.count("\n")
    return "".join(parts), spans


def _execute(run: PageRun, directory: Path, cuda: bool) -> tuple[subprocess.CompletedProcess, list, Path]:
    source, spans = _script(run, cuda)
    script = directory / f"{Path(run.page).stem}_{run.backend or 'neutral'}.py"
    script.write_text(source)
    result = subprocess.run(
        [sys.executable, script.name],
        cwd=directory,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return result, spans, script


def _failing_block(stderr: str, script: Path, spans: list) -> Optional[Block]:
    lines = [int(n) for n in re.findall(rf'File "[^"]*{re.escape(script.name)}", line (\d+)', stderr)]
    for number in reversed(lines):
        for first, last, block in spans:
            if first <= number <= last:
                return block
    return None


def _expected_cost(run: PageRun) -> int:
    """Rough order of a run's duration: several processes, then TensorFlow (slower to import and trace)."""
    processes = any("distributed.launch(" in block.code for block in run.blocks)
    return 2 * processes + (run.backend == "tensorflow")


@pytest.fixture(scope="module")
def runner(request, tmp_path_factory):
    """Starts the selected page runs at once, ``PARALLEL_RUNS`` at a time; each test waits for its own."""
    selected = [
        item.callspec.params["run"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "run" in item.callspec.params
    ]
    cuda = any(block.needs_cuda for run in selected for block in run.blocks) and _cuda_available()
    pool = concurrent.futures.ThreadPoolExecutor(PARALLEL_RUNS)
    futures = {}
    for run in sorted(selected, key=_expected_cost, reverse=True):  # the longest first: the pool ends together
        if run.backend is None or importlib.util.find_spec(_MODULES[run.backend]) is not None:
            directory = tmp_path_factory.mktemp(re.sub(r"\W+", "_", run.id))
            futures[run.id] = pool.submit(_execute, run, directory, cuda)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(TIMEOUT_S * (1 + len(PAGE_RUNS)))
@pytest.mark.parametrize("run", PAGE_RUNS, ids=[run.id for run in PAGE_RUNS])
def test_page_runs(run: PageRun, runner):
    if run.backend is not None and run.id not in runner:
        pytest.skip(f"{run.backend} is not installed ({_MODULES[run.backend]})")
    try:
        result, spans, script = runner[run.id].result()
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"docs/{run.page} ({run.backend}): the page's blocks ran longer than {error.timeout} s")
    if result.returncode == 0:
        return
    block = _failing_block(result.stderr, script, spans)
    shown = f"block at {block.where}:\n{block.code}" if block else "(no block found in the traceback)"
    pytest.fail(
        f"docs/{run.page} ({run.backend or 'no backend'}) failed with exit status {result.returncode} in {shown}\n"
        f"--- stdout (end) ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}",
        pytrace=False,
    )


MARKED = [block for block in ALL_BLOCKS if block.skip is not None or block.needs_cuda]


@pytest.mark.parametrize("block", MARKED, ids=[block.where.removeprefix("docs/") for block in MARKED])
def test_marked_block(block: Block):
    """A block marked skip is reported with its reason (an included file is compiled first); a block that needs
    CUDA ran in its page where CUDA is available and is reported as skipped elsewhere."""
    compile(block.code, block.where, "exec")
    if block.skip is not None:
        included = f" (includes {', '.join(block.included)}, which compiles)" if block.included else ""
        pytest.skip(f"{block.where}{included}: {block.skip}")
    if not _cuda_available():
        pytest.skip(f"{block.where}: needs a CUDA device (torch.cuda.is_available() is False)")


def test_the_guide_has_python_blocks():
    """The parser finds the blocks (a broken parser must not pass by finding none)."""
    assert len(ALL_BLOCKS) >= 20, [block.where for block in ALL_BLOCKS]
    assert {"pytorch", "tensorflow"} <= {run.backend for run in PAGE_RUNS}
