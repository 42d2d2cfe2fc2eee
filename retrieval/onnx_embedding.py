"""The same sentence embeddings, run with ONNX Runtime on the CPU (single queries several times faster).

:class:`OnnxEmbedder` is an :class:`~retrieval.embedding.Embedder` that gives the same vectors as
:class:`~retrieval.embedding.SentenceTransformerEmbedder` (cosine agreement above 0.9999, see
``loadtests/embed_bench.py``): the same ``tokenizer.json`` cut at the same ``max_seq_length``, the
transformer exported to ONNX, then mean pooling over the attention mask and L2 normalisation, which is
what the model folder's ``modules.json`` and ``1_Pooling/config.json`` say sentence-transformers does.

The ONNX file is exported once, offline, from the local model folder (``torch.onnx.export``; no hub) into
a cache folder, next to a small ``meta.json`` naming the source files it came from (size and mtime). A
missing, stale or unreadable cache is exported again. The export (a few seconds) happens on the first
``embed``, which the retrieval service runs off the event loop in its embedding thread at start-up.

Why it is faster, beyond the runtime itself: the texts of a call are sorted by length and run in
sub-batches of at most ``_RUN_TOKENS`` padded tokens, each padded to its own longest text (never to the
model's window; a short text never waits for a long one's padding), tokenising is the Rust tokenizer's
``encode_batch``, and there is no per-call framework overhead (sentence-transformers builds features and
moves tensors on every call). The session runs with a fixed number of intra-op threads (default 1: the
machine's other core belongs to the inference engine) and without spin-waiting, so an idle embedder does
not burn a core.

``precision="bf16"``: sub-batches of at least ``_BF16_MIN_TOKENS`` padded tokens (ingestion) run the same
weights in torch under ``torch.autocast(bfloat16)``: oneDNN's bf16 matrix products, about 1.7x the fp32
work rate per core on a CPU with AVX512_BF16 (or AMX), with layer norms, softmax and pooling kept in
float32 (cosine to the fp32 vectors above 0.9999, see ``loadtests/embed_bench.py``). ONNX Runtime has no
bf16 matrix product on x86, hence torch. Smaller runs (single queries) stay on ONNX Runtime fp32, whose
per-call overhead is lower. A CPU without native bf16 (where oneDNN would emulate it, slower than fp32)
falls back to fp32, logged once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval.embedding import MINILM_DIMENSION, TokenCountingEmbedder, bundled_minilm_path
from retrieval.errors import RetrievalUnavailable

log = logging.getLogger("banyan.retrieval")

_MODEL_FILE = "model.onnx"
_META_FILE = "meta.json"
_FORMAT = 1
"""Bumped when the export changes, so that older caches are rebuilt."""
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_RUN_TOKENS = 2048
"""Most padded tokens per model run (8 full 256-token chunks). Measured here, one thread: 8 to 16 full chunks
per run were 5-15 % faster than 32 (the attention scores of a smaller run stay in cache)."""
_BF16_MIN_TOKENS = 256
"""With ``precision="bf16"``, runs of at least this many padded tokens go to torch bf16; smaller ones to ONNX
Runtime fp32 (a single query: torch's per-call overhead outweighs its faster matrix products)."""

Precision = Literal["fp32", "bf16"]


class OnnxEmbedder(TokenCountingEmbedder):
    """A BERT-style sentence-transformers folder (default: the bundled all-MiniLM-L6-v2) run by ONNX Runtime.

    ``cache_dir`` holds the exported model (one sub-folder per source folder). Constructing is cheap;
    the first ``embed`` exports (when needed) and loads the model (with ``precision="bf16"``, the torch
    model too). Like the torch embedder, a lock keeps callers to one batch at a time.
    """

    def __init__(self, model_path: Path | None = None, *, cache_dir: Path, dimension: int = MINILM_DIMENSION,
                 threads: int = 1, precision: Precision = "fp32") -> None:
        super().__init__(model_path, dimension)
        self._cache_dir = cache_dir
        self._threads = threads
        self._precision = precision
        self._lock = threading.Lock()
        self._session: Any = None
        self._encoder: Any = None
        self._pad_id = 0
        self._bf16: _TorchBf16 | None = None

    @property
    def model_file(self) -> Path:
        """Where the exported model is cached for this model folder."""
        return _cache_folder(self._cache_dir, self._source()) / _MODEL_FILE

    @property
    def precision(self) -> Precision:
        """What large batches run at: ``bf16`` only once loaded on a CPU with native bf16, else ``fp32``."""
        return "bf16" if self._bf16 is not None else "fp32"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        out = np.empty((len(texts), self._dimension), dtype=np.float32)
        with self._lock:
            session, encoder = self._load_locked()
            encodings = encoder.encode_batch(list(texts))
            for run in _runs([len(e.ids) for e in encodings], _RUN_TOKENS):
                ids, mask = _pad([encodings[i].ids for i in run], self._pad_id)
                if self._bf16 is not None and ids.size >= _BF16_MIN_TOKENS:
                    hidden = self._bf16.run(ids, mask)
                else:
                    hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                                "token_type_ids": np.zeros_like(ids)})[0]
                out[run] = _mean_pool_normalise(hidden, mask)
        return out

    def _source(self) -> Path:
        return self._path or bundled_minilm_path()

    def _load_locked(self) -> tuple[Any, Any]:
        if self._session is not None:
            return self._session, self._encoder
        source = self._source()
        tokenizer = self._load_tokenizer()
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            encoder = Tokenizer.from_file(str(source / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise RetrievalUnavailable("The embedding model could not be loaded.") from e
        # What sentence-transformers does: cut at max_seq_length. Padding is ours (per sub-batch, see _pad).
        encoder.enable_truncation(max_length=tokenizer.max_tokens)
        encoder.no_padding()
        folder = _cache_folder(self._cache_dir, source)
        session = _open_session(ort, folder, source, threads=self._threads)
        if session is None:
            export_model(source, folder)
            session = _open_session(ort, folder, source, threads=self._threads)
            if session is None:
                raise RetrievalUnavailable("The exported embedding model could not be loaded.")
        dimension = int(session.get_outputs()[0].shape[-1])
        if dimension != self._dimension:
            raise RetrievalUnavailable(f"The embedding model has {dimension} dimensions, not {self._dimension}.")
        if self._precision == "bf16":
            self._bf16 = _TorchBf16.load(source, threads=self._threads)
        log.info("embedding model loaded (ONNX Runtime)",
                 extra={"dimension": dimension, "threads": self._threads, "precision": self.precision})
        self._pad_id = encoder.token_to_id("[PAD]") or 0
        self._session, self._encoder = session, encoder
        return session, encoder


class _TorchBf16:
    """The model folder's transformer in torch, run under bf16 autocast with a fixed number of threads."""

    def __init__(self, model: Any, threads: int) -> None:
        self._model = model
        self._threads = threads

    @classmethod
    def load(cls, source: Path, *, threads: int) -> _TorchBf16 | None:
        """The model, or None (fp32 then) when this CPU has no native bf16 matrix products."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
            from transformers import AutoModel
        except ImportError as e:
            raise RetrievalUnavailable("bf16 embedding needs torch and transformers.") from e
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning("this CPU has no native bf16: the embedder runs in fp32")
            return None
        try:
            model = AutoModel.from_pretrained(str(source), local_files_only=True, attn_implementation="sdpa")
        except (OSError, ValueError) as e:
            raise RetrievalUnavailable("The embedding model could not be loaded for bf16.") from e
        return cls(model.eval(), threads)

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        # torch's thread count is per process: set for this run, then given back (other torch users).
        previous = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        try:
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = self._model(input_ids=ids_t, attention_mask=mask_t,
                                     token_type_ids=torch.zeros_like(ids_t)).last_hidden_state
            return np.asarray(hidden.float().numpy())
        finally:
            torch.set_num_threads(previous)


def _runs(lengths: list[int], budget: int) -> list[list[int]]:
    """The indices of ``lengths`` sorted by length, cut into runs whose padded size (count x longest) stays
    within ``budget`` (a single longer text makes a run of its own)."""
    runs: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[i] > budget:
            runs.append(current)
            current = []
        current.append(i)
    if current:
        runs.append(current)
    return runs


def _pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to the longest row, and the attention mask (1 on real tokens)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for k, row in enumerate(rows):
        ids[k, :len(row)] = row
        mask[k, :len(row)] = 1
    return ids, mask


def _mean_pool_normalise(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling (padding excluded) then ``normalize`` (L2, eps 1e-12)."""
    weights = mask[:, :, None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(pooled / norms, dtype=np.float32)


def _fingerprint(source: Path) -> dict[str, Any]:
    """What the cache was made from: the export format and the model folder's files (size and mtime)."""
    files = {}
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        path = source / name
        if path.exists():
            stat = path.stat()
            files[name] = [stat.st_size, stat.st_mtime_ns]
    return {"format": _FORMAT, "source": str(source.resolve()), "files": files}


def _cache_folder(cache_dir: Path, source: Path) -> Path:
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{source.name}-{key}"


def _open_session(ort: Any, folder: Path, source: Path, *, threads: int) -> Any:
    """The cached model's session, or None when the cache is missing, stale or unreadable."""
    model, meta = folder / _MODEL_FILE, folder / _META_FILE
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if recorded != _fingerprint(source):
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own (pybind) exception types for a bad file
        log.warning("the cached ONNX embedding model is unreadable; exporting it again", extra={"error": str(e)})
        return None


def export_model(source: Path, folder: Path) -> None:
    """Export the transformer of the model folder ``source`` to ``folder/model.onnx`` (offline, blocking).

    Written to a temporary file and renamed, the ``meta.json`` last: a crash leaves no cache that looks
    whole."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log.info("exporting the embedding model to ONNX (once; a few seconds)", extra={"folder": str(folder)})
    started = time.perf_counter()
    try:
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(source), local_files_only=True, attn_implementation="eager")
    except (ImportError, OSError, ValueError) as e:
        raise RetrievalUnavailable("The embedding model could not be loaded for the ONNX export.") from e

    class _Hidden(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    wrapper = _Hidden(model).eval()
    # A mask with padding in it: traced with an all-ones mask, the masking could be left out of the graph.
    ids = torch.full((2, 8), 1000, dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 4:] = 0
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _META_FILE).unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        axes = {name: {0: "batch", 1: "tokens"} for name in (*_INPUTS, "last_hidden_state")}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes about shapes it traced as constants
            torch.onnx.export(wrapper, (ids, mask, torch.zeros_like(ids)), tmp_name, input_names=list(_INPUTS),
                              output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
                              dynamo=False)
        os.replace(tmp_name, folder / _MODEL_FILE)
    except Exception as e:
        Path(tmp_name).unlink(missing_ok=True)
        raise RetrievalUnavailable("The embedding model could not be exported to ONNX.") from e
    (folder / _META_FILE).write_text(json.dumps(_fingerprint(source)))
    log.info("embedding model exported to ONNX", extra={"seconds": round(time.perf_counter() - started, 1)})
