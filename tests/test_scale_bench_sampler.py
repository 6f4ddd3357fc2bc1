"""bench/scale_bench.py without a stack: the passage sampler reproduces the real passages'
token shares and sizes, documents keep the dataset's own title and body, and ``--compare``
refuses a run that drew other documents.

The bench is a script, not a package: it is loaded from its file."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from encoder.passages import Passage

# the sampler's fit must not lean on an overflow or a NaN
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale_bench.py"


def load_bench() -> ModuleType:
    name = "scale_bench_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sb = load_bench()

VOCAB = 5_000
DRAWN = 3_000


def zipf_documents(seed: int = 1) -> list[list[Passage]]:
    """About 2,000 "real" passages over 5,000 tokens, about 100 distinct tokens each, tokens
    drawn with Zipf-like weights (the most frequent is in nearly every passage), 1 to 3
    passages a document. Token names do not sort by frequency."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, VOCAB + 1)
    zipf /= zipf.sum()
    names = [f"w{t * 7919 % VOCAB:04d}" for t in range(VOCAB)]
    docs: list[list[Passage]] = []
    passages = 0
    while passages < 2_000:
        doc = []
        for _ in range(int(rng.integers(1, 4))):
            size = int(np.clip(rng.normal(100, 25), 10, 250))
            picked = rng.choice(VOCAB, size, replace=False, p=zipf)
            weights = rng.gamma(2.0, 0.5, size)
            doc.append(
                Passage(0, 1, {names[t]: float(w) for t, w in zip(picked, weights, strict=True)})
            )
        docs.append(doc)
        passages += len(doc)
    return docs


@pytest.fixture(scope="module")
def real() -> list[list[Passage]]:
    return zipf_documents()


@pytest.fixture(scope="module")
def model(real: list[list[Passage]]) -> Any:  # scale_bench.PassageModel
    return sb.PassageModel.measure(real)


@pytest.fixture(scope="module")
def drawn(model: Any) -> list[Passage]:
    rng = np.random.default_rng(11)
    out: list[Passage] = []
    while len(out) < DRAWN:
        out.extend(model.draw(rng, 1_000))
    return out


def shares(passages: list[Passage]) -> Counter[str]:
    seen: Counter[str] = Counter()
    for p in passages:
        seen.update(p.vector.keys())  # (a mapping would add its values)
    return Counter({t: n / len(passages) for t, n in seen.items()})


