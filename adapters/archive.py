"""Unpack an uploaded adapter archive (``.tar.gz``, ``.tgz``, ``.zip``) without trusting it.

Members are streamed out in chunks into a fresh folder under ``dest``; only regular files and
folders are accepted, every path must stay inside that folder, and sizes are enforced on the bytes
actually written, not on what the archive declares. On any failure nothing is left in ``dest``.

Known side files of a PEFT or trainer output folder (:data:`adapters.validation.SIDE_FILES`) are skipped
unread, never written, and reported; they still count towards the member and decompression bounds.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from adapters.errors import AdapterErrorCode, AdapterTooLargeError, InvalidAdapterError, shown
from adapters.layout import ADAPTER_FILES
from adapters.validation import side_file

_CHUNK_BYTES = 64 * 1024
_TAR_OVERHEAD_BYTES = 1024 * 1024
"""Room for tar headers and padding on top of the content limit when bounding decompression."""
_CORRUPT_ERRORS = (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError)

_FILE = "file"
_FOLDER = "folder"


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    kind: str
    """``_FILE``, ``_FOLDER``, or what else the member is ("a symlink"), which is refused."""
    size: int
    """The size the archive declares; the bytes actually read are counted separately."""
    open: Callable[[], IO[bytes]]


_Reader = Callable[[BinaryIO, int, int], Generator[_Entry, None, None]]
"""(the archive, a bound on the bytes it may decompress to, the most members it may hold) -> its members."""


@dataclass(frozen=True, slots=True)
class _Format:
    label: str
    magic: tuple[bytes, ...]
    entries: _Reader
    """Yields the members in order; each must be fully handled before asking for the next."""


@dataclass(slots=True)
class _Budget:
    max_member_bytes: int
    max_total_bytes: int
    total: int = 0


@dataclass(frozen=True, slots=True)
class Extracted:
    folder: Path
    """The folder that holds the files: the archive's root, or its single top folder."""
    ignored: list[str]
    """The side files skipped, relative to ``folder`` as :func:`adapters.validation.side_file` reports them."""


def extract_archive(archive: Path, dest: Path, *, filename: str, max_member_bytes: int,
                    max_total_bytes: int, max_members: int = 256) -> Extracted:
    """Unpack ``archive`` (the upload called ``filename``) under ``dest``; known side files are skipped.

    The files go into a new private folder inside ``dest`` (``dest`` may already hold other things,
    such as the archive itself). Raises ``InvalidAdapterError`` or ``AdapterTooLargeError``, after
    removing everything it wrote.
    """
    fmt = _format_for(filename)
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="extract-", dir=dest))
    skipped: list[tuple[str, ...]] = []
    try:
        with archive.open("rb") as raw:
            _check_magic(raw, fmt=fmt, filename=filename)
            files = _extract_all(raw, root, fmt=fmt, filename=filename, max_members=max_members,
                                 budget=_Budget(max_member_bytes, max_total_bytes), skipped=skipped)
        files = _drop_side_folders(root, files, skipped=skipped)
        folder = _content_folder(root, files, filename=filename)
        return Extracted(folder=folder, ignored=_reported(skipped, top=None if folder == root else folder.name))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _is_side_file(parts: tuple[str, ...], *, folder: bool) -> bool:
    """Whether a member is a side file, relative to the archive's root or to a top folder holding everything
    (not known while streaming): a side file under either, unless it is an adapter file under the other."""
    relatives = [parts, parts[1:]] if len(parts) > 1 else [parts]
    if any(len(rel) == 1 and rel[0] in ADAPTER_FILES and not folder for rel in relatives):
        return False
    return any(side_file("/".join(rel) + ("/" if folder else "")) is not None for rel in relatives)


