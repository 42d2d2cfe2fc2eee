from __future__ import annotations

import io
import stat
import struct
import tarfile
import tracemalloc
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from adapters.archive import Extracted, extract_archive
from adapters.basemodel import BaseModelSpec
from adapters.errors import AdapterError, AdapterTooLargeError, InvalidAdapterError
from adapters.validation import validate_adapter_dir

FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\0" * 1000}
LIMITS: dict[str, int] = {"max_member_bytes": 1024 * 1024, "max_total_bytes": 2 * 1024 * 1024}
MiB = 1024 * 1024


# -- helpers ----------------------------------------------------------------------------------------


def tar_gz(path: Path, members: Sequence[tuple[tarfile.TarInfo, bytes | None]], **pax: str) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT, pax_headers=pax or None) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def tar_special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def zip_archive(path: Path, members: Sequence[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # duplicate names are written on purpose
        for name, data in members:
            zf.writestr(name, data)
    return path


def adapter_members(folder: str = "") -> list[tuple[str, bytes]]:
    return [(folder + name, data) for name, data in FILES.items()]


def refusal(archive: Path, dest: Path, *, filename: str, code: str,
            error: type[AdapterError] = InvalidAdapterError, **limits: int) -> str:
    """Extract, expecting a refusal with ``code``; check nothing was left behind and no path leaked."""
    with pytest.raises(error) as caught:
        extract_archive(archive, dest, filename=filename, **(LIMITS | limits))
    assert caught.value.code == code, caught.value.message
    assert not dest.exists() or list(dest.iterdir()) == []
    assert str(dest.parent) not in caught.value.message
    return caught.value.message


def assert_extracted(extracted: Extracted, dest: Path, *, ignored: tuple[str, ...] = ()) -> None:
    assert extracted.folder.is_relative_to(dest)
    assert {p.name: p.read_bytes() for p in extracted.folder.iterdir()} == FILES
    assert extracted.ignored == sorted(ignored)


# -- good archives ----------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["", "my-adapter/", "./"])
@pytest.mark.parametrize("filename", ["up.tar.gz", "UP.TGZ"])
def test_tar_gz_at_the_root_or_under_one_folder(folder: str, filename: str, tmp_path: Path) -> None:
    members = [tar_file(name, data) for name, data in adapter_members(folder)]
    archive = tar_gz(tmp_path / "upload", members)
    extracted = extract_archive(archive, tmp_path / "out", filename=filename, **LIMITS)
    assert_extracted(extracted, tmp_path / "out")


def test_tar_gz_with_folder_entries(tmp_path: Path) -> None:
    top = tarfile.TarInfo("my-adapter")
    top.type = tarfile.DIRTYPE
    files = [tar_file(n, d) for n, d in adapter_members("my-adapter/")]
    archive = tar_gz(tmp_path / "upload", [(top, None), *files])
    extracted = extract_archive(archive, tmp_path / "out", filename="a.tar.gz", **LIMITS)
    assert extracted.folder.name == "my-adapter"
    assert_extracted(extracted, tmp_path / "out")


@pytest.mark.parametrize("folder", ["", "my-adapter/"])
def test_zip_at_the_root_or_under_one_folder(folder: str, tmp_path: Path) -> None:
    folder_entry = [(folder, b"")] if folder else []
    archive = zip_archive(tmp_path / "upload", [*folder_entry, *adapter_members(folder)])
    assert_extracted(extract_archive(archive, tmp_path / "out", filename="a.zip", **LIMITS), tmp_path / "out")


def test_macos_clutter_is_skipped(tmp_path: Path) -> None:
    clutter = [("__MACOSX/my-adapter/._adapter_config.json", b"x"), ("my-adapter/.DS_Store", b"x"),
               ("my-adapter/._adapter_model.safetensors", b"x")]
    archive = zip_archive(tmp_path / "upload", [*adapter_members("my-adapter/"), *clutter])
    assert_extracted(extract_archive(archive, tmp_path / "out", filename="a.zip", **LIMITS), tmp_path / "out")


def test_dest_may_already_hold_the_upload(tmp_path: Path) -> None:
    archive = zip_archive(tmp_path / "upload.zip", adapter_members())
    assert_extracted(extract_archive(archive, tmp_path, filename="a.zip", **LIMITS), tmp_path)
    assert archive.exists()


def test_a_real_adapter_survives_the_round_trip(peft_adapter: Path, demo_spec: BaseModelSpec,
                                                tmp_path: Path) -> None:
    archive = tmp_path / "upload"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(peft_adapter, arcname="my-adapter")
    folder = extract_archive(archive, tmp_path / "out", filename="my-adapter.tar.gz", **LIMITS).folder
    info = validate_adapter_dir(folder, base=demo_spec, max_rank=16, max_bytes=MiB)
    assert info.rank == 8


# -- PEFT and trainer output folders as they are -----------------------------------------------------

SIDE = [("README.md", b"# card"), ("tokenizer.json", b"{}"), ("training_args.bin", b"\x80\x04K\x01."),
        (".gitattributes", b"*"), ("checkpoint-5/optimizer.pt", b"\x80\x04K\x01."),
        ("checkpoint-5/adapter_config.json", b"{}"), ("checkpoint-5/adapter_model.safetensors", b"old")]
SIDE_REPORTED = (".gitattributes", "README.md", "checkpoint-5/", "tokenizer.json", "training_args.bin")


@pytest.mark.parametrize("folder", ["", "output/"])
@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_side_files_are_skipped_unread_and_reported(folder: str, fmt: str, tmp_path: Path) -> None:
    members = [*adapter_members(folder), *((folder + n, d) for n, d in SIDE)]
    archive = (zip_archive(tmp_path / "upload", members) if fmt == "zip"
               else tar_gz(tmp_path / "upload", [tar_file(n, d) for n, d in members]))
    extracted = extract_archive(archive, tmp_path / "out", filename=f"a.{fmt}", **LIMITS)
    assert_extracted(extracted, tmp_path / "out", ignored=SIDE_REPORTED)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == sorted(FILES)


def test_an_archive_of_one_checkpoint_folder_is_that_adapter(tmp_path: Path) -> None:
    members = [*adapter_members("checkpoint-5/"), ("checkpoint-5/optimizer.pt", b"x"), ("README.md", b"#")]
    extracted = extract_archive(zip_archive(tmp_path / "upload", members), tmp_path / "out", filename="a.zip",
                                **LIMITS)
    assert_extracted(extracted, tmp_path / "out", ignored=("README.md", "optimizer.pt"))


def test_pickle_weights_in_an_archive_are_kept_for_the_file_check_to_refuse(tmp_path: Path) -> None:
    members = [("adapter_config.json", b"{}"), ("adapter_model.bin", b"\x80\x04K\x01."), ("README.md", b"#")]
    extracted = extract_archive(zip_archive(tmp_path / "upload", members), tmp_path / "out", filename="a.zip",
                                **LIMITS)
    assert sorted(p.name for p in extracted.folder.iterdir()) == ["adapter_config.json", "adapter_model.bin"]


# -- formats ----------------------------------------------------------------------------------------


def test_an_unsupported_format_lists_the_accepted_ones(tmp_path: Path) -> None:
    archive = zip_archive(tmp_path / "upload", adapter_members())
    message = refusal(archive, tmp_path / "out", filename="adapter.rar", code="unsupported_archive_format")
    assert "adapter.rar" in message and all(s in message for s in (".tar.gz", ".tgz", ".zip"))


@pytest.mark.parametrize(("filename", "content"), [("a.tar.gz", "zip"), ("a.zip", "tar")])
def test_a_mislabelled_archive_is_refused(filename: str, content: str, tmp_path: Path) -> None:
    archive = (zip_archive(tmp_path / "upload", adapter_members()) if content == "zip"
               else tar_gz(tmp_path / "upload", [tar_file(n, d) for n, d in adapter_members()]))
    message = refusal(archive, tmp_path / "out", filename=filename, code="invalid_archive")
    assert filename in message


@pytest.mark.parametrize("filename", ["a.tar.gz", "a.zip"])
def test_a_corrupt_archive_is_refused(filename: str, tmp_path: Path) -> None:
    members = [("adapter_config.json", b"{}"), ("adapter_model.safetensors", bytes(range(256)) * 400)]
    archive = (zip_archive(tmp_path / "upload", members) if filename.endswith(".zip")
               else tar_gz(tmp_path / "upload", [tar_file(n, d) for n, d in members]))
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xa5" * 64
    archive.write_bytes(bytes(raw))
    assert "corrupt" in refusal(archive, tmp_path / "out", filename=filename, code="invalid_archive")


def test_a_truncated_tar_gz_is_refused(tmp_path: Path) -> None:
    archive = tar_gz(tmp_path / "upload", [tar_file("adapter_model.safetensors", bytes(range(256)) * 400)])
    archive.write_bytes(archive.read_bytes()[:-200])
    message = refusal(archive, tmp_path / "out", filename="a.tgz", code="invalid_archive")
    assert "corrupt or truncated" in message


# -- unsafe members ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "why"), [
    ("../evil.json", "'..'"),
    ("my-adapter/../../evil.json", "'..'"),
    ("/etc/evil.json", "absolute"),
    ("C:/evil.json", "absolute"),
    ("..\\evil.json", "backslash"),
])
@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_members_escaping_the_folder_are_refused(fmt: str, name: str, why: str, tmp_path: Path) -> None:
    members = [*adapter_members(), (name, b"{}")]
    archive = (zip_archive(tmp_path / "upload", members) if fmt == "zip"
               else tar_gz(tmp_path / "upload", [tar_file(n, d) for n, d in members]))
    message = refusal(archive, tmp_path / "out", filename=f"a.{fmt}", code="unsafe_archive_member")
    assert why in message and "evil.json" in message


