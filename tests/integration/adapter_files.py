"""Adapter folders for integration tests: real PEFT files, mutated copies, archives, synthetic variants."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def copy_adapter(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        shutil.copy(src / name, dest / name)
    return dest


def synthetic_variant(src: Path, dest: Path, *, seed: int) -> Path:
    """The same PEFT config with new random LoRA weights: a distinct, valid adapter, made in milliseconds."""
    copy_adapter(src, dest)
    rng = np.random.default_rng(seed)
    tensors = {k: (rng.standard_normal(v.shape) * 0.2).astype(np.float32) for k, v in load_file(src / WEIGHTS).items()}
    save_file(tensors, str(dest / WEIGHTS))
    return dest


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / CONFIG).read_text())
        change(config)
        (folder / CONFIG).write_text(json.dumps(config))
    return apply


def _edit_tensors(change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        save_file(change(dict(tensors)), str(folder / WEIGHTS))
    return apply


def _first(tensors: dict[str, np.ndarray], part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


def _rename_to_layer_99(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.replace("layers.0.", "layers.99."): v for k, v in t.items()}


def _transpose_a(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    key = _first(t, "lora_A")
    t[key] = np.ascontiguousarray(t[key].T)
    return t


def _as_f64(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    key = _first(t, "lora_B")
    t[key] = t[key].astype(np.float64)
    return t


def _with_value(value: float) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def change(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = _first(t, "lora_B")
        t[key] = t[key].copy()
        t[key].flat[3] = value
        return t
    return change


def _absurd_header(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes((2**40).to_bytes(8, "little") + data[8:])


def _not_json(folder: Path) -> None:
    (folder / CONFIG).write_text("{'r': 8")


MUTATIONS: dict[str, Callable[[Path], None]] = {
    "config_not_json": _not_json,
    "not_a_lora_config": _edit_config(lambda c: c.update(peft_type="PREFIX_TUNING")),
    "rank_above_maximum": _edit_config(lambda c: c.update(r=64)),
    "unknown_target_module": _edit_config(lambda c: c.update(target_modules=["wq", "q_proj"])),
    "tensor_for_missing_layer": _edit_tensors(_rename_to_layer_99),
    "lora_a_shape": _edit_tensors(_transpose_a),
    "unsupported_dtype": _edit_tensors(_as_f64),
    "nan_weights": _edit_tensors(_with_value(float("nan"))),
    "infinite_weights": _edit_tensors(_with_value(float("inf"))),
    "absurd_header_length": _absurd_header,
}


def tar_gz(members: dict[str, bytes], *, symlink: tuple[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type = tarfile.SYMTYPE
            info.linkname = symlink[1]
            tar.addfile(info)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()
