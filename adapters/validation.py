"""Decide whether an uploaded folder is a PEFT LoRA adapter we can serve on the base model.

Nothing here trusts the upload: the safetensors file is parsed by hand (no torch, no pickle), every
size and offset is bounds-checked before use, weights are read in chunks, and every failure is an
``InvalidAdapterError`` or ``AdapterTooLargeError`` whose message names the file, tensor or limit.

What PEFT (0.21) writes, and so what is accepted: ``adapter_config.json`` and ``adapter_model.safetensors``.
Whatever else a ``save_pretrained`` or trainer output folder holds beside them (tokenizer files, the ``README.md``
model card, trainer state, ``checkpoint-*/`` folders, ...) is a side file: listed in :data:`SIDE_FILES`, accepted,
never opened and never kept (:func:`sort_files`). Tensor names carry no adapter name:
``base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_A.weight`` (and ``lora_B``). A
name with ``.default.weight`` is refused: vLLM would not recognise it as a LoRA weight.

CPU-bound and blocking: callers on the event loop run it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeGuard

import numpy as np
import numpy.typing as npt

from adapters.basemodel import BaseModelSpec
from adapters.errors import AdapterErrorCode, AdapterTooLargeError, InvalidAdapterError, shown, shown_list
from adapters.layout import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

MAX_CONFIG_BYTES = 1024 * 1024
_HEADER_METADATA_BYTES = 64 * 1024  # __metadata__ (PEFT writes {"format": "pt"}) and the header's padding
_HEADER_ENTRY_BYTES = 160  # one tensor's entry beyond its name: dtype, shape, offsets, JSON punctuation, generously
_CHUNK_BYTES = 1024 * 1024  # a multiple of every accepted element size
_MAX_PATTERN_CHARS = 256
_MAX_PATTERN_REPEATS = 4
_MAX_PATTERN_GROUPS = 3
_MAX_PATTERN_BRANCHES = 16
_QUANTIFIER = re.compile(r"(?<!\()[*+?]|\{")  # "(?" opens a group extension, it quantifies nothing
_NESTED_OR_BACKREFERENCE = re.compile(r"\)[*+?{]|\\[1-9]|\(\?P=")
_MAX_PATTERN_ENTRIES = 1024
_PATTERN_SECONDS = 1.0  # matching legitimate patterns against every module takes about a millisecond
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 by _as_float
}
_TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]*)\.([A-Za-z_][A-Za-z0-9_]*)\."
    r"([A-Za-z_][A-Za-z0-9_]*)\.lora_(A|B)\.weight"
)
_EXAMPLE_NAME = "base_model.model.model.layers.<layer>.<self_attn|mlp>.<module>.lora_A.weight (or lora_B)"
_INITS_WITHOUT_BASE_CHANGES = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    """The config's ``r``; a ``rank_pattern`` may give some modules another rank, never above the limit."""
    alpha: float
    target_modules: list[str]
    """Sorted leaf module names (``q_proj``, ...)."""
    sha256: str
    """Hex sha256 over the config file's bytes, then the weights file's bytes."""
    size_bytes: int
    """Config plus weights."""


@dataclass(frozen=True, slots=True)
class SideFile:
    """A file that PEFT, the transformers ``Trainer``, a tokenizer or git leaves beside an adapter's two files."""

    pattern: str
    """An ``fnmatch`` pattern of a name in the adapter's folder; ending in ``/``: a folder, ignored whole."""
    what: str


SIDE_FILES: tuple[SideFile, ...] = (
    SideFile("README.md", "model card"),
    *(SideFile(name, "tokenizer file") for name in (
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
        "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
        "chat_template.jinja", "chat_template.json")),
    SideFile("training_args.bin", "trainer arguments (a pickle: never opened)"),
    *(SideFile(name, "trainer state") for name in (
        "trainer_state.json", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state.pth",
        "rng_state_*.pth", "all_results.json", "train_results.json", "eval_results.json")),
    SideFile("checkpoint-*/", "trainer checkpoint"),
    SideFile("runs/", "TensorBoard logs"),
    *(SideFile(name, "git metadata") for name in (".gitattributes", ".gitignore", ".git/")),
)
"""What an upload may carry beside the adapter and is dropped unread: the folders ``save_pretrained`` and the
``Trainer`` write, as they are. Anything not listed here or in ``ADAPTER_FILES`` is refused."""