def test_zip_does_not_hide_an_absolute_name(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("placeholder")
    info.filename = "/etc/evil.json"  # writestr would strip the leading slash; a hostile zip does not
    archive = zip_archive(tmp_path / "upload", [*adapter_members(), (info, b"{}")])
    assert "absolute" in refusal(archive, tmp_path / "out", filename="a.zip", code="unsafe_archive_member")


@pytest.mark.parametrize(("kind", "words"), [
    (tarfile.SYMTYPE, "a symlink"),
    (tarfile.LNKTYPE, "a hard link"),
    (tarfile.CHRTYPE, "a device file"),
    (tarfile.BLKTYPE, "a device file"),
    (tarfile.FIFOTYPE, "a FIFO"),
])
def test_tar_links_devices_and_fifos_are_refused(kind: bytes, words: str, tmp_path: Path) -> None:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        tar_file(n, d) for n, d in adapter_members()]
    members.append(tar_special("README.md", kind, linkname="/etc/passwd"))
    archive = tar_gz(tmp_path / "upload", members)
    message = refusal(archive, tmp_path / "out", filename="a.tar.gz", code="unsafe_archive_member")
    assert words in message and "README.md" in message


def test_a_zip_symlink_is_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("README.md")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = zip_archive(tmp_path / "upload", [*adapter_members(), (link, b"/etc/passwd")])
    assert "a symlink" in refusal(archive, tmp_path / "out", filename="a.zip", code="unsafe_archive_member")


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    archive = zip_archive(tmp_path / "upload", [(f"f{i}.txt", b"x") for i in range(257)])
    assert "256" in refusal(archive, tmp_path / "out", filename="a.zip", code="invalid_archive")


