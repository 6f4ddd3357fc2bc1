"""BEIR datasets: load a folder in BEIR's layout, take a subset, fetch a dataset by name.

A BEIR folder holds ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.
:func:`fetch_beir` downloads a dataset's zip from BEIR's public site once, checks it against the
md5 BEIR publishes, and unpacks it into the cache (``$SPARSE_INGEST_CACHE`` or
``~/.cache/sparse-ingest``, under ``eval/<name>``); later calls use that folder.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import orjson

from encoder import cache_root

log = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
URL_ENV = "SPARSE_INGEST_BEIR_URL"  # a mirror of BEIR_URL (same <name>.zip files)
# The md5 of each dataset's zip as BEIR publishes it: the "Available Datasets" table of the
# BEIR README, https://github.com/beir-cellar/beir/blob/main/README.md (commit ef83d29,
# 2025-10-16). Every public dataset of that table.
BEIR_MD5: dict[str, str] = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}
ALIASES = {"touche2020": "webis-touche2020", "touche-2020": "webis-touche2020"}
SOURCE_FILE = ".beir-source.json"  # written into a fetched folder: where it came from
_CHUNK = 1 << 20


class DatasetError(Exception):
    """A BEIR dataset that cannot be had: unknown name, failed download, wrong checksum."""


# ------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class BeirData:
    name: str
    corpus: dict[str, tuple[str, str]]  # doc id -> (title, text), in file order
    queries: dict[str, str]  # judged queries only
    qrels: dict[str, dict[str, int]]


def load_beir(path: str | Path, split: str = "test") -> BeirData:
    """A BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``."""
    root = Path(path)
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (root / need).is_file():
            raise FileNotFoundError(f"{root / need}: missing (BEIR layout expected)")
    qrels: dict[str, dict[str, int]] = {}
    with (root / "qrels" / f"{split}.tsv").open() as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or (n == 0 and not parts[2].lstrip("-").isdigit()):
                continue  # header
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries: dict[str, str] = {}
    with (root / "queries.jsonl").open() as f:
        for line in f:
            q = orjson.loads(line)
            if str(q["_id"]) in qrels:
                queries[str(q["_id"])] = str(q["text"])
    corpus: dict[str, tuple[str, str]] = {}
    with (root / "corpus.jsonl").open() as f:
        for line in f:
            d = orjson.loads(line)
            corpus[str(d["_id"])] = (str(d.get("title") or ""), str(d.get("text") or ""))
    qrels = {q: rel for q, rel in qrels.items() if q in queries}
    return BeirData(root.name, corpus, queries, qrels)


def subset(
    data: BeirData,
    *,
    limit_docs: int | None = None,
    max_queries: int | None = None,
    seed: int = 0,
) -> BeirData:
    """Queries (in file order, at most ``max_queries``) whose relevant documents all fit in
    ``limit_docs``, those documents, and other documents (a seeded sample) up to ``limit_docs``.

    Scores on a subset are higher than on the full corpus (fewer distractors).
    """
    if limit_docs is None and max_queries is None:
        return data
    budget = limit_docs if limit_docs is not None else len(data.corpus)
    keep_docs: dict[str, None] = {}
    keep_queries: list[str] = []
    for q, rel in data.qrels.items():
        if max_queries is not None and len(keep_queries) >= max_queries:
            break
        needed = [d for d, r in rel.items() if r > 0 and d in data.corpus and d not in keep_docs]
        if len(keep_docs) + len(needed) > budget:
            continue
        keep_queries.append(q)
        keep_docs.update(dict.fromkeys(needed))
    others = [d for d in data.corpus if d not in keep_docs]
    random.Random(seed).shuffle(others)
    keep_docs.update(dict.fromkeys(others[: max(0, budget - len(keep_docs))]))
    corpus = {d: t for d, t in data.corpus.items() if d in keep_docs}  # file order
    return BeirData(
        data.name,
        corpus,
        {q: data.queries[q] for q in keep_queries},
        {q: {d: r for d, r in data.qrels[q].items() if d in corpus} for q in keep_queries},
    )


# ------------------------------------------------------------------------------ fetching


def dataset_name(name: str, checksums: Mapping[str, str] | None = None) -> str | None:
    """BEIR's name of the dataset ``name`` (case and aliases aside), or None if unknown."""
    table = BEIR_MD5 if checksums is None else checksums
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in table else None


