"""Adapter folders for integration tests: copies, mutated copies and archives of real PEFT files (synthetic
variants are :func:`gateway.dev.demo_model.synthetic_variant`)."""

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

from adapters.layout import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE


def copy_adapter(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy(src / name, dest / name)
    return dest


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / CONFIG_FILE).read_text())
        change(config)
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    return apply


def _edit_tensors(change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS_FILE)
        save_file(change(dict(tensors)), str(folder / WEIGHTS_FILE))
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
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes((2**40).to_bytes(8, "little") + data[8:])


def _not_json(folder: Path) -> None:
    (folder / CONFIG_FILE).write_text("{'r': 8")


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
