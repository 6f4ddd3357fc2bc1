"""`sparse-ingest eval <name>`: a BEIR dataset fetched by name, from a local HTTP server standing
in for BEIR's site (base URL and checksum table injected): downloaded, checked against its md5,
unpacked into the cache and re-used; a wrong checksum, an unsafe zip and a failed download are
refused with nothing left in the cache; an unknown name lists the known ones. No Kafka."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tooling.cli import add_subcommands
from tooling.eval.beir import (
    BEIR_MD5,
    SOURCE_FILE,
    DatasetError,
    dataset_name,
    fetch_beir,
    load_beir,
    resolve_beir_dir,
)


def beir_zip(top: str | None = "minibeir", extra: dict[str, bytes] | None = None) -> bytes:
    """A small dataset in BEIR's layout, zipped as BEIR does (one top folder) or flat."""
    prefix = f"{top}/" if top else ""
    corpus = [{"_id": f"d{i}", "title": f"t{i}", "text": f"text {i}"} for i in range(5)]
    queries = [{"_id": "q0", "text": "query zero"}, {"_id": "q1", "text": "query one"}]
    files = {
        "corpus.jsonl": "\n".join(json.dumps(d) for d in corpus) + "\n",
        "queries.jsonl": "\n".join(json.dumps(q) for q in queries) + "\n",
        "qrels/test.tsv": "query-id\tcorpus-id\tscore\nq0\td1\t1\nq1\td3\t2\n",
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(prefix + name, text)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Site:
    """Files served over HTTP on loopback; counts the requests per path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.hits[self.path] = site.hits.get(self.path, 0) + 1
                body = site.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/datasets"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    for var in ("no_proxy", "NO_PROXY"):  # a proxy of the environment: not for loopback
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    s = Site()
    try:
        yield s
    finally:
        s.close()


def leftovers(cache: Path) -> list[str]:
    """Everything in the cache (temporary files included)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.name != "eval")


def test_fetch_checks_unpacks_and_reuses_the_cache(site: Site, tmp_path: Path) -> None:
    blob = beir_zip()
    site.files["/datasets/minibeir.zip"] = blob
    checksums = {"minibeir": md5(blob)}
    said: list[str] = []
    folder = fetch_beir(
        "minibeir", cache=tmp_path, base_url=site.url, checksums=checksums, say=said.append
    )
    assert folder == tmp_path / "eval" / "minibeir"
    data = load_beir(folder)
    assert data.name == "minibeir"
    assert set(data.queries) == {"q0", "q1"} and data.qrels["q1"] == {"d3": 2}
    assert len(data.corpus) == 5
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source == {"url": f"{site.url}/minibeir.zip", "md5": md5(blob)}
    assert any("minibeir" in line for line in said)
    # only the dataset's folder is left: the zip and the temporary folder are gone
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["minibeir"]

    # next time: the cache, no download (case of the name aside)
    again = fetch_beir("MiniBEIR", cache=tmp_path, base_url=site.url, checksums=checksums)
    assert again == folder
    assert site.hits == {"/datasets/minibeir.zip": 1}
    # as the eval's argument: a name is resolved the same way, a folder is taken as it is
    assert resolve_beir_dir("minibeir", cache=tmp_path, checksums=checksums) == folder
    assert resolve_beir_dir(str(folder), cache=tmp_path / "elsewhere") == folder
    assert site.hits == {"/datasets/minibeir.zip": 1}