# -- sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["a.zip", "a.tar.gz"])
def test_a_compressed_bomb_is_too_large(filename: str, tmp_path: Path) -> None:
    bomb = [("adapter_config.json", b"{}"), ("adapter_model.safetensors", b"\0" * (8 * MiB))]
    archive = (zip_archive(tmp_path / "upload", bomb) if filename.endswith(".zip")
               else tar_gz(tmp_path / "upload", [tar_file(n, d) for n, d in bomb]))
    assert archive.stat().st_size < 64 * 1024
    message = refusal(archive, tmp_path / "out", filename=filename, code="adapter_too_large",
                      error=AdapterTooLargeError)
    assert "adapter_model.safetensors" in message and "1,048,576" in message


def _many_entries(path: Path, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as zf:  # empty entries: a big central directory in a small file
        for i in range(count):
            zf.writestr(f"e{i}", b"")
    return path


def test_a_zip_with_a_huge_entry_count_is_refused_before_its_directory_is_read(tmp_path: Path) -> None:
    archive = _many_entries(tmp_path / "upload", 30_000)  # the review's 750k entries, small
    tracemalloc.start()
    try:
        message = refusal(archive, tmp_path / "out", filename="a.zip", code="invalid_archive")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "30,000 members" in message and "256" in message
    assert peak < 256 * 1024  # zipfile would hold 30,000 ZipInfo objects (tens of MiB)


def test_a_zip_whose_end_record_understates_its_entries_is_refused(tmp_path: Path) -> None:
    archive = _many_entries(tmp_path / "upload", 8000)
    raw = bytearray(archive.read_bytes())
    struct.pack_into("<HH", raw, len(raw) - 22 + 8, 2, 2)  # the end record now claims 2 entries
    archive.write_bytes(bytes(raw))
    assert "central directory" in refusal(archive, tmp_path / "out", filename="a.zip", code="invalid_archive")


def test_a_zip64_archive_is_read(tmp_path: Path) -> None:
    raw = zip_archive(tmp_path / "plain", adapter_members()).read_bytes()
    entries, cd_size, cd_offset = struct.unpack_from("<HLL", raw, len(raw) - 22 + 10)
    zip64_at = len(raw) - 22
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, cd_size, cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    archive = tmp_path / "upload.zip"
    archive.write_bytes(raw[:zip64_at] + record + locator + end)
    assert_extracted(extract_archive(archive, tmp_path / "out", filename="a.zip", **LIMITS), tmp_path / "out")


def test_the_total_counts_every_member(tmp_path: Path) -> None:
    members = [(f"part{i}.bin", b"\1" * (600 * 1024)) for i in range(3)]
    archive = tar_gz(tmp_path / "upload", [tar_file(n, d) for n, d in members])
    message = refusal(archive, tmp_path / "out", filename="a.tgz", code="adapter_too_large",
                      error=AdapterTooLargeError, max_total_bytes=MiB)
    assert "1,048,576" in message


def test_a_huge_tar_header_cannot_exhaust_memory(tmp_path: Path) -> None:
    members = [tar_file(n, d) for n, d in adapter_members()]
    archive = tar_gz(tmp_path / "upload", members, comment="x" * (3 * MiB))
    refusal(archive, tmp_path / "out", filename="a.tar.gz", code="adapter_too_large",
            error=AdapterTooLargeError, max_total_bytes=MiB)


# -- layout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("members", "words"), [
    ([("a/b/adapter_config.json", b"{}")], "nested too deep"),
    ([("one/adapter_config.json", b"{}"), ("two/adapter_model.safetensors", b"")],
     "more than one top folder"),
    ([("adapter_config.json", b"{}"), ("two/adapter_model.safetensors", b"")], "mixes files"),
    ([("adapter_config.json", b"{}"), ("adapter_config.json", b"{}")], "clashes"),
    ([("adapter_config.json", b"{}"), ("adapter_config.json/x", b"{}")], "clashes"),
    ([("empty/", b"")], "no files"),
])
def test_layouts_we_cannot_use_are_refused(members: list[tuple[str, bytes]], words: str,
                                           tmp_path: Path) -> None:
    archive = zip_archive(tmp_path / "upload", members)
    assert words in refusal(archive, tmp_path / "out", filename="a.zip", code="invalid_archive")
