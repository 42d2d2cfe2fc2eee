from __future__ import annotations

import hashlib
import json
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapters.basemodel import BaseModelSpec, ModuleShape
from adapters.errors import AdapterError, AdapterTooLargeError, InvalidAdapterError
from adapters.layout import CONFIG_FILE, WEIGHTS_FILE
from adapters.validation import SIDE_FILES, AdapterInfo, check_file_set, side_file, sort_files, validate_adapter_dir
from gateway.dev.demo_model import LORA_TARGETS

PREFIX = "base_model.model.model.layers"
Q_A = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
Q_B = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
MAX_RANK = 16
MAX_BYTES = 10 * 1024 * 1024


# -- helpers: the safetensors format written by hand, so headers can be made wrong on purpose ---------


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_safetensors(path: Path, header: dict[str, Any], data: bytes, *, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)


def edit_header(adapter: Path, change: Callable[[dict[str, Any]], None]) -> None:
    header, data = read_safetensors(adapter / WEIGHTS_FILE)
    change(header)
    write_safetensors(adapter / WEIGHTS_FILE, header, data)


def edit_config(adapter: Path, **changes: Any) -> None:
    config = json.loads((adapter / CONFIG_FILE).read_text())
    config.update(changes)
    (adapter / CONFIG_FILE).write_text(json.dumps(config))


def poke_float32(adapter: Path, tensor: str, value: float) -> None:
    """Overwrite the first element of an F32 tensor."""
    header, data = read_safetensors(adapter / WEIGHTS_FILE)
    begin = header[tensor]["data_offsets"][0]
    patched = data[:begin] + struct.pack("<f", value) + data[begin + 4:]
    write_safetensors(adapter / WEIGHTS_FILE, header, patched)


