"""The ONNX Runtime embedder gives the torch embedder's vectors and token counts, and keeps its exported
model in a cache that is rebuilt when it is missing, broken or stale."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from retrieval.embedding import MINILM_DIMENSION, SentenceTransformerEmbedder
from retrieval.onnx_embedding import OnnxEmbedder, _runs

TEXTS = [
    "When is support open on weekends?",
    "Opening hours: Monday to Friday, 9:00 to 17:00. Saturdays 10:00 to 14:00.",
    "",
    "Ünïcödé, emoji 🙂 and digits 12345 mixed in one line.",
    " ".join(f"word{i}" for i in range(600)),  # longer than the window: cut the same way
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedder")


@pytest.fixture(scope="module")
def onnx(cache_dir: Path) -> OnnxEmbedder:
    return OnnxEmbedder(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def torch_embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


def test_same_dimension_and_unit_norm(onnx: OnnxEmbedder) -> None:
    vectors = onnx.embed(TEXTS)
    assert onnx.dimension == MINILM_DIMENSION
    assert vectors.shape == (len(TEXTS), MINILM_DIMENSION)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert onnx.embed([]).shape == (0, MINILM_DIMENSION)


def test_agrees_with_the_torch_embedder(onnx: OnnxEmbedder, torch_embedder: SentenceTransformerEmbedder) -> None:
    ours, theirs = onnx.embed(TEXTS), torch_embedder.embed(TEXTS)
    assert (ours * theirs).sum(axis=1).min() >= 0.999
    # Batching pads to the longest text: a text alone gets the vector it gets in a batch.
    alone = onnx.embed([TEXTS[0]])[0]
    assert float(alone @ ours[0]) >= 0.99999
    # ... and different texts still get different vectors.
    assert float(ours[0] @ ours[1]) < 0.95


def test_token_counts_and_window_match(onnx: OnnxEmbedder, torch_embedder: SentenceTransformerEmbedder) -> None:
    assert onnx.max_tokens == torch_embedder.max_tokens
    assert onnx.count_tokens(TEXTS) == torch_embedder.count_tokens(TEXTS)
    full = " ".join(["river"] * (onnx.max_tokens - 2))
    vectors = onnx.embed([full, full + " stone"])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)  # the first token past the window is cut


def test_a_broken_cache_is_rebuilt(onnx: OnnxEmbedder, tmp_path: Path) -> None:
    expected = onnx.embed(TEXTS[:2])
    first = OnnxEmbedder(cache_dir=tmp_path)
    first.embed(["warm-up"])
    model = first.model_file
    assert model.is_file() and model.stat().st_size > 1_000_000

    model.write_bytes(b"not an onnx model")  # a truncated or corrupted file
    rebuilt = OnnxEmbedder(cache_dir=tmp_path)
    np.testing.assert_allclose(rebuilt.embed(TEXTS[:2]), expected, atol=1e-5)
    assert model.stat().st_size > 1_000_000


def test_a_stale_cache_is_rebuilt(onnx: OnnxEmbedder, tmp_path: Path) -> None:
    first = OnnxEmbedder(cache_dir=tmp_path)
    first.embed(["warm-up"])
    meta = first.model_file.parent / "meta.json"
    recorded = json.loads(meta.read_text())
    recorded["files"]["model.safetensors"][0] += 1  # made from another version of the weights
    meta.write_text(json.dumps(recorded))
    stamp = os.stat(first.model_file).st_mtime_ns

    again = OnnxEmbedder(cache_dir=tmp_path)
    again.embed(["warm-up"])
    assert os.stat(again.model_file).st_mtime_ns != stamp
    assert json.loads(meta.read_text())["files"] != recorded["files"]


def test_the_setting_chooses_the_embedder(tmp_path: Path) -> None:
    from gateway.app import build_embedder
    from gateway.settings import Settings

    default = build_embedder(Settings(mode="dev", data_dir=tmp_path))
    assert isinstance(default, OnnxEmbedder)
    assert default.model_file.is_relative_to(tmp_path / "embedder")
    elsewhere = build_embedder(Settings(mode="dev", data_dir=tmp_path, embedder_cache_dir=tmp_path / "cache"))
    assert isinstance(elsewhere, OnnxEmbedder) and elsewhere.model_file.is_relative_to(tmp_path / "cache")
    assert isinstance(build_embedder(Settings(mode="dev", embedder="torch")), SentenceTransformerEmbedder)
    default.embed(["warm-up"])
    assert default.precision == "bf16"  # this machine's CPU has native bf16 (AVX512_BF16)
    fp32 = build_embedder(Settings(mode="dev", data_dir=tmp_path, embedder_precision="fp32"))
    assert isinstance(fp32, OnnxEmbedder)
    fp32.embed(["warm-up"])
    assert fp32.precision == "fp32"


def test_runs_are_sorted_by_length_and_bounded_in_padded_tokens() -> None:
    lengths = [200, 3, 256, 10, 9, 256, 4]
    runs = _runs(lengths, 512)
    assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
    flat = [lengths[i] for run in runs for i in run]
    assert flat == sorted(lengths)
    assert all(len(run) * max(lengths[i] for i in run) <= 512 for run in runs)
    assert runs[0] == [1, 6, 4, 3]  # the short texts together, not padded to a long one
    assert _runs([600, 5], 512) == [[1], [0]]  # a text over the budget runs alone


def test_order_is_kept_across_runs(onnx: OnnxEmbedder) -> None:
    # Mixed lengths, more padded tokens than one run holds: sorted, split, and put back in the caller's order.
    texts = [" ".join(["tide"] * n) + f" {n}" for n in (250, 3, 120, 250, 7, 250, 60, 250, 250, 250, 250, 2)]
    together = onnx.embed(texts)
    alone = np.concatenate([onnx.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_bf16_agrees_with_fp32_and_queries_stay_fp32(onnx: OnnxEmbedder, cache_dir: Path,
                                                     torch_embedder: SentenceTransformerEmbedder) -> None:
    bf16 = OnnxEmbedder(cache_dir=cache_dir, precision="bf16")
    chunks = [" ".join(f"{word}{i % 7}" for i in range(180)) for word in ("harbour", "meadow", "signal", "copper")]
    ours, theirs = bf16.embed(TEXTS + chunks), torch_embedder.embed(TEXTS + chunks)
    assert bf16.precision == "bf16"
    assert (ours * theirs).sum(axis=1).min() >= 0.999
    fp32 = onnx.embed(TEXTS + chunks)
    assert not np.allclose(ours, fp32, atol=1e-6)  # the large batch did run in bf16 ...
    np.testing.assert_allclose(bf16.embed([TEXTS[0]]), fp32[:1], atol=1e-5)  # ... a single query in fp32


def test_bf16_falls_back_to_fp32_without_native_bf16(cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     onnx: OnnxEmbedder) -> None:
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    embedder = OnnxEmbedder(cache_dir=cache_dir, precision="bf16")
    chunks = [" ".join(["lantern"] * 200)] * 4
    np.testing.assert_allclose(embedder.embed(chunks), onnx.embed(chunks), atol=1e-5)
    assert embedder.precision == "fp32"
