"""The product's packaging carries the service only: the wheel holds ``service/``, ``encoder/``
and its dist-info, the container build copies nothing of the developer tooling (``deploy/``,
``tooling/``) nor the tests and benches.

The wheel is built with hatchling's API (the build backend of pyproject.toml, in the dev extra;
offline, about a second).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("service", "encoder")
NOT_SHIPPED = ("deploy", "tooling", "tests", "bench", "scripts", "docs", "results")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hatchling.builders.wheel import WheelBuilder

    out = tmp_path_factory.mktemp("wheel")
    (built,) = WheelBuilder(str(ROOT)).build(directory=str(out), versions=["standard"])
    return Path(built)


def _top(name: str) -> str:
    return name.split("/", 1)[0]


def test_wheel_holds_the_service_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    print(f"{wheel.name}: {len(names)} files, {sum(i.file_size for i in infos)} bytes")
    for info in infos:
        print(f"  {info.file_size:>9}  {info.filename}")
    dist_info = {_top(n) for n in names if _top(n).endswith(".dist-info")}
    assert len(dist_info) == 1, dist_info
    tops = {_top(n) for n in names} - dist_info
    assert tops == set(PRODUCT), f"the wheel holds {sorted(tops)}, expected {list(PRODUCT)}"
    for package in PRODUCT:
        assert f"{package}/__init__.py" in names
    assert "service/cli.py" in names  # the console script's module
    leaked = [n for n in names if _top(n) in NOT_SHIPPED or "/tests/" in n]
    assert not leaked, leaked
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as zf:
        assert "sparse-ingest = service.cli:main" in zf.read(entry_points).decode()


def _dockerfile_copies() -> list[list[str]]:
    """The sources of each COPY from the build context (not ``--from=`` a stage)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    copies = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        if any(w.startswith("--from") for w in words[1:]):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        copies.append(args[:-1])
    return copies


def test_dockerfile_copies_no_tooling_tests_or_benches() -> None:
    copies = _dockerfile_copies()
    sources = [s.removeprefix("./").rstrip("/") or "." for sources in copies for s in sources]
    assert sources, "the Dockerfile copies the project from the build context"
    assert "." not in sources, "COPY . would send everything the .dockerignore lets through"
    assert set(PRODUCT) <= set(sources), sources
    leaked = [s for s in sources if _top(s) in NOT_SHIPPED]
    assert not leaked, f"the Dockerfile copies {leaked}"


def test_dockerignore_sends_no_tooling_tests_or_benches() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything is excluded unless named"
    allowed = [p[1:].strip("/") for p in patterns if p.startswith("!")]
    leaked = [a for a in allowed if _top(a) in NOT_SHIPPED]
    assert not leaked, f".dockerignore sends {leaked}"