def convert_weights(adapter: Path, dtype: str) -> None:
    """Rewrite every tensor as F16 or BF16 (round toward zero for BF16), with fresh offsets."""
    header, data = read_safetensors(adapter / WEIGHTS_FILE)
    out_header: dict[str, Any] = {"__metadata__": header.pop("__metadata__")}
    chunks: list[bytes] = []
    offset = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        values = np.frombuffer(data[begin:end], dtype="<f4")
        raw = (values.astype("<f2").tobytes() if dtype == "F16"
               else (values.view("<u4") >> 16).astype("<u2").tobytes())
        out_header[name] = {"dtype": dtype, "shape": info["shape"],
                            "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    write_safetensors(adapter / WEIGHTS_FILE, out_header, b"".join(chunks))


def validate(adapter: Path, spec: BaseModelSpec, *, max_rank: int = MAX_RANK,
             max_bytes: int = MAX_BYTES) -> AdapterInfo:
    return validate_adapter_dir(adapter, base=spec, max_rank=max_rank, max_bytes=max_bytes)


def rejection(adapter: Path, spec: BaseModelSpec, *, code: str,
              error: type[AdapterError] = InvalidAdapterError, max_rank: int = MAX_RANK,
              max_bytes: int = MAX_BYTES) -> str:
    """Validate, expecting a refusal with ``code``; return the message, checked to hold no server path."""
    with pytest.raises(error) as caught:
        validate(adapter, spec, max_rank=max_rank, max_bytes=max_bytes)
    assert caught.value.code == code, caught.value.message
    assert str(adapter.parent) not in caught.value.message
    return caught.value.message


# -- the happy path ---------------------------------------------------------------------------------


def test_a_real_peft_adapter_is_accepted(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    info = validate(adapter_dir, demo_spec)

    config, weights = (adapter_dir / CONFIG_FILE).read_bytes(), (adapter_dir / WEIGHTS_FILE).read_bytes()
    assert (info.rank, info.alpha) == (8, 16.0)
    assert info.target_modules == sorted(LORA_TARGETS)
    assert info.sha256 == hashlib.sha256(config + weights).hexdigest()
    assert info.size_bytes == len(config) + len(weights)


def test_peft_tensor_names_carry_no_adapter_name(peft_adapter: Path) -> None:
    header, _ = read_safetensors(peft_adapter / WEIGHTS_FILE)
    assert Q_A in header and not any(".default" in name for name in header)


def test_the_hash_changes_with_any_weight(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    before = validate(adapter_dir, demo_spec).sha256
    poke_float32(adapter_dir, Q_A, 0.5)
    assert validate(adapter_dir, demo_spec).sha256 != before


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_weights_are_accepted(dtype: str, adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    convert_weights(adapter_dir, dtype)
    assert validate(adapter_dir, demo_spec).rank == 8


def test_a_target_regex_is_resolved_against_the_base_model(adapter_dir: Path,
                                                            demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, target_modules=r".*\.(q|k|v|o|gate|up|down)_proj")
    assert validate(adapter_dir, demo_spec).target_modules == sorted(LORA_TARGETS)


def test_rank_pattern_sets_the_expected_shape_per_module(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, rank_pattern={"q_proj": 4})
    message = rejection(adapter_dir, demo_spec, code="tensor_shape_mismatch")
    assert "q_proj" in message and "[4, 128]" in message


# -- 1. the set of files ----------------------------------------------------------------------------


def test_a_missing_weights_file_is_named(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    (adapter_dir / WEIGHTS_FILE).unlink()
    assert WEIGHTS_FILE in rejection(adapter_dir, demo_spec, code="missing_adapter_file")


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "model.ckpt"])
def test_pickle_weights_are_refused(name: str, adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    (adapter_dir / name).write_bytes(b"\x80\x04K\x01.")
    message = rejection(adapter_dir, demo_spec, code="unsafe_weights_format")
    assert name in message and "only safetensors" in message


def test_pickle_weights_without_safetensors_say_why(demo_spec: BaseModelSpec) -> None:
    with pytest.raises(InvalidAdapterError, match="only safetensors") as caught:
        check_file_set(["adapter_config.json", "adapter_model.bin"])
    assert caught.value.code == "unsafe_weights_format"


def test_an_unknown_file_is_named() -> None:
    with pytest.raises(InvalidAdapterError, match=r"notes\.txt") as caught:
        check_file_set(["adapter_config.json", "adapter_model.safetensors", "notes.txt"])
    assert caught.value.code == "unexpected_adapter_file"


def test_a_trainer_output_folder_keeps_the_adapter_and_lists_its_side_files() -> None:
    files = sort_files(["adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
                        "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "training_args.bin",
                        ".gitattributes", "trainer_state.json", "rng_state_1.pth", "checkpoint-500/optimizer.pt",
                        "checkpoint-500/adapter_model.safetensors", "checkpoint-1000/scheduler.pt", "runs/x/events"])
    assert files.kept == ["adapter_config.json", "adapter_model.safetensors"]
    assert files.ignored == [".gitattributes", "README.md", "chat_template.jinja", "checkpoint-1000/",
                             "checkpoint-500/", "rng_state_1.pth", "runs/", "special_tokens_map.json", "tokenizer.json",
                             "tokenizer_config.json", "trainer_state.json", "training_args.bin"]


@pytest.mark.parametrize(("path", "reported"), [
    ("README.md", "README.md"), ("merges.txt", "merges.txt"), ("optimizer.pt", "optimizer.pt"),
    ("checkpoint-7/", "checkpoint-7/"), ("checkpoint-7/rng_state.pth", "checkpoint-7/"), (".git/HEAD", ".git/"),
    ("docs/README.md", None),  # side files are known at the folder's top only
    ("readme.md", None), ("adapter_model.bin", None), ("notes.txt", None), ("checkpoint/", None),
])
def test_side_files_come_from_the_registry(path: str, reported: str | None) -> None:
    assert side_file(path) == reported


def test_every_registry_entry_names_what_it_is() -> None:
    assert all(entry.pattern and entry.what for entry in SIDE_FILES)
    assert len({entry.pattern for entry in SIDE_FILES}) == len(SIDE_FILES)


def test_pickle_weights_only_are_refused_with_how_to_convert() -> None:
    with pytest.raises(InvalidAdapterError) as caught:
        sort_files(["adapter_config.json", "adapter_model.bin", "README.md", "tokenizer.json"])
    assert caught.value.code == "unsafe_weights_format"
    assert "adapter_model.bin" in caught.value.message and "safe_serialization=True" in caught.value.message


def test_an_unknown_file_beside_side_files_is_still_refused() -> None:
    with pytest.raises(InvalidAdapterError, match=r"'notes\.txt'.*side files") as caught:
        sort_files(["adapter_config.json", "adapter_model.safetensors", "README.md", "notes.txt"])
    assert caught.value.code == "unexpected_adapter_file"


def test_a_folder_on_disk_validates_with_its_side_files_left_alone(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    (adapter_dir / "tokenizer.json").write_text("{}")
    (adapter_dir / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    (adapter_dir / "checkpoint-3").mkdir()
    (adapter_dir / "checkpoint-3" / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    assert validate(adapter_dir, demo_spec).rank == 8


def test_a_symlinked_file_is_refused(adapter_dir: Path, demo_spec: BaseModelSpec, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    (adapter_dir / CONFIG_FILE).rename(outside)
    (adapter_dir / CONFIG_FILE).symlink_to(outside)
    assert "symlink" in rejection(adapter_dir, demo_spec, code="unexpected_adapter_file")


def test_an_adapter_over_the_size_limit_is_too_large(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    message = rejection(adapter_dir, demo_spec, code="adapter_too_large", error=AdapterTooLargeError,
                        max_bytes=100_000)
    assert "100,000" in message


# -- 2. adapter_config.json -------------------------------------------------------------------------


def test_bad_json_config_is_refused(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    (adapter_dir / CONFIG_FILE).write_text('{"r": 8,')
    message = rejection(adapter_dir, demo_spec, code="invalid_adapter_config")
    assert CONFIG_FILE in message and "not valid JSON" in message


@pytest.mark.parametrize("text", ['["a list"]', '{"r": NaN}', '{"r": 8, "r": 4}'])
def test_config_must_be_a_plain_json_object(text: str, adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    (adapter_dir / CONFIG_FILE).write_text(text)
    assert CONFIG_FILE in rejection(adapter_dir, demo_spec, code="invalid_adapter_config")


def test_a_non_lora_adapter_is_refused(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, peft_type="LOHA")
    assert "LOHA" in rejection(adapter_dir, demo_spec, code="unsupported_adapter_type")


def test_a_rank_above_the_limit_names_both(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    message = rejection(adapter_dir, demo_spec, code="rank_too_large", max_rank=4)
    assert "r=8" in message and "rank 4" in message


@pytest.mark.parametrize("r", [0, -1, 8.0, True, "8"])
def test_the_rank_must_be_a_positive_integer(r: Any, adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, r=r)
    assert "positive integer" in rejection(adapter_dir, demo_spec, code="invalid_adapter_config")


@pytest.mark.parametrize("alpha", [0, -16, "16", None])
def test_alpha_must_be_a_positive_number(alpha: Any, adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, lora_alpha=alpha)
    assert "lora_alpha" in rejection(adapter_dir, demo_spec, code="invalid_adapter_config")


def test_an_unknown_target_module_is_named_with_the_real_ones(adapter_dir: Path,
                                                               demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, target_modules=[*LORA_TARGETS, "foo_proj"])
    message = rejection(adapter_dir, demo_spec, code="unknown_target_module")
    assert "foo_proj" in message and "q_proj" in message and "down_proj" in message


def test_a_target_regex_matching_nothing_is_refused(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, target_modules=r".*\.c_attn")
    assert "matches no module" in rejection(adapter_dir, demo_spec, code="unknown_target_module")


def test_a_catastrophic_target_regex_is_refused_without_running_it(adapter_dir: Path,
                                                                   demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, target_modules="(.*)*x")
    assert "too complex" in rejection(adapter_dir, demo_spec, code="invalid_adapter_config")


def test_a_slow_target_regex_is_cut_short(adapter_dir: Path) -> None:
    big_model = BaseModelSpec.from_hf_config({
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 128,
        "num_attention_heads": 64, "num_key_value_heads": 8})
    # Within the structural limits, yet about 10 ms per module name: seconds over 896 modules.
    edit_config(adapter_dir, target_modules="(.|.|.|.|.|.).*(.|.|.|.|.|.).*(.|.|.|.|.).*.*!")
    started = time.monotonic()
    assert "too complex" in rejection(adapter_dir, big_model, code="invalid_adapter_config")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(("changes", "words"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias='all'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"init_lora_weights": "pissa"}, "pissa"),
])
def test_features_we_cannot_serve_are_named(changes: dict[str, Any], words: str, adapter_dir: Path,
                                            demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, **changes)
    assert words in rejection(adapter_dir, demo_spec, code="unsupported_lora_feature")


def test_layers_to_transform_outside_the_model_is_refused(adapter_dir: Path,
                                                          demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, layers_to_transform=[0, 5])
    message = rejection(adapter_dir, demo_spec, code="invalid_adapter_config")
    assert "layer 5" in message and "2 layers" in message


def test_a_rank_pattern_above_the_limit_is_refused(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, rank_pattern={"q_proj": 64})
    message = rejection(adapter_dir, demo_spec, code="rank_too_large")
    assert "q_proj" in message and "64" in message and str(MAX_RANK) in message


# -- 3. the safetensors header ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [2**62, 10**6])
def test_an_absurd_header_length_is_refused(length: int, adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    header, data = read_safetensors(adapter_dir / WEIGHTS_FILE)
    write_safetensors(adapter_dir / WEIGHTS_FILE, header, data, length=length)
    message = rejection(adapter_dir, demo_spec, code="invalid_safetensors")
    assert WEIGHTS_FILE in message and f"{length:,}" in message


def test_a_header_larger_than_the_base_model_allows_is_refused_before_parsing(
        adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    header, data = read_safetensors(adapter_dir / WEIGHTS_FILE)
    end = len(data)
    for i in range(40_000):  # zero-size tensors: a big header over almost no data (the review's 50 MiB case, small)
        header[f"pad{i:05d}"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    write_safetensors(adapter_dir / WEIGHTS_FILE, header, data)
    header_bytes = int.from_bytes((adapter_dir / WEIGHTS_FILE).read_bytes()[:8], "little")
    tracemalloc.start()
    try:
        message = rejection(adapter_dir, demo_spec, code="invalid_safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"{header_bytes:,}" in message and "28 LoRA tensors" in message
    assert peak < header_bytes // 2  # refused from the length field: the header was never read, let alone parsed


def test_a_truncated_weights_file_is_refused(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    weights = adapter_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "truncated" in rejection(adapter_dir, demo_spec, code="invalid_safetensors")


def test_a_header_that_is_not_json_is_refused(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    (adapter_dir / WEIGHTS_FILE).write_bytes((4).to_bytes(8, "little") + b"\xff{}}" + b"\0" * 8)
    assert "UTF-8" in rejection(adapter_dir, demo_spec, code="invalid_safetensors")


@pytest.mark.parametrize("dtype", ["I64", "F64"])
def test_an_unsupported_dtype_is_named(dtype: str, adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    def to_8_byte_dtype(header: dict[str, Any]) -> None:
        header[Q_A].update(dtype=dtype, shape=[8, 64])  # same byte size as F32 [8, 128]

    edit_header(adapter_dir, to_8_byte_dtype)
    message = rejection(adapter_dir, demo_spec, code="unsupported_dtype")
    assert dtype in message and Q_A in message


def test_overlapping_tensors_are_refused(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    def overlap(header: dict[str, Any]) -> None:
        header[Q_B]["data_offsets"] = header[Q_A]["data_offsets"]
        header[Q_B]["shape"] = header[Q_A]["shape"]

    edit_header(adapter_dir, overlap)
    assert "overlaps" in rejection(adapter_dir, demo_spec, code="invalid_safetensors")


def test_offsets_that_disagree_with_the_shape_are_refused(adapter_dir: Path,
                                                          demo_spec: BaseModelSpec) -> None:
    def grow(header: dict[str, Any]) -> None:
        header[Q_A]["shape"] = [8, 129]

    edit_header(adapter_dir, grow)
    message = rejection(adapter_dir, demo_spec, code="invalid_safetensors")
    assert Q_A in message and "4,128 bytes" in message


# -- 4. tensor names --------------------------------------------------------------------------------


def test_a_tensor_for_a_layer_the_model_lacks_is_named(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    def move_layer_1_to_2(header: dict[str, Any]) -> None:
        for name in [n for n in header if n.startswith(f"{PREFIX}.1.")]:
            header[name.replace(f"{PREFIX}.1.", f"{PREFIX}.2.")] = header.pop(name)

    edit_header(adapter_dir, move_layer_1_to_2)
    message = rejection(adapter_dir, demo_spec, code="unexpected_tensor")
    assert f"{PREFIX}.2." in message and "layer 2" in message and "2 layers" in message


@pytest.mark.parametrize("name", [
    "base_model.model.lm_head.lora_A.weight",
    f"{PREFIX}.0.self_attn.q_proj.lora_A.default.weight",
    f"{PREFIX}.0.self_attn.rotary.lora_A.weight",
    f"{PREFIX}.0.mlp.q_proj.lora_A.weight",
])
def test_a_tensor_that_maps_to_no_module_is_named(name: str, adapter_dir: Path,
                                                   demo_spec: BaseModelSpec) -> None:
    def rename(header: dict[str, Any]) -> None:
        header[name] = header.pop(Q_A)

    edit_header(adapter_dir, rename)
    assert name in rejection(adapter_dir, demo_spec, code="unexpected_tensor")


def test_a_tensor_for_a_module_not_in_target_modules_is_refused(adapter_dir: Path,
                                                                 demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, target_modules=[t for t in LORA_TARGETS if t != "down_proj"])
    message = rejection(adapter_dir, demo_spec, code="unexpected_tensor")
    assert "down_proj" in message and "target_modules" in message


def test_exclude_modules_narrows_the_targets(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, exclude_modules=["down_proj"])
    assert "down_proj" in rejection(adapter_dir, demo_spec, code="unexpected_tensor")


def test_layers_to_transform_narrows_the_targets(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, layers_to_transform=[0])
    message = rejection(adapter_dir, demo_spec, code="unexpected_tensor")
    assert f"{PREFIX}.1." in message and "target_modules" in message


def test_lora_a_without_lora_b_is_refused(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    header, data = read_safetensors(adapter_dir / WEIGHTS_FILE)
    begin, end = header.pop(Q_B)["data_offsets"]
    shift = end - begin
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
            info["data_offsets"] = [info["data_offsets"][0] - shift, info["data_offsets"][1] - shift]
    write_safetensors(adapter_dir / WEIGHTS_FILE, header, data[:begin] + data[end:])
    message = rejection(adapter_dir, demo_spec, code="missing_tensor")
    assert "q_proj" in message and "no lora_B" in message


# -- 5. shapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tensor", "wrong", "expected"), [
    (Q_A, [4, 256], "[8, 128]"),
    (Q_B, [64, 16], "[128, 8]"),
])
def test_a_wrong_shape_names_tensor_got_and_expected(tensor: str, wrong: list[int], expected: str,
                                                      adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    def reshape(header: dict[str, Any]) -> None:
        header[tensor]["shape"] = wrong  # same number of elements, so the offsets still agree

    edit_header(adapter_dir, reshape)
    message = rejection(adapter_dir, demo_spec, code="tensor_shape_mismatch")
    assert tensor in message and str(wrong) in message and expected in message


# -- 6. values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "words"), [(float("nan"), "NaN"), (float("inf"), "infinite"),
                                              (float("-inf"), "infinite")])
def test_non_finite_weights_are_refused(value: float, words: str, adapter_dir: Path,
                                        demo_spec: BaseModelSpec) -> None:
    poke_float32(adapter_dir, Q_B, value)
    message = rejection(adapter_dir, demo_spec, code="non_finite_weights")
    assert Q_B in message and words in message


def test_non_finite_bf16_weights_are_refused(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    convert_weights(adapter_dir, "BF16")
    header, data = read_safetensors(adapter_dir / WEIGHTS_FILE)
    begin = header[Q_A]["data_offsets"][0]
    inf_bf16 = struct.pack("<H", 0x7F80)
    write_safetensors(adapter_dir / WEIGHTS_FILE, header, data[:begin] + inf_bf16 + data[begin + 2:])
    assert Q_A in rejection(adapter_dir, demo_spec, code="non_finite_weights")


# -- a base model that does not fit ----------------------------------------------------------------


def _base_refusal(adapter_dir: Path, spec: BaseModelSpec, *, code: str) -> str:
    with pytest.raises(InvalidAdapterError) as caught:
        validate_adapter_dir(adapter_dir, base=spec, max_rank=MAX_RANK, max_bytes=MAX_BYTES,
                             served_bases=["banyan-demo"])
    assert caught.value.code == code, caught.value.message
    return caught.value.message


def test_an_adapter_for_a_bigger_base_says_which_base_it_was_made_for(adapter_dir: Path,
                                                                      demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    smaller = BaseModelSpec(num_layers=demo_spec.num_layers, parents=demo_spec.parents,
                            modules={**demo_spec.modules, "q_proj": ModuleShape(96, 128)})
    message = _base_refusal(adapter_dir, smaller, code="tensor_shape_mismatch")
    assert "q_proj" in message and "expected" in message  # what does not fit, as before
    assert "made for base model 'meta-llama/Llama-3.1-8B'" in message and "Banyan serves 'banyan-demo'" in message
    assert "names alone are not compared" in message


def test_a_layer_the_base_lacks_explains_the_mismatch_without_a_base_name(adapter_dir: Path,
                                                                         demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, base_model_name_or_path=None)
    one_layer = BaseModelSpec(num_layers=1, modules=demo_spec.modules, parents=demo_spec.parents)
    message = _base_refusal(adapter_dir, one_layer, code="unexpected_tensor")
    assert "layer 1" in message and "does not say which base model" in message and "'banyan-demo'" in message


def test_an_unknown_target_module_explains_the_mismatch(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, target_modules=["c_attn"], base_model_name_or_path="gpt2")
    message = _base_refusal(adapter_dir, demo_spec, code="unknown_target_module")
    assert "c_attn" in message and "made for base model 'gpt2'" in message


def test_a_different_base_name_is_not_fatal_when_the_shapes_fit(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, base_model_name_or_path="someone/a-fine-tune-of-the-demo-model")
    assert validate(adapter_dir, demo_spec).rank == 8


def test_a_wrong_rank_is_the_adapter_own_fault_not_the_base(adapter_dir: Path, demo_spec: BaseModelSpec) -> None:
    edit_config(adapter_dir, r=4, lora_alpha=8)
    message = _base_refusal(adapter_dir, demo_spec, code="tensor_shape_mismatch")
    assert "rank 4" in message and "made for base model" not in message