def test_drawn_passages_hold_each_token_in_its_real_share(
    real: list[list[Passage]], drawn: list[Passage]
) -> None:
    real_passages = [p for doc in real for p in doc]
    want, got = shares(real_passages), shares(drawn)
    top = [t for t, _ in want.most_common(20)]
    for t in top:
        assert got[t] == pytest.approx(want[t], rel=0.15), (t, want[t], got[t])
    print("top 5 tokens, real share -> drawn share:")
    for t in top[:5]:
        print(f"  {t}: {want[t]:.3f} -> {got[t]:.3f}")
    # the rare tokens (the less frequent half, and those under the head's threshold): not
    # inflated to make up for frequent tokens left out
    by_freq = [t for t, _ in want.most_common()]
    for rare in (by_freq[len(by_freq) // 2 :], [t for t in want if want[t] < sb.HEAD_SHARE]):
        real_sum = sum(want[t] for t in rare)
        drawn_sum = sum(got[t] for t in rare)
        assert 0.8 <= drawn_sum / real_sum <= 1.2, (len(rare), real_sum, drawn_sum)
    print(f"  less frequent half: {real_sum:.2f} -> {drawn_sum:.2f} tokens a passage")


def test_drawn_passages_have_real_sizes_and_real_weights(
    real: list[list[Passage]], model: Any, drawn: list[Passage]
) -> None:
    real_sizes = [len(p.vector) for doc in real for p in doc]
    sizes = [len(p.vector) for p in drawn]
    assert np.mean(sizes) == pytest.approx(np.mean(real_sizes), rel=0.05)
    assert set(sizes) <= set(real_sizes)  # each drawn size is a measured one
    assert np.std(sizes) == pytest.approx(np.std(real_sizes), rel=0.15)
    measured: dict[str, set[float]] = {}
    for doc in real:
        for p in doc:
            for t, w in p.vector.items():
                measured.setdefault(t, set()).add(float(np.float32(w)))
    for p in drawn[:200]:
        for t, w in p.vector.items():
            assert w in measured[t]  # one of that token's own measured weights


def test_passage_offsets_split_the_text_and_draws_repeat_with_the_seed(
    model: Any,
) -> None:
    for text_len in (0, 1, 999):
        for passages in (model.draw(np.random.default_rng(s), text_len) for s in range(20)):
            assert 1 <= len(passages) <= 3
            assert passages[0].start == 0 and passages[-1].end == text_len
            for a, b in itertools.pairwise(passages):
                assert a.end == b.start and a.start <= a.end
    first = model.draw(np.random.default_rng(5), 500)
    again = model.draw(np.random.default_rng(5), 500)
    assert [p.vector for p in first] == [p.vector for p in again]


def test_digest_names_the_measured_model() -> None:
    def docs(last: float = 0.4) -> list[list[Passage]]:
        return [
            [Passage(0, 5, {"a": 1.0, "b": 0.5}), Passage(5, 9, {"a": 0.25})],
            [Passage(0, 7, {"c": 2.0, "b": last})],
        ]

    digest = sb.PassageModel.measure(docs()).digest()
    assert digest == sb.PassageModel.measure(docs()).digest()
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert sb.PassageModel.measure(docs(0.5)).digest() != digest  # one weight
    assert sb.PassageModel.measure(docs()[:1]).digest() != digest  # one document fewer
    # a vocabulary this small still draws (every size a measured one)
    rng = np.random.default_rng(3)
    tiny = sb.PassageModel.measure(docs())
    for _ in range(50):
        assert all(len(p.vector) in (1, 2) for p in tiny.draw(rng, 10))


def test_documents_keep_the_datasets_title_and_body() -> None:
    text, fields = sb.written_fields(("Vitamin D and bones", "A trial of 400 adults. It ended."))
    assert (
        text == "Vitamin D and bones A trial of 400 adults. It ended."
    )  # what the service encodes
    assert fields == {"title": "Vitamin D and bones", "body": "A trial of 400 adults. It ended."}
    text, fields = sb.written_fields(("", "No title here."))
    assert text == "No title here."
    assert fields == {"title": "", "body": "No title here."}


def bench_args(out: Path, compare: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(
        dataset="scifact", sizes=[10_000], prune_below=0.0, compare=compare,
        es_url="http://127.0.0.1:9200", es_heap="4g", out=out, real_docs=0, queries=300,
        warmup=20, side_up_to=0, side_prune_below=0.3, serial=False,
    )  # fmt: skip


def run_args(seed: int, batch: int) -> argparse.Namespace:
    return argparse.Namespace(
        seed=seed, real_docs=0, batch=batch, queries=300, warmup=20, side_up_to=0,
        side_prune_below=0.3, serial=False,
    )  # fmt: skip


def test_compare_refuses_a_run_that_drew_other_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = {
        "seed": 7, "real_docs": 0, "batch": 256, "sampler": sb.SAMPLER,
        "model_digest": "0123456789abcdef", "elasticsearch": "9.5.3",
    }  # fmt: skip
    sb.report(bench_args(tmp_path), [], "1 s in all", params)
    written = json.loads((tmp_path / "scale.json").read_text())
    assert written["params"] == params and written["setup"].startswith(sb.cpu_name())
    path = tmp_path / "scale.json"
    top10, previous = sb.compared_run(path)
    assert top10 == {} and previous == params

    # the same draws (another batch size or Elasticsearch is no reason to refuse)
    sb.check_comparable(path, previous, {**params, "batch": 64, "elasticsearch": "8.19.21"})
    for key, other in (("seed", 8), ("real_docs", 500), ("model_digest", "fedcba9876543210")):
        with pytest.raises(SystemExit, match=f"--compare .*{key} "):
            sb.check_comparable(path, previous, {**params, key: other})
    # before any Elasticsearch starts (main): only what is known yet
    sb.check_comparable(path, previous, sb.run_params(run_args(seed=7, batch=1)))
    with pytest.raises(SystemExit, match="seed 7 there, 8 here"):
        sb.check_comparable(path, previous, sb.run_params(run_args(seed=8, batch=256)))
    capsys.readouterr()

    # an older run without parameters: accepted, with a warning
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"setup": "x", "steps": [{"docs": 10_000, "exact_top10": [["d1"]]}]}))
    top10, previous = sb.compared_run(old)
    assert top10 == {10_000: [["d1"]]} and previous is None
    sb.check_comparable(old, previous, params)
    assert "warning" in capsys.readouterr().err


def test_expected_postings_count_each_query_tokens_passages() -> None:
    """Three documents, four passages: "a" in all four, "b" in one, "z" in none. A query of a
    and b walks 4 + 1 postings at this size, and ten times as many at ten times the size."""
    docs = [
        [Passage(0, 1, {"a": 1.0, "b": 0.5}), Passage(1, 2, {"a": 0.2})],
        [Passage(0, 1, {"a": 0.7})],
        [Passage(0, 1, {"a": 0.1, "c": 0.3})],
    ]
    m = sb.PassageModel.measure(docs)
    assert sb.expected_postings(m, [{"a": 1.0, "b": 1.0}], 3) == pytest.approx(5.0)
    assert sb.expected_postings(m, [{"a": 1.0, "b": 1.0}], 30) == pytest.approx(50.0)
    # the mean over queries; a token no passage holds walks nothing
    assert sb.expected_postings(m, [{"a": 1.0}, {"z": 2.0}], 3) == pytest.approx(2.0)