def side_file(path: str) -> str | None:
    """How an ignored side file is reported (``README.md``, ``checkpoint-500/``), or None when ``path`` is not one.

    ``path`` is relative to the adapter's folder, ``/``-separated; a trailing ``/`` names a folder. Files match
    at the folder's top only; a side folder's whole content matches."""
    parts = path.split("/")
    for depth, part in enumerate(parts[:-1]):
        if any(fnmatch.fnmatchcase(part + "/", s.pattern) for s in SIDE_FILES if s.pattern.endswith("/")):
            return "/".join(parts[:depth + 1]) + "/"
    if len(parts) == 1 and any(fnmatch.fnmatchcase(path, s.pattern) for s in SIDE_FILES):
        return path
    return None


@dataclass(frozen=True, slots=True)
class FileSet:
    kept: list[str]
    """The adapter's own files (``ADAPTER_FILES``)."""
    ignored: list[str]
    """The side files found, as :func:`side_file` reports them, sorted, each once."""


def sort_files(paths: Iterable[str]) -> FileSet:
    """Split an upload's files (paths relative to its folder) into the adapter's and the ignored side files;
    refuse pickle weights, a missing required file, or any other file."""
    kept: set[str] = set()
    ignored: set[str] = set()
    for path in paths:
        reported = side_file(path)
        if reported is not None:
            ignored.add(reported)
        else:
            kept.add(path)
    check_file_set(kept)
    return FileSet(kept=sorted(kept), ignored=sorted(ignored))


_CONVERT_HINT = ("convert them: load the adapter with PEFT (PeftModel.from_pretrained(base_model, folder)) and "
                 "save it with model.save_pretrained(out_folder, safe_serialization=True)")


def check_file_set(names: Iterable[str]) -> None:
    """Refuse pickle weights, a missing required file, or any file an adapter does not have (side files
    removed already: :func:`sort_files`)."""
    present = set(names)
    pickled = sorted(n for n in present if n.lower().endswith(PICKLE_SUFFIXES))
    if pickled:
        raise InvalidAdapterError(
            f"{shown_list(pickled)}: only safetensors weights ({WEIGHTS_FILE}) are accepted; pickle-based formats "
            f"(.bin, .pt, .pth, .ckpt) can run code when loaded, so they are never opened here; {_CONVERT_HINT}",
            code=AdapterErrorCode.UNSAFE_WEIGHTS_FORMAT)
    missing = [n for n in ADAPTER_FILES if n not in present]
    if missing:
        raise InvalidAdapterError(f"the adapter is missing {' and '.join(missing)}",
                                  code=AdapterErrorCode.MISSING_ADAPTER_FILE)
    unexpected = sorted(present - set(ADAPTER_FILES))
    if unexpected:
        raise InvalidAdapterError(
            f"unexpected file {shown_list(unexpected)}: an adapter holds {' and '.join(ADAPTER_FILES)}; known "
            "side files (tokenizer files, README.md, trainer state, checkpoint-*/ folders, ...) are ignored, "
            "any other file is refused", code=AdapterErrorCode.UNEXPECTED_ADAPTER_FILE)


def validate_adapter_dir(path: Path, *, base: BaseModelSpec, max_rank: int, max_bytes: int,
                         served_bases: Sequence[str] = ()) -> AdapterInfo:
    """Check the adapter in folder ``path`` against ``base`` and the server's limits (side files in ``path`` are
    skipped). ``served_bases``: the ids of the base models this server serves, named when the adapter does not
    fit ``base``, beside the base model the adapter says it was made for."""
    sizes = _file_sizes(path, max_bytes=max_bytes)
    config_bytes = _read_config_bytes(path / CONFIG_FILE)
    try:
        config = _parse_config(config_bytes, base=base, max_rank=max_rank)
        hasher = hashlib.sha256(config_bytes)
        with (path / WEIGHTS_FILE).open("rb") as f:
            reader = _HashingReader(f, hasher)
            tensors = _read_header(reader, file_size=sizes[WEIGHTS_FILE], base=base)
            lora = _check_names(tensors, base=base, config=config)
            _check_pairs(lora)
            _check_shapes(lora, base=base, config=config)
            _check_values(reader, tensors)
    except _NotForThisBase as e:
        raise InvalidAdapterError(f"{e.message}. {base_mismatch(config_bytes, served_bases)}", code=e.code) from e
    return AdapterInfo(
        rank=config.rank,
        alpha=config.alpha,
        target_modules=sorted({leaf for _, leaf in config.ranks}),
        sha256=hasher.hexdigest(),
        size_bytes=len(config_bytes) + sizes[WEIGHTS_FILE],
    )