def test_settings_from_the_environment_and_a_flat_zip(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base URL from $SPARSE_INGEST_BEIR_URL, the cache from $SPARSE_INGEST_CACHE; a zip
    without a top folder is unpacked as the dataset's folder itself."""
    blob = beir_zip(top=None)
    site.files["/datasets/flat.zip"] = blob
    monkeypatch.setenv("SPARSE_INGEST_BEIR_URL", site.url)
    monkeypatch.setenv("SPARSE_INGEST_CACHE", str(tmp_path / "cache"))
    folder = fetch_beir("flat", checksums={"flat": md5(blob)})
    assert folder == tmp_path / "cache" / "eval" / "flat"
    assert len(load_beir(folder).corpus) == 5


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(site: Site, tmp_path: Path) -> None:
    blob = beir_zip()
    site.files["/datasets/minibeir.zip"] = blob
    expected = "0" * 32
    with pytest.raises(DatasetError) as err:
        fetch_beir("minibeir", cache=tmp_path, base_url=site.url, checksums={"minibeir": expected})
    message = str(err.value)
    assert "minibeir" in message
    assert expected in message and md5(blob) in message  # expected and actual digests
    assert "refused" in message and "Try again" in message  # and what to do
    assert leftovers(tmp_path) == []
    # a later good download is not blocked by the failed one
    folder = fetch_beir(
        "minibeir", cache=tmp_path, base_url=site.url, checksums={"minibeir": md5(blob)}
    )
    assert (folder / "corpus.jsonl").is_file()


def test_an_unsafe_zip_and_a_failed_download_leave_nothing(site: Site, tmp_path: Path) -> None:
    evil = beir_zip(extra={"../escaped.txt": b"x"})
    site.files["/datasets/evil.zip"] = evil
    with pytest.raises(DatasetError, match="unsafe path"):
        fetch_beir("evil", cache=tmp_path, base_url=site.url, checksums={"evil": md5(evil)})
    assert not (tmp_path / "escaped.txt").exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(DatasetError, match=r"missing: .*HTTP 404"):
        fetch_beir("missing", cache=tmp_path, base_url=site.url, checksums={"missing": "0" * 32})
    assert leftovers(tmp_path) == []


def test_a_folder_not_made_by_the_fetch_is_not_overwritten(site: Site, tmp_path: Path) -> None:
    (tmp_path / "eval" / "minibeir").mkdir(parents=True)
    with pytest.raises(DatasetError, match="was not unpacked by sparse-ingest"):
        fetch_beir("minibeir", cache=tmp_path, base_url=site.url, checksums={"minibeir": "0" * 32})
    assert site.hits == {}


def test_an_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        fetch_beir("no-such-set", cache=tmp_path)
    assert "no-such-set" in str(err.value)
    for name in ("scifact", "nfcorpus", "fiqa", "msmarco", "webis-touche2020"):
        assert name in str(err.value)
    with pytest.raises(DatasetError, match="neither a folder nor a BEIR dataset name"):
        resolve_beir_dir(str(tmp_path / "no-such-folder"), cache=tmp_path)
    assert leftovers(tmp_path) == []


def test_the_published_checksums() -> None:
    wanted = {
        "scifact", "nfcorpus", "fiqa", "arguana", "scidocs", "trec-covid", "quora", "nq",
        "hotpotqa", "fever", "climate-fever", "dbpedia-entity", "webis-touche2020",
        "cqadupstack", "msmarco",
    }  # fmt: skip
    assert wanted <= set(BEIR_MD5)
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in BEIR_MD5.values())
    assert len(set(BEIR_MD5.values())) == len(BEIR_MD5)
    assert BEIR_MD5["scifact"] == "5f7d1de60b170fc8027bb7898e2efca1"
    assert dataset_name("touche2020") == "webis-touche2020"
    assert dataset_name("SciFact") == "scifact"
    assert dataset_name("nope") is None


def test_the_eval_command_refuses_an_unknown_name_before_anything_else(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="sparse-ingest")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "no-such-set", "--kafka", "x:1", "--es-url", "http://x"])
    assert args.handler(args) == 2
    err = capsys.readouterr().err
    assert "sparse-ingest eval: no-such-set" in err and "scifact" in err


def test_a_folder_inside_a_dataset_stays_inside_it(site: Site, tmp_path: Path) -> None:
    """``name/sub`` (cqadupstack/android) names a folder of the fetched dataset: no '..', no
    absolute path, and a missing one is an error naming what is there."""
    blob = beir_zip(extra={"minibeir/android/corpus.jsonl": b""})
    site.files["/datasets/minibeir.zip"] = blob
    sums = {"minibeir": md5(blob)}
    for bad in ("minibeir/../../etc", "minibeir//etc", "minibeir/./android"):
        with pytest.raises(DatasetError, match="plain folder names"):
            resolve_beir_dir(bad, cache=tmp_path, base_url=site.url, checksums=sums)
    assert site.hits == {}  # refused before any download
    folder = resolve_beir_dir("minibeir/android", cache=tmp_path, base_url=site.url, checksums=sums)
    assert folder == tmp_path / "eval" / "minibeir" / "android"
    with pytest.raises(DatasetError, match=r"has no folder 'gaming'.*android"):
        resolve_beir_dir("minibeir/gaming", cache=tmp_path, base_url=site.url, checksums=sums)