def _drop_side_folders(root: Path, files: list[tuple[str, ...]], *,
                       skipped: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """With files at the archive's root, the root is the adapter's folder: files in its side folders (a trainer's
    ``checkpoint-*/`` holds adapter files too, so they were written) are removed and reported."""
    if not any(len(parts) == 1 for parts in files):
        return files
    kept = []
    for parts in files:
        reported = side_file("/".join(parts)) if len(parts) > 1 else None
        if reported is None:
            kept.append(parts)
            continue
        shutil.rmtree(root / reported, ignore_errors=True)
        skipped.append(parts)
    return kept


def _reported(skipped: list[tuple[str, ...]], *, top: str | None) -> list[str]:
    reported = set()
    for parts in skipped:
        rel = parts[1:] if top is not None and len(parts) > 1 and parts[0] == top else parts
        path = "/".join(rel)
        reported.add(side_file(path) or side_file(path + "/") or path)
    return sorted(reported)


def _format_for(filename: str) -> _Format:
    lowered = filename.lower()
    for suffix in sorted(_FORMATS, key=len, reverse=True):
        if lowered.endswith(suffix):
            return _FORMATS[suffix]
    accepted = ", ".join(_FORMATS)
    raise InvalidAdapterError(f"unsupported archive {shown(filename)}: upload one of {accepted}",
                              code=AdapterErrorCode.UNSUPPORTED_ARCHIVE_FORMAT)


def _check_magic(raw: BinaryIO, *, fmt: _Format, filename: str) -> None:
    head = raw.read(max(len(m) for m in fmt.magic))
    raw.seek(0)
    if not any(head.startswith(m) for m in fmt.magic):
        raise InvalidAdapterError(f"{shown(filename)} is named like a {fmt.label} archive but its content "
                                  f"is not one", code=AdapterErrorCode.INVALID_ARCHIVE)


def _extract_all(raw: BinaryIO, root: Path, *, fmt: _Format, filename: str, max_members: int,
                 budget: _Budget, skipped: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Write every member under ``root`` but side files (appended to ``skipped``); return the relative parts of
    the files written."""
    files: list[tuple[str, ...]] = []
    current = ""
    try:
        limit = budget.max_total_bytes + _TAR_OVERHEAD_BYTES
        with contextlib.closing(fmt.entries(raw, limit, max_members)) as entries:
            for count, entry in enumerate(entries, start=1):
                current = entry.name
                if count > max_members:
                    raise InvalidAdapterError(
                        f"{shown(filename)} holds more than {max_members} members; an adapter needs only "
                        "a few files", code=AdapterErrorCode.INVALID_ARCHIVE)
                written = _extract_entry(entry, root, budget=budget, skipped=skipped)
                if written is not None:
                    files.append(written)
    except _TooManyMembers as e:
        raise InvalidAdapterError(f"{shown(filename)} holds {e.declared} {max_members} members; an adapter needs "
                                  "only a few files", code=AdapterErrorCode.INVALID_ARCHIVE) from e
    except _CORRUPT_ERRORS as e:
        where = f" (near member {shown(current)})" if current else ""
        raise InvalidAdapterError(f"{shown(filename)} is not a valid {fmt.label} archive: it is corrupt or "
                                  f"truncated{where}", code=AdapterErrorCode.INVALID_ARCHIVE) from e
    return files


def _extract_entry(entry: _Entry, root: Path, *, budget: _Budget,
                   skipped: list[tuple[str, ...]]) -> tuple[str, ...] | None:
    if entry.kind not in (_FILE, _FOLDER):
        raise InvalidAdapterError(f"archive member {shown(entry.name)} is {entry.kind}; only regular files "
                                  "and folders are accepted", code=AdapterErrorCode.UNSAFE_ARCHIVE_MEMBER)
    parts = _safe_parts(entry.name)
    if not parts or _is_os_clutter(parts):
        return None
    if _is_side_file(parts, folder=entry.kind == _FOLDER):
        skipped.append(parts)
        return None
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise _unsafe(entry.name, "resolves outside the archive")
    if entry.kind == _FOLDER:
        _check_depth(entry.name, parts, max_depth=1)
        _make_folder(target, name=entry.name)
        return None
    _check_depth(entry.name, parts, max_depth=2)
    _make_folder(target.parent, name=entry.name)
    _write_member(entry, target, budget=budget)
    return parts


def _safe_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, refusing anything that could land outside the folder."""
    if not name.isprintable():
        raise _unsafe(name, "has control characters or invalid text in its name")
    if "\\" in name:
        raise _unsafe(name, "has a backslash in its name")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":"):
        raise _unsafe(name, "has an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _unsafe(name, "has a '..' component")
    return parts


def _unsafe(name: str, why: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"archive member {shown(name)} {why}",
                               code=AdapterErrorCode.UNSAFE_ARCHIVE_MEMBER)


def _is_os_clutter(parts: tuple[str, ...]) -> bool:
    """Finder and macOS tar add resource-fork files (``__MACOSX/``, ``._x``, ``.DS_Store``): skipped."""
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store" or parts[-1].startswith("._")


def _check_depth(name: str, parts: tuple[str, ...], *, max_depth: int) -> None:
    if len(parts) > max_depth:
        raise InvalidAdapterError(
            f"archive member {shown(name)} is nested too deep: adapter files must sit at the archive root "
            "or directly inside one top folder", code=AdapterErrorCode.INVALID_ARCHIVE)


def _make_folder(path: Path, *, name: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise _clash(name) from e


def _clash(name: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"archive member {shown(name)} clashes with another member of the same name",
                               code=AdapterErrorCode.INVALID_ARCHIVE)


def _write_member(entry: _Entry, target: Path, *, budget: _Budget) -> None:
    if entry.size > budget.max_member_bytes:
        raise _member_too_large(entry.name, budget)
    try:
        out = target.open("xb")
    except (FileExistsError, IsADirectoryError) as e:
        raise _clash(entry.name) from e
    written = 0
    with out, entry.open() as src:
        while chunk := src.read(_CHUNK_BYTES):
            written += len(chunk)
            budget.total += len(chunk)
            if written > budget.max_member_bytes:
                raise _member_too_large(entry.name, budget)
            if budget.total > budget.max_total_bytes:
                raise AdapterTooLargeError(
                    f"the archive's contents are over the {budget.max_total_bytes:,}-byte limit in total")
            out.write(chunk)
    if written != entry.size:
        raise InvalidAdapterError(f"archive member {shown(entry.name)} is truncated: it declares "
                                  f"{entry.size:,} bytes but holds {written:,}",
                                  code=AdapterErrorCode.INVALID_ARCHIVE)


def _member_too_large(name: str, budget: _Budget) -> AdapterTooLargeError:
    return AdapterTooLargeError(
        f"archive member {shown(name)} is over the {budget.max_member_bytes:,}-byte limit for one file")


def _content_folder(root: Path, files: list[tuple[str, ...]], *, filename: str) -> Path:
    if not files:
        raise InvalidAdapterError(f"{shown(filename)} holds no files", code=AdapterErrorCode.INVALID_ARCHIVE)
    tops = sorted({parts[0] for parts in files if len(parts) == 2})
    at_root = sorted(parts[0] for parts in files if len(parts) == 1)
    if tops and at_root:
        raise InvalidAdapterError(
            f"{shown(filename)} mixes files at its root ({', '.join(at_root)}) with files in folder "
            f"{shown(tops[0])}; put them all at the root or all in one folder",
            code=AdapterErrorCode.INVALID_ARCHIVE)
    if len(tops) > 1:
        raise InvalidAdapterError(
            f"{shown(filename)} has files in more than one top folder ({', '.join(tops)}); put them all "
            "in one folder", code=AdapterErrorCode.INVALID_ARCHIVE)
    return root / tops[0] if tops else root


# -- formats ---------------------------------------------------------------------------------------

_TAR_REFUSED_KINDS = {
    tarfile.SYMTYPE: "a symlink",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a device file",
    tarfile.BLKTYPE: "a device file",
    tarfile.FIFOTYPE: "a FIFO",
}
_ZIP_REFUSED_KINDS = {
    stat.S_IFLNK: "a symlink",
    stat.S_IFCHR: "a device file",
    stat.S_IFBLK: "a device file",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _BoundedReader:
    """Raises once more than ``limit`` bytes were read through it: bounds gzip output, including tar
    headers (a pax header is read into memory whole, so it must not decompress without bound)."""

    def __init__(self, inner: _Readable, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        want = self._limit + 1 - self._read if size < 0 else min(size, self._limit + 1 - self._read)
        data = self._inner.read(want)
        self._read += len(data)
        if self._read > self._limit:
            raise AdapterTooLargeError(f"the archive decompresses to more than {self._limit:,} bytes")
        return data


def _tar_entries(raw: BinaryIO, limit: int, max_members: int) -> Generator[_Entry, None, None]:
    del max_members  # tar is read as a stream: members are counted as they come
    with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        stream = _BoundedReader(gz, limit)
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                yield _Entry(member.name, _tar_kind(member), member.size, _tar_opener(tar, member))
        # tar stops at its end marker; read on so gzip checks its CRC (tar itself checksums only headers)
        while stream.read(_CHUNK_BYTES):
            pass


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return _FOLDER
    if member.issparse():
        return "a sparse file"
    if member.isreg():
        return _FILE
    return _TAR_REFUSED_KINDS.get(member.type, "an unsupported kind of member")


def _tar_opener(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def _open() -> IO[bytes]:
        src = tar.extractfile(member)
        if src is None:
            raise InvalidAdapterError(f"archive member {shown(member.name)} has no content",
                                      code=AdapterErrorCode.INVALID_ARCHIVE)
        return src

    return _open


def _zip_entries(raw: BinaryIO, limit: int, max_members: int) -> Generator[_Entry, None, None]:
    del limit  # zipfile bounds each member's output by its declared size; we count what is written
    _check_zip_directory(raw, max_members=max_members)
    with zipfile.ZipFile(raw) as zf:
        for info in zf.infolist():
            yield _Entry(info.filename, _zip_kind(info), info.file_size, _zip_opener(zf, info))


class _TooManyMembers(Exception):
    def __init__(self, declared: str) -> None:
        super().__init__(declared)
        self.declared = declared


_ZIP_END = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_ZIP_CENTRAL_ENTRY_BYTES = 46 + 1024
"""One central directory entry: its fixed part, and its name, extra field and comment (generously)."""


def _check_zip_directory(raw: BinaryIO, *, max_members: int) -> None:
    """Refuse a zip whose end records declare more members, or a bigger central directory, than ``max_members``
    can need, before :mod:`zipfile` reads that directory whole into memory (an object per entry). The end
    records are found the way :mod:`zipfile` finds them, so both read the same numbers."""
    entries, directory_bytes = _zip_directory(raw)
    if entries > max_members:
        raise _TooManyMembers(f"{entries:,} members; the limit is")
    if directory_bytes > max_members * _ZIP_CENTRAL_ENTRY_BYTES:
        raise _TooManyMembers(f"a {directory_bytes:,}-byte central directory, too big for the limit of")


def _zip_directory(raw: BinaryIO) -> tuple[int, int]:
    """(total entries, central directory bytes) from the zip's end records (zip64 included)."""
    size = raw.seek(0, os.SEEK_END)
    start = max(size - _ZIP_END.size - 0xFFFF, 0)  # the record, then a comment of up to 64 KiB
    raw.seek(start)
    tail = raw.read()
    raw.seek(0)
    at = len(tail) - _ZIP_END.size
    if not (at >= 0 and tail[at:at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _ZIP_END.size:
        raise zipfile.BadZipFile("no end of central directory record")
    fields = _ZIP_END.unpack_from(tail, at)
    entries, directory_bytes = fields[4], fields[5]
    end_at = start + at
    if end_at >= _ZIP64_LOCATOR.size + _ZIP64_END.size:
        raw.seek(end_at - _ZIP64_LOCATOR.size - _ZIP64_END.size)
        record, locator = raw.read(_ZIP64_END.size), raw.read(_ZIP64_LOCATOR.size)
        raw.seek(0)
        if locator[:4] == b"PK\x06\x07" and record[:4] == b"PK\x06\x06":
            zip64 = _ZIP64_END.unpack(record)
            entries, directory_bytes = zip64[7], zip64[8]
    return entries, directory_bytes


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.flag_bits & 0x1:
        return "an encrypted file"
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type in _ZIP_REFUSED_KINDS:
        return _ZIP_REFUSED_KINDS[file_type]
    return _FOLDER if info.is_dir() else _FILE


def _zip_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    def _open() -> IO[bytes]:
        try:
            return zf.open(info)
        except NotImplementedError as e:  # a compression method zipfile cannot read
            raise InvalidAdapterError(f"archive member {shown(info.filename)} uses an unsupported "
                                      "compression method", code=AdapterErrorCode.INVALID_ARCHIVE) from e

    return _open


_GZIP_MAGIC = (b"\x1f\x8b",)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_FORMATS: dict[str, _Format] = {
    ".tar.gz": _Format("tar.gz", _GZIP_MAGIC, _tar_entries),
    ".tgz": _Format("tar.gz", _GZIP_MAGIC, _tar_entries),
    ".zip": _Format("zip", _ZIP_MAGIC, _zip_entries),
}