def resolve_beir_dir(
    arg: str,
    *,
    cache: Path | None = None,
    base_url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    say: Callable[[str], None] | None = None,
) -> Path:
    """``arg`` if it is a folder, else the folder of the BEIR dataset it names, fetched into the
    cache if need be. ``<name>/<sub folder>`` names a folder inside a dataset (cqadupstack holds
    one BEIR folder per forum: ``cqadupstack/android``)."""
    path = Path(arg).expanduser()
    if path.is_dir():
        return path
    head, _, rest = arg.strip().partition("/")
    if dataset_name(head, checksums) is None:
        known = ", ".join(sorted(BEIR_MD5 if checksums is None else checksums))
        raise DatasetError(
            f"{arg}: neither a folder nor a BEIR dataset name (known names: {known})"
        )
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts) or rest.startswith("/"):
        raise DatasetError(
            f"{arg}: a folder inside a dataset is named by plain folder names "
            f"(e.g. cqadupstack/android), without '..' or a leading '/'"
        )
    root = fetch_beir(head, cache=cache, base_url=base_url, checksums=checksums, say=say)
    folder = root.joinpath(*parts)
    if not folder.is_dir():
        inside = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetError(
            f"{arg}: {head} has no folder {'/'.join(parts)!r} (it holds: {', '.join(inside)})"
        )
    return folder


def fetch_beir(
    name: str,
    *,
    cache: Path | None = None,
    base_url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    say: Callable[[str], None] | None = None,
) -> Path:
    """The folder of BEIR dataset ``name`` in the cache: ``<cache>/eval/<name>``; the first
    time, its zip is downloaded from ``base_url`` (``$SPARSE_INGEST_BEIR_URL``, else
    :data:`BEIR_URL`), checked against ``checksums`` (:data:`BEIR_MD5`) and unpacked. A zip
    whose md5 differs is refused and nothing is left in the cache."""
    table = BEIR_MD5 if checksums is None else checksums
    canonical = dataset_name(name, table)
    if canonical is None:
        raise DatasetError(
            f"{name}: not a BEIR dataset name; known names: {', '.join(sorted(table))}"
        )
    tell = say or log.info
    dest = (cache if cache is not None else cache_root()) / "eval" / canonical
    if (dest / SOURCE_FILE).is_file():
        return dest
    if dest.exists():
        raise DatasetError(
            f"{dest} exists but was not unpacked by sparse-ingest (no {SOURCE_FILE}): pass it "
            f"as the BEIR folder, or remove it to fetch {canonical} again"
        )
    base = base_url or os.environ.get(URL_ENV) or BEIR_URL
    url = f"{base.rstrip('/')}/{canonical}.zip"
    expected = table[canonical].lower()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{canonical}-") as tmp:
        archive = Path(tmp) / f"{canonical}.zip"
        tell(f"fetching BEIR dataset {canonical}: {url}")
        actual = _download(url, archive, canonical, timeout_s, tell)
        if actual != expected:
            raise DatasetError(
                f"{canonical}: the zip downloaded from {url} has md5 {actual}, but BEIR publishes "
                f"{expected} for it: a damaged or changed download, refused (nothing kept in "
                f"{dest.parent}). Try again; if it persists, download the zip yourself, compare "
                "its md5, unzip it and pass the folder instead of the name"
            )
        folder = _unpack(archive, Path(tmp) / "unpacked", canonical)
        (folder / SOURCE_FILE).write_text(json.dumps({"url": url, "md5": actual}) + "\n")
        try:
            folder.rename(dest)
        except OSError:
            if not (dest / SOURCE_FILE).is_file():
                raise
            # another process unpacked it meanwhile: theirs is as good
    tell(f"BEIR dataset {canonical} (md5 {actual} as published) in {dest}")
    return dest


def _download(url: str, path: Path, name: str, timeout_s: float, say: Callable[[str], None]) -> str:
    """``url`` into ``path``; its md5 (hex)."""
    digest = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": "sparse-ingest-eval"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp, path.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done, shown = 0, time.monotonic()
            while chunk := resp.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if time.monotonic() - shown >= 10:
                    shown = time.monotonic()
                    of = f" of {total / 1e6:,.0f}" if total else ""
                    say(f"   {name}: {done / 1e6:,.0f}{of} MB")
    except urllib.error.HTTPError as exc:
        raise DatasetError(f"{name}: {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatasetError(
            f"{name}: cannot download {url}: {reason} (a mirror: set {URL_ENV}; or download "
            "and unzip it yourself and pass the folder instead of the name)"
        ) from exc
    return digest.hexdigest()


def _unpack(archive: Path, out: Path, name: str) -> Path:
    """Unzip into ``out``; the dataset's folder (BEIR's zips hold one top folder, ``<name>/``)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                parts = PurePosixPath(member.replace("\\", "/")).parts
                if member.startswith(("/", "\\")) or ".." in parts or ":" in member:
                    raise DatasetError(f"{name}: the zip holds an unsafe path {member!r}")
            zf.extractall(out)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{name}: the download is not a zip file: {exc}") from exc
    entries = [p for p in out.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return out
