"""The pure parts of pooling, on hand-made arrays (no model): a long text's windows max-merged
as batches arrive (``encoder.pooling.WindowMerger``), and model rows made ``{token: weight}``
dicts (``encoder.features.FeatureTable.to_dicts``). The same code on the real model is checked by
tests/test_encoder.py (golden vectors, ``test_long_text_windows_are_max_merged``)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoder.features import FeatureTable
from encoder.pooling import WindowMerger

F32 = np.float32


def table(tokens: list[str], keep: list[bool], names: list[str] | None = None) -> FeatureTable:
    names = tokens if names is None else names
    return FeatureTable(
        tokens=np.array(tokens, dtype=object),
        names=np.array(names, dtype=object),
        keep=np.array(keep, dtype=bool),
        injective=len(set(n for n, k in zip(names, keep, strict=True) if k)) == sum(keep),
    )


def merge_all(
    counts: list[int], batches: list[list[tuple[int, np.ndarray]]], vocab: int
) -> dict[int, np.ndarray]:
    """Feed the batches of (text, row) to a merger; each text's merged row."""
    merger = WindowMerger(counts)
    out: dict[int, np.ndarray] = {}
    for batch in batches:
        texts = [t for t, _ in batch]
        rows = np.stack([r for _, r in batch]) if batch else np.empty((0, vocab), F32)
        done, merged = merger.add(texts, rows)
        assert merged.shape == (len(done), vocab)
        for text, row in zip(done, merged, strict=True):
            assert text not in out  # handed back once
            out[text] = row
    assert merger.done and merger.pending == 0
    return out


# --------------------------------------------------------------------------- WindowMerger


def test_hand_made_windows_merged_by_element_wise_max() -> None:
    a1 = np.array([0.5, 0.0, 2.0, -1.0], F32)
    a2 = np.array([1.5, 0.0, 1.0, -3.0], F32)
    b = np.array([0.0, 0.25, 0.0, 0.0], F32)
    c1 = np.array([-2.0, -2.0, 0.0, 4.0], F32)
    c2 = np.array([-1.0, -5.0, 0.0, 3.0], F32)
    c3 = np.array([0.0, -1.0, 7.0, 0.0], F32)
    merger = WindowMerger([2, 1, 3])
    done, rows = merger.add([0, 1, 2], np.stack([a1, b, c1]))
    assert done == [1] and rows.dtype == F32
    np.testing.assert_array_equal(rows, [b])
    assert merger.pending == 2 and not merger.done
    done, rows = merger.add([2, 0, 2], np.stack([c2, a2, c3]))
    assert done == [0, 2]  # in the order of their last windows
    np.testing.assert_array_equal(rows[0], [1.5, 0.0, 2.0, -1.0])
    np.testing.assert_array_equal(rows[1], [0.0, -1.0, 7.0, 4.0])
    assert merger.pending == 0 and merger.done


def test_merge_order_does_not_matter() -> None:
    rng = np.random.default_rng(7)
    windows = [rng.normal(size=6).astype(F32) for _ in range(4)]
    expected = np.max(np.stack(windows), axis=0)
    for order in itertools.permutations(range(4)):
        merger = WindowMerger([4])
        for i in order[:-1]:
            assert merger.add([0], windows[i][None, :])[0] == []
        done, rows = merger.add([0], windows[order[-1]][None, :])
        assert done == [0]
        np.testing.assert_array_equal(rows[0], expected)


def test_window_split_across_batches_is_buffered_until_its_last() -> None:
    first = np.array([[1.0, 0.0, 3.0], [9.0, 9.0, 9.0]], F32)  # text 0, then text 1 (alone)
    merger = WindowMerger([3, 1])
    done, rows = merger.add([0, 1], first)
    assert done == [1] and merger.pending == 1
    first[:] = -100.0  # the caller's array (ONNX Runtime's output) may be reused
    np.testing.assert_array_equal(rows, [[9.0, 9.0, 9.0]])  # handed back as a copy
    done, rows = merger.add([0], np.array([[0.0, 5.0, 2.0]], F32))
    assert done == [] and rows.shape == (0, 3) and merger.pending == 1
    done, rows = merger.add([], np.empty((0, 3), F32))  # a batch of other texts' windows
    assert done == [] and merger.pending == 1
    done, rows = merger.add([0], np.array([[2.0, 1.0, -1.0]], F32))
    assert done == [0] and merger.pending == 0 and merger.done
    np.testing.assert_array_equal(rows, [[2.0, 5.0, 3.0]])