class _NotForThisBase(InvalidAdapterError):
    """The adapter does not fit the served base model's layers, modules or shapes (raised inside this module only:
    :func:`validate_adapter_dir` adds which base the adapter was made for and which Banyan serves)."""


def base_mismatch(config_bytes: bytes, served_bases: Sequence[str]) -> str:
    """Why a shape or module mismatch usually happens, in the user's terms: the base model the adapter's config
    names (``base_model_name_or_path``) and the one(s) served. Only shapes decide: a different name whose shapes
    fit is accepted (fine-tunes and renamed copies of a base keep its shapes)."""
    try:
        made_for = json.loads(config_bytes).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        made_for = None
    served = ", ".join(shown(b) for b in served_bases) or "its configured base model"
    said = (f"This adapter was made for base model {shown(made_for)} (base_model_name_or_path in {CONFIG_FILE})"
            if isinstance(made_for, str) and made_for else
            f"{CONFIG_FILE} does not say which base model this adapter was made for (no base_model_name_or_path)")
    return (f"{said}; Banyan serves {served}. Adapters are checked against the served base model's layers and "
            "tensor shapes (names alone are not compared): train or export the adapter on a served base model")


# -- 1. the files ----------------------------------------------------------------------------------


def _file_sizes(path: Path, *, max_bytes: int) -> dict[str, int]:
    entries = {entry.name: entry.lstat() for entry in path.iterdir()}
    entries = {name: st for name, st in entries.items()
               if side_file(name + "/" if stat.S_ISDIR(st.st_mode) else name) is None}
    check_file_set(entries)
    for name, st in entries.items():
        if not stat.S_ISREG(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise InvalidAdapterError(f"{shown(name)} is {kind}",
                                      code=AdapterErrorCode.UNEXPECTED_ADAPTER_FILE)
    total = sum(st.st_size for st in entries.values())
    if total > max_bytes:
        raise AdapterTooLargeError(f"the adapter's files total {total:,} bytes, over the "
                                   f"{max_bytes:,}-byte limit")
    return {name: st.st_size for name, st in entries.items()}


# -- 2. adapter_config.json ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Module:
    """One linear module of one decoder layer, named as PEFT and vLLM name it."""

    layer: int
    leaf: str
    name: str


@dataclass(frozen=True, slots=True)
class _LoraConfig:
    rank: int
    alpha: float
    ranks: Mapping[tuple[int, str], int]
    """(layer, leaf) -> LoRA rank, for every module the config targets."""


@dataclass(frozen=True, slots=True)
class _Feature:
    key: str
    refuses: Callable[[Any], bool]
    message: str  # may use {value}


def _truthy(value: Any) -> bool:
    return bool(value)


def _changes_base_weights(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return not (isinstance(value, str) and value.lower() in _INITS_WITHOUT_BASE_CHANGES)


_UNSUPPORTED_FEATURES = (
    _Feature("use_dora", _truthy, "DoRA adapters (use_dora) are not supported"),
    _Feature("modules_to_save", _truthy, "modules_to_save is not supported: only LoRA weights on the base "
             "model's linear layers can be served"),
    _Feature("bias", lambda v: v not in (None, "none"),
             "bias={value} is not supported; only adapters with bias='none' can be served"),
    _Feature("lora_bias", _truthy, "LoRA bias (lora_bias) is not supported"),
    _Feature("alora_invocation_tokens", _truthy, "Activated LoRA (alora_invocation_tokens) is not supported"),
    _Feature("layer_replication", _truthy, "layer_replication is not supported"),
    _Feature("use_bdlora", _truthy, "block-diagonal LoRA (use_bdlora) is not supported"),
    _Feature("use_qalora", _truthy, "QALoRA (use_qalora) is not supported"),
    _Feature("target_parameters", _truthy, "target_parameters is not supported; use target_modules"),
    _Feature("trainable_token_indices", _truthy,
             "trainable tokens (trainable_token_indices) are not supported"),
    _Feature("init_lora_weights", _changes_base_weights,
             "init_lora_weights={value} is not supported: PiSSA, OLoRA, CorDA and LoftQ adapters change the "
             "base model's weights; convert the adapter to a plain LoRA adapter first"),
)


def _read_config_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidAdapterError(f"{CONFIG_FILE} is over the {MAX_CONFIG_BYTES:,}-byte limit",
                                  code=AdapterErrorCode.INVALID_ADAPTER_CONFIG)
    return data


def _parse_config(data: bytes, *, base: BaseModelSpec, max_rank: int) -> _LoraConfig:
    config = _load_json_object(data, what=CONFIG_FILE, code=AdapterErrorCode.INVALID_ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise InvalidAdapterError(
            f"{CONFIG_FILE} has peft_type {shown(str(config.get('peft_type')))}; only LoRA adapters "
            "(peft_type 'LORA') are supported", code=AdapterErrorCode.UNSUPPORTED_ADAPTER_TYPE)
    rank = _check_rank(config.get("r"), what="r", max_rank=max_rank)
    alpha = _check_alpha(config.get("lora_alpha"), what="lora_alpha")
    modules = _base_modules(base)
    deadline = time.monotonic() + _PATTERN_SECONDS
    targets = _resolve_targets(config, modules=modules, base=base, deadline=deadline)
    _check_features(config)
    return _LoraConfig(rank=rank, alpha=alpha,
                       ranks=_module_ranks(config, targets=targets, rank=rank, max_rank=max_rank,
                                           deadline=deadline))


def _json(value: Any) -> str:
    """A config value as the user wrote it, cut short for a message."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _config_error(message: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"{CONFIG_FILE}: {message}", code=AdapterErrorCode.INVALID_ADAPTER_CONFIG)


def _check_rank(value: Any, *, what: str, max_rank: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _config_error(f"{what} must be a positive integer, got {_json(value)}")
    if value > max_rank:
        raise InvalidAdapterError(f"{CONFIG_FILE}: {what}={value} is above this server's maximum LoRA "
                                  f"rank {max_rank}", code=AdapterErrorCode.RANK_TOO_LARGE)
    return value


def _check_alpha(value: Any, *, what: str) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        raise _config_error(f"{what} must be a positive number, got {_json(value)}")
    return float(value)


def _check_features(config: Mapping[str, Any]) -> None:
    for feature in _UNSUPPORTED_FEATURES:
        value = config.get(feature.key)
        if value is not None and feature.refuses(value):
            raise InvalidAdapterError(f"{CONFIG_FILE}: " + feature.message.format(value=shown(str(value))),
                                      code=AdapterErrorCode.UNSUPPORTED_LORA_FEATURE)


def _base_modules(base: BaseModelSpec) -> list[_Module]:
    return [_Module(layer, leaf, f"model.layers.{layer}.{base.parents[leaf]}.{leaf}")
            for layer in range(base.num_layers) for leaf in sorted(base.modules)]


def _resolve_targets(config: Mapping[str, Any], *, modules: list[_Module], base: BaseModelSpec,
                     deadline: float) -> set[_Module]:
    """The modules ``target_modules`` selects, with PEFT's rules (list: name or dotted suffix,
    limited by ``layers_to_transform``; string: a regular expression over full names)."""
    raw = config.get("target_modules")
    layers = _layers_to_transform(config, base)
    if isinstance(raw, str) and (raw in base.modules or raw.lower() == "all-linear"):
        raw = [raw] if raw in base.modules else sorted(base.modules)
    if isinstance(raw, str):
        selected = _match_regex(raw, what="target_modules pattern", modules=modules, deadline=deadline)
        if not selected:
            raise _unknown_targets(f"target_modules pattern {shown(raw)} matches no module", base)
    elif isinstance(raw, list) and raw and all(isinstance(t, str) and t for t in raw):
        selected = _match_listed(raw, modules=modules, base=base, layers=layers)
    else:
        raise _config_error("target_modules must be a non-empty list of module names, "
                            f"got {_json(raw)}")
    selected -= _excluded(config.get("exclude_modules"), modules=modules, deadline=deadline)
    if not selected:
        raise _unknown_targets("target_modules selects no module once exclude_modules is applied", base)
    return selected


def _unknown_targets(message: str, base: BaseModelSpec) -> InvalidAdapterError:
    return _NotForThisBase(
        f"{CONFIG_FILE}: {message}; the base model's modules are {', '.join(sorted(base.modules))}",
        code=AdapterErrorCode.UNKNOWN_TARGET_MODULE)


def _suffix_index(modules: list[_Module]) -> dict[str, list[_Module]]:
    """Every dotted suffix of every module name ("q_proj", "self_attn.q_proj", ...) -> its modules."""
    index: dict[str, list[_Module]] = defaultdict(list)
    for module in modules:
        parts = module.name.split(".")
        for start in range(len(parts)):
            index[".".join(parts[start:])].append(module)
    return index


def _match_listed(targets: list[str], *, modules: list[_Module], base: BaseModelSpec,
                  layers: frozenset[int] | None) -> set[_Module]:
    index = _suffix_index(modules)
    unknown = [t for t in targets if t not in index]
    if unknown:
        raise _unknown_targets(f"target_modules names {shown_list(unknown)}, which the base model "
                               "does not have", base)
    # As in PEFT, a full module name is taken as is; layers_to_transform filters suffix matches.
    return {m for t in targets for m in index[t] if layers is None or m.layer in layers or t == m.name}


def _layers_to_transform(config: Mapping[str, Any], base: BaseModelSpec) -> frozenset[int] | None:
    raw = config.get("layers_to_transform")
    if raw is None or raw == []:
        return None
    layers = [raw] if isinstance(raw, int) else raw
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise _config_error(f"layers_to_transform must be a layer index or a list of them, "
                            f"got {_json(raw)}")
    outside = sorted({i for i in layers if not 0 <= i < base.num_layers})
    if outside:
        raise _NotForThisBase(f"{CONFIG_FILE}: layers_to_transform includes layer {outside[0]}, but the base model "
                              f"has {base.num_layers} layers (0-{base.num_layers - 1})",
                              code=AdapterErrorCode.INVALID_ADAPTER_CONFIG)
    pattern = config.get("layers_pattern")
    if pattern not in (None, "", [], "layers") and not (isinstance(pattern, list) and "layers" in pattern):
        raise _NotForThisBase(
            f"{CONFIG_FILE}: layers_pattern {shown(str(pattern))} does not match the base model's layers "
            "('layers')", code=AdapterErrorCode.UNSUPPORTED_LORA_FEATURE)
    return frozenset(layers)


def _excluded(raw: Any, *, modules: list[_Module], deadline: float) -> set[_Module]:
    if not raw:
        return set()
    if isinstance(raw, str):
        return _match_regex(raw, what="exclude_modules pattern", modules=modules, deadline=deadline)
    if isinstance(raw, list) and all(isinstance(e, str) for e in raw):
        index = _suffix_index(modules)
        return {m for e in raw for m in index.get(e, ())}
    raise _config_error(f"exclude_modules must be a list of module names or a pattern, got {_json(raw)}")


def _match_regex(pattern: str, *, what: str, modules: list[_Module], deadline: float) -> set[_Module]:
    regex = _compile_pattern(pattern, what=what, template="{}")
    selected = set()
    for module in modules:
        _check_deadline(deadline, what=what, pattern=pattern)
        if regex.fullmatch(module.name):
            selected.add(module)
    return selected


def _check_deadline(deadline: float, *, what: str, pattern: str) -> None:
    """The structural limits bound one match; this bounds them all (a pattern per module per layer)."""
    if time.monotonic() > deadline:
        raise _too_complex(what, pattern)


def _too_complex(what: str, pattern: str) -> InvalidAdapterError:
    return _config_error(f"{what} {shown(pattern)} is too complex to check; list module names instead")


def _compile_pattern(pattern: str, *, what: str, template: str) -> re.Pattern[str]:
    """Compile a user's regular expression, refusing the shapes that can backtrack for ever (the stdlib
    ``re`` has no timeout): repeated groups, back-references, and more than a few quantifiers, groups
    or alternatives. Crude on purpose: a pattern refused here can always be written as a list."""
    if (len(pattern) > _MAX_PATTERN_CHARS
            or len(_QUANTIFIER.findall(pattern)) > _MAX_PATTERN_REPEATS
            or pattern.count("(") > _MAX_PATTERN_GROUPS or pattern.count("|") > _MAX_PATTERN_BRANCHES
            or _NESTED_OR_BACKREFERENCE.search(pattern)):
        raise _too_complex(what, pattern)
    try:
        return re.compile(template.format(pattern))
    except re.error as e:
        raise _config_error(f"{what} {shown(pattern)} is not a valid regular expression ({e.msg})") from e


def _module_ranks(config: Mapping[str, Any], *, targets: set[_Module], rank: int, max_rank: int,
                  deadline: float) -> dict[tuple[int, str], int]:
    """The rank of each targeted module: the first ``rank_pattern`` key matching it (PEFT's rule), else r."""
    rank_pattern = _pattern_dict(config, "rank_pattern")
    for key, value in _pattern_dict(config, "alpha_pattern").items():
        _check_alpha(value, what=f"alpha_pattern[{shown(key)}]")
    patterns = [(key, _compile_pattern(key, what="rank_pattern key", template=r"(.*\.)?({})$"),
                 _check_rank(value, what=f"rank_pattern[{shown(key)}]", max_rank=max_rank))
                for key, value in rank_pattern.items()]
    ranks: dict[tuple[int, str], int] = {}
    for module in targets:
        ranks[(module.layer, module.leaf)] = rank
        for key, regex, key_rank in patterns:
            _check_deadline(deadline, what="rank_pattern key", pattern=key)
            if regex.match(module.name):
                ranks[(module.layer, module.leaf)] = key_rank
                break
    return ranks


def _pattern_dict(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    raw = config.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _config_error(f"{key} must be an object, got {_json(raw)}")
    if len(raw) > _MAX_PATTERN_ENTRIES:
        raise _config_error(f"{key} has {len(raw):,} entries; the limit is {_MAX_PATTERN_ENTRIES:,}")
    return raw


def _load_json_object(data: bytes, *, what: str, code: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                           parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise InvalidAdapterError(f"{what} is not valid UTF-8 (byte {e.start})", code=code) from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise InvalidAdapterError(f"{what} is not valid JSON: {e}", code=code) from e
    if not isinstance(value, dict):
        raise InvalidAdapterError(f"{what} does not hold a JSON object", code=code)
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {shown(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON value")


# -- 3. the safetensors header ---------------------------------------------------------------------


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


class _HashingReader:
    """Reads the weights file front to back, exactly, feeding every byte to the hash."""

    def __init__(self, f: BinaryIO, hasher: _Hasher) -> None:
        self._f = f
        self._hasher = hasher

    def read_exact(self, size: int) -> bytes:
        data = self._f.read(size)
        if len(data) != size:
            raise _weights_error("the file is truncated")
        self._hasher.update(data)
        return data


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _weights_error(message: str, code: str = AdapterErrorCode.INVALID_SAFETENSORS) -> InvalidAdapterError:
    return InvalidAdapterError(f"{WEIGHTS_FILE}: {message}", code=code)


def max_header_bytes(base: BaseModelSpec) -> int:
    """The largest safetensors header an adapter for ``base`` can need: an entry per LoRA tensor the base
    model allows (the longest name possible, with room to spare) and some metadata. Anything larger is
    refused before it is read: parsing a header costs far more memory than its size."""
    longest = max(len(f"base_model.model.model.layers.{base.num_layers - 1}.{base.parents[leaf]}.{leaf}"
                      ".lora_A.weight") for leaf in base.modules)
    return _HEADER_METADATA_BYTES + base.max_lora_tensors * (longest + _HEADER_ENTRY_BYTES)


def _read_header(reader: _HashingReader, *, file_size: int, base: BaseModelSpec) -> list[_Tensor]:
    """Parse and check the header; return the tensors in file order, the reader at the first one."""
    if file_size < 8:
        raise _weights_error(f"the file is {file_size} bytes, too short to be a safetensors file")
    header_len = int.from_bytes(reader.read_exact(8), "little")
    if header_len > file_size - 8:
        raise _weights_error(f"the header length field says {header_len:,} bytes, but the file holds "
                             f"{file_size - 8:,} bytes after it: the file is truncated or not safetensors")
    max_header = max_header_bytes(base)
    if header_len > max_header:
        raise _weights_error(f"the header is {header_len:,} bytes; an adapter for this base model holds at most "
                             f"{base.max_lora_tensors} LoRA tensors, whose header fits in {max_header:,} bytes")
    header = _load_json_object(reader.read_exact(header_len), what=f"{WEIGHTS_FILE}: the header",
                               code=AdapterErrorCode.INVALID_SAFETENSORS)
    _check_metadata(header.pop("__metadata__", None))
    tensors = sorted((_tensor_entry(name, info) for name, info in header.items()),
                     key=lambda t: (t.begin, t.end))
    _check_layout(tensors, data_bytes=file_size - 8 - header_len)
    return tensors


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _weights_error("__metadata__ must map strings to strings")


def _tensor_entry(name: str, info: Any) -> _Tensor:
    if not isinstance(info, dict):
        raise _weights_error(f"the header entry for tensor {shown(name)} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(dtype, str) and _is_int_list(shape) and _is_int_list(offsets) and len(offsets) == 2):
        raise _weights_error(f"tensor {shown(name)} needs a dtype, a shape (list of sizes) and data_offsets "
                             "(two byte offsets)")
    if dtype not in _NUMPY_DTYPES:
        raise _weights_error(f"tensor {shown(name)} has dtype {shown(dtype)}; only "
                             f"{', '.join(_NUMPY_DTYPES)} are accepted", AdapterErrorCode.UNSUPPORTED_DTYPE)
    begin, end = offsets
    needed = math.prod(shape) * _NUMPY_DTYPES[dtype].itemsize
    if end - begin != needed:
        raise _weights_error(f"tensor {shown(name)} of shape {shape} and dtype {dtype} needs {needed:,} "
                             f"bytes, but its data_offsets [{begin}, {end}] span {end - begin:,}")
    return _Tensor(name, dtype, tuple(shape), begin, end)


def _is_int_list(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _check_layout(tensors: list[_Tensor], *, data_bytes: int) -> None:
    """Tensors must tile the data area exactly, as the safetensors library itself requires."""
    expected = 0
    previous = "the start of the data"
    for t in tensors:
        if t.end > data_bytes:
            raise _weights_error(f"tensor {shown(t.name)} ends at data byte {t.end:,}, but the file holds "
                                 f"only {data_bytes:,} bytes of tensor data: the file is truncated")
        if t.begin < expected:
            raise _weights_error(f"tensor {shown(t.name)} overlaps the data of {previous}")
        if t.begin > expected:
            raise _weights_error(f"there are {t.begin - expected:,} unused bytes before tensor "
                                 f"{shown(t.name)}")
        expected, previous = t.end, f"tensor {shown(t.name)}"
    if expected != data_bytes:
        raise _weights_error(f"there are {data_bytes - expected:,} bytes after the last tensor")


# -- 4, 5. tensor names and shapes -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LoraTensor:
    tensor: _Tensor
    layer: int
    leaf: str
    kind: str  # "A" or "B"


def _check_names(tensors: list[_Tensor], *, base: BaseModelSpec, config: _LoraConfig) -> list[_LoraTensor]:
    if not tensors:
        raise _weights_error("the file holds no tensors", AdapterErrorCode.MISSING_TENSOR)
    return [_lora_tensor(t, base=base, config=config) for t in tensors]


def _lora_tensor(t: _Tensor, *, base: BaseModelSpec, config: _LoraConfig) -> _LoraTensor:
    match = _TENSOR_NAME.fullmatch(t.name)
    if match is None:
        raise _tensor_error(t, "is not a LoRA weight of a decoder layer; expected names like "
                               f"{_EXAMPLE_NAME}")
    layer, parent, leaf, kind = int(match[1]), match[2], match[3], match[4]
    if layer >= base.num_layers:
        raise _tensor_error(t, f"is for layer {layer}, but the base model has {base.num_layers} layers "
                               f"(0-{base.num_layers - 1})", of_base=True)
    if leaf not in base.modules:
        raise _tensor_error(t, f"is for module {shown(leaf)}, which the base model does not have (its "
                               f"modules are {', '.join(sorted(base.modules))})", of_base=True)
    if parent != base.parents[leaf]:
        raise _tensor_error(t, f"puts {leaf} under {shown(parent)}, but the base model has it under "
                               f"{shown(base.parents[leaf])}", of_base=True)
    if (layer, leaf) not in config.ranks:
        raise _tensor_error(t, f"is for layer {layer} {leaf}, which {CONFIG_FILE}'s target_modules does not "
                               "select")
    return _LoraTensor(t, layer, leaf, kind)


def _tensor_error(t: _Tensor, message: str, *, code: str = AdapterErrorCode.UNEXPECTED_TENSOR,
                  of_base: bool = False) -> InvalidAdapterError:
    """``of_base``: the tensor does not fit the base model (rather than being malformed)."""
    if of_base:
        return _NotForThisBase(f"{WEIGHTS_FILE}: tensor {shown(t.name)} {message}", code=code)
    return _weights_error(f"tensor {shown(t.name)} {message}", code)


def _check_pairs(lora: list[_LoraTensor]) -> None:
    kinds: dict[tuple[int, str], set[str]] = defaultdict(set)
    for t in lora:
        kinds[(t.layer, t.leaf)].add(t.kind)
    for (layer, leaf), have in sorted(kinds.items()):
        if have != {"A", "B"}:
            missing = "B" if "A" in have else "A"
            raise _weights_error(f"layer {layer} {leaf} has lora_{have.pop()} but no lora_{missing} tensor",
                                 AdapterErrorCode.MISSING_TENSOR)


def _check_shapes(lora: list[_LoraTensor], *, base: BaseModelSpec, config: _LoraConfig) -> None:
    for t in lora:
        rank, shape = config.ranks[(t.layer, t.leaf)], base.modules[t.leaf]
        if t.kind == "A":
            expected, why = (rank, shape.in_features), f"rank {rank} x in_features {shape.in_features}"
        else:
            expected, why = (shape.out_features, rank), f"out_features {shape.out_features} x rank {rank}"
        if t.tensor.shape != expected:
            raise _tensor_error(t.tensor, f"has shape {list(t.tensor.shape)}, expected {list(expected)} "
                                          f"(lora_{t.kind} of {t.leaf}: {why})",
                                code=AdapterErrorCode.TENSOR_SHAPE_MISMATCH,
                                of_base=_rank_fits(t, rank))


def _rank_fits(t: _LoraTensor, rank: int) -> bool:
    """Whether a tensor of the wrong shape has the right rank: then the base model's side is what does not fit."""
    shape = t.tensor.shape
    return len(shape) == 2 and shape[0 if t.kind == "A" else 1] == rank


# -- 6. values -------------------------------------------------------------------------------------


def _check_values(reader: _HashingReader, tensors: list[_Tensor]) -> None:
    """Read every tensor in file order, in chunks, and refuse NaN and infinities."""
    for t in tensors:
        remaining = t.end - t.begin
        while remaining:
            chunk = reader.read_exact(min(_CHUNK_BYTES, remaining))
            remaining -= len(chunk)
            values = _as_float(chunk, t.dtype)
            if not np.isfinite(values).all():
                what = "NaN" if np.isnan(values).any() else "infinite"
                raise _tensor_error(t, f"contains {what} values", code=AdapterErrorCode.NON_FINITE_WEIGHTS)


def _as_float(chunk: bytes, dtype: str) -> npt.NDArray[np.floating[Any]]:
    raw = np.frombuffer(chunk, dtype=_NUMPY_DTYPES[dtype])
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw
