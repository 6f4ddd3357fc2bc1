"""The architecture holds: the import contracts of pyproject.toml ([tool.importlinter]: the
product never imports the tooling, the encoder never imports the service, the Kafka side in
layers), no import cycles anywhere, and docs/architecture.md names every module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "encoder", "tooling", "deploy")


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import,
    those inside functions too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_the_architecture_page_names_every_module() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py")
        and str(path.relative_to(ROOT)) not in page
    ]
    assert missing == [], f"docs/architecture.md does not name {missing}"


def test_the_product_alone_offers_its_commands_and_not_the_tooling(tmp_path: Path) -> None:
    """As installed from the wheel (service and encoder only): every product command is there,
    and demo, eval and stack are not offered (no import error either)."""
    for package in ("service", "encoder"):
        (tmp_path / package).symlink_to(ROOT / package)
    script = (
        f'import sys; sys.path = [p for p in sys.path if p and p.rstrip("/") != {str(ROOT)!r}]; '
        f"sys.path.insert(0, {str(tmp_path)!r}); "
        "from service.cli import build_parser; "
        "print(sorted(build_parser()._subparsers._group_actions[0].choices))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    commands = set(eval(done.stdout))
    assert {"run", "faust", "search", "encode", "model", "reindex", "index"} <= commands
    assert not commands & {"demo", "eval", "stack"}