def test_merger_refuses_what_was_not_announced() -> None:
    with pytest.raises(ValueError, match="at least one window"):
        WindowMerger([1, 0])
    merger = WindowMerger([1])
    with pytest.raises(ValueError, match="shape"):
        merger.add([0, 0], np.zeros((1, 3), F32))
    merger.add([0], np.zeros((1, 3), F32))
    with pytest.raises(ValueError, match="more windows than announced"):
        merger.add([0], np.zeros((1, 3), F32))
    assert WindowMerger(np.array([], dtype=np.int64)).done  # no texts at all


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_batch_split_equals_the_max_of_all_windows(data: st.DataObject) -> None:
    counts = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=6), label="counts")
    vocab = data.draw(st.integers(1, 5), label="vocab")
    value = st.sampled_from([0.0, -0.0, -1.5, 0.25, 3.0]) | st.floats(
        -1e6, 1e6, width=32, allow_nan=False
    )
    windows = [
        (text, np.array(data.draw(st.lists(value, min_size=vocab, max_size=vocab)), F32))
        for text, n in enumerate(counts)
        for _ in range(n)
    ]
    order = data.draw(st.permutations(windows), label="order")
    cuts = sorted(data.draw(st.sets(st.integers(0, len(order)), max_size=5), label="cuts"))
    bounds = [0, *cuts, len(order)]
    batches = [order[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    merged = merge_all(counts, batches, vocab)
    assert sorted(merged) == list(range(len(counts)))
    for text in range(len(counts)):
        expected = np.max(np.stack([r for t, r in windows if t == text]), axis=0)
        np.testing.assert_array_equal(merged[text], expected)  # exact (0.0 == -0.0)
    # and as dicts: the merged vector is the max-merge of the windows' own vectors
    features = table([f"t{i}" for i in range(vocab)], [True] * vocab)
    for text in range(len(counts)):
        expected_dict: dict[str, float] = {}
        for t, row in windows:
            if t == text:
                for token, weight in features.to_dicts(row[None, :])[0].items():
                    expected_dict[token] = max(weight, expected_dict.get(token, 0.0))
        assert features.to_dicts(merged[text][None, :])[0] == expected_dict


# ------------------------------------------------------------------- rows to {token: weight}


def test_to_dicts_keeps_strictly_positive_weights_of_kept_tokens() -> None:
    features = table(["[CLS]", "fox", "dog", "##s", "[unused0]"], [False, True, True, True, False])
    rows = np.array(
        [
            [5.0, 0.5, 0.0, -0.25, 9.0],  # special and unused dropped, zero and negative dropped
            [0.0, 0.0, -0.0, 0.0, 0.0],  # nothing left: an empty vector
            [1.0, 1e-30, 2.0, 0.125, 1.0],  # tiny but positive is kept
        ],
        F32,
    )
    assert features.to_dicts(rows) == [
        {"fox": 0.5},
        {},
        {"fox": float(F32(1e-30)), "dog": 2.0, "##s": 0.125},
    ]
    assert features.to_dicts(np.empty((0, 5), F32)) == []
    [vec] = features.to_dicts(rows[:1])
    assert all(type(v) is float for v in vec.values())  # JSON-ready Python floats


def test_to_dicts_max_merges_tokens_sharing_a_feature_name() -> None:
    features = table(["a", "A", "b"], [True, True, True], names=["a", "a", "b"])
    assert not features.injective
    rows = np.array([[0.5, 2.0, 1.0], [3.0, 0.5, 0.0], [-1.0, 0.25, 0.0]], F32)
    assert features.to_dicts(rows) == [{"a": 2.0, "b": 1.0}, {"a": 3.0}, {"a": 0.25}]
