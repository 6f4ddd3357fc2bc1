"""A model folder that is missing, corrupt or of the wrong shape: the real ``sparse-ingest run``
exits non-zero at start, before touching Kafka or Elasticsearch, with one clear line that names
the folder or file (no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from reliability_harness import REPO, service_env

from encoder.graph import OUTPUT_NAME


def _run(model_dir: Path) -> tuple[int, str, float]:
    # Kafka and Elasticsearch point nowhere: the model must be the first thing checked.
    env = service_env("127.0.0.1:1", "http://127.0.0.1:1", "t", "i", "g", model_dir=model_dir)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "run"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.fp32.onnx"))
    return dst


def _missing(model: Path, tmp: Path) -> tuple[Path, str]:
    return tmp / "no-such-model", "model folder not found"


def _empty(model: Path, tmp: Path) -> tuple[Path, str]:
    (tmp / "empty").mkdir()
    return tmp / "empty", "sparse_model.json: missing"


def _not_a_folder(model: Path, tmp: Path) -> tuple[Path, str]:
    (tmp / "file").write_text("not a folder")
    return tmp / "file", "model folder not found"


def _corrupt_onnx(model: Path, tmp: Path) -> tuple[Path, str]:
    d = _copy(model, tmp / "corrupt")
    (d / "model.onnx").write_bytes(b"\x08\x07garbage, not protobuf" * 100)
    return d, "ONNX Runtime cannot load it"


def _truncated_onnx(model: Path, tmp: Path) -> tuple[Path, str]:
    d = _copy(model, tmp / "truncated")
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    return d, "ONNX Runtime cannot load it"


def _no_onnx(model: Path, tmp: Path) -> tuple[Path, str]:
    d = _copy(model, tmp / "no-onnx")
    (d / "model.onnx").unlink()
    return d, "model.onnx: missing from the model folder"


def _bad_metadata(model: Path, tmp: Path) -> tuple[Path, str]:
    d = _copy(model, tmp / "bad-meta")
    (d / "sparse_model.json").write_text('{"architecture": "BertForMaskedLM", ')
    return d, "unreadable metadata"


def _bad_tokenizer(model: Path, tmp: Path) -> tuple[Path, str]:
    d = _copy(model, tmp / "bad-tokenizer")
    (d / "tokenizer.json").write_text("{}")
    return d, "cannot load the tokenizer"


def _other_vocabulary(model: Path, tmp: Path) -> tuple[Path, str]:
    d = _copy(model, tmp / "other-vocab")
    meta = json.loads((d / "sparse_model.json").read_text())
    meta["vocab_size"] = 50265  # a RoBERTa-sized vocabulary: not this tokenizer's
    (d / "sparse_model.json").write_text(json.dumps(meta))
    return d, "the tokenizer does not belong to this model"


def _wrong_output_shape(model: Path, tmp: Path) -> tuple[Path, str]:
    """A valid ONNX file with the right input/output names whose output is (batch, seq_len),
    not (batch, vocabulary)."""
    d = _copy(model, tmp / "wrong-shape")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], [OUTPUT_NAME], to=TensorProto.FLOAT)],
        "wrong_shape",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", "seq"])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), d / "model.onnx"
    )
    return d, "output shape"


def _wrong_names(model: Path, tmp: Path) -> tuple[Path, str]:
    d = _copy(model, tmp / "wrong-names")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["logits"], to=TensorProto.FLOAT)],
        "wrong_names",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq"])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), d / "model.onnx"
    )
    return d, "expected inputs input_ids, attention_mask"


CASES: dict[str, Callable[[Path, Path], tuple[Path, str]]] = {
    "missing": _missing,
    "empty": _empty,
    "not-a-folder": _not_a_folder,
    "corrupt-onnx": _corrupt_onnx,
    "truncated-onnx": _truncated_onnx,
    "no-onnx": _no_onnx,
    "bad-metadata": _bad_metadata,
    "bad-tokenizer": _bad_tokenizer,
    "other-vocabulary": _other_vocabulary,
    "wrong-output-shape": _wrong_output_shape,
    "wrong-io-names": _wrong_names,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_folder_stops_the_service_at_start(
    case: str, default_model_dir: Path, tmp_path: Path
) -> None:
    model_dir, message = CASES[case](default_model_dir, tmp_path)
    code, output, seconds = _run(model_dir)
    assert code == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("sparse-ingest: ")]
    assert len(lines) == 1, output
    assert str(model_dir) in lines[0], lines[0]  # names the folder (or a file in it)
    assert message in lines[0], lines[0]
    assert seconds < 60
