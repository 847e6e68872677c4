"""Zip members the unpacker cannot read (encrypted, unsupported compression, corrupt CRC,
truncated or damaged streams): a 4xx that names the member by position, never by name, in
the answer and in the log. The zips are generated here by patching real zipfile output
(APPNOTE.TXT 4.3.7 local header, 4.3.12 central directory)."""

from __future__ import annotations

import io
import logging
import struct
import zipfile

import pytest
from fastapi import HTTPException

from api.uploads import unpack_zip
from tests.badfiles import png_bytes
from tests.imagegen import chest_like

SECRET = "DOE^JANE_1937-secret"  # what a member's name could carry


def _zip(method: int = zipfile.ZIP_DEFLATED, *, n: int = 3) -> tuple[bytes, list[zipfile.ZipInfo]]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for i in range(n):
            z.writestr(f"{SECRET}-{i}.png", png_bytes(chest_like(64, seed=i)))
    data = buf.getvalue()
    return data, zipfile.ZipFile(io.BytesIO(data)).infolist()


def _patch_both(data: bytes, info: zipfile.ZipInfo, *, local_at: int, central_at: int, value: int) -> bytes:
    """Set a 2-byte field of one member in its local header and its central directory entry."""
    b = bytearray(data)
    struct.pack_into("<H", b, info.header_offset + local_at, value)
    cd = b.find(b"PK\x01\x02")
    while cd != -1:
        (offset,) = struct.unpack_from("<I", b, cd + 42)
        if offset == info.header_offset:
            struct.pack_into("<H", b, cd + central_at, value)
        cd = b.find(b"PK\x01\x02", cd + 4)
    return bytes(b)


def encrypted(member: int) -> bytes:
    data, infos = _zip()
    return _patch_both(data, infos[member], local_at=6, central_at=8, value=infos[member].flag_bits | 0x1)


def compressed_with(method: int, member: int) -> bytes:
    data, infos = _zip(zipfile.ZIP_STORED)
    return _patch_both(data, infos[member], local_at=8, central_at=10, value=method)


def _data_start(data: bytes, info: zipfile.ZipInfo) -> int:
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len


def bad_crc(member: int) -> bytes:
    data, infos = _zip(zipfile.ZIP_STORED)
    b = bytearray(data)
    b[_data_start(data, infos[member]) + 40] ^= 0xFF  # a stored byte changed: the CRC-32 no longer matches
    return bytes(b)


def damaged_stream(member: int) -> bytes:
    data, infos = _zip(zipfile.ZIP_DEFLATED)
    b = bytearray(data)
    start = _data_start(data, infos[member])
    b[start:start + 24] = b"\xff" * 24  # deflate blocks overwritten: zlib refuses them
    return bytes(b)


def truncated_stream(member: int) -> bytes:
    """The member's compressed size (both headers) says less than its data: the deflate stream
    ends before its end-of-stream marker."""
    data, infos = _zip(zipfile.ZIP_DEFLATED)
    info = infos[member]
    b = bytearray(data)
    short = info.compress_size // 3
    struct.pack_into("<I", b, info.header_offset + 18, short)
    cd = b.find(b"PK\x01\x02")
    while cd != -1:
        if struct.unpack_from("<I", b, cd + 42)[0] == info.header_offset:
            struct.pack_into("<I", b, cd + 20, short)
        cd = b.find(b"PK\x01\x02", cd + 4)
    return bytes(b)


def bad_local_header(member: int) -> bytes:
    data, infos = _zip()
    b = bytearray(data)
    b[infos[member].header_offset:infos[member].header_offset + 4] = b"XXXX"  # "bad magic number"
    return bytes(b)


CASES = [
    ("encrypted first", encrypted(0), 422, 1),
    ("encrypted last", encrypted(2), 422, 3),
    ("deflate64", compressed_with(9, 1), 415, 2),
    ("implode", compressed_with(6, 0), 415, 1),
    ("ppmd", compressed_with(98, 2), 415, 3),
    ("zstandard", compressed_with(93, 1), 415, 2),
    ("bad crc", bad_crc(1), 400, 2),
    ("bad crc first", bad_crc(0), 400, 1),
    ("damaged deflate", damaged_stream(2), 400, 3),
    ("truncated deflate", truncated_stream(1), 400, 2),
    ("bad local header", bad_local_header(0), 400, 1),
]


@pytest.mark.parametrize("label,data,status,position", CASES, ids=[c[0] for c in CASES])
def test_unreadable_members_are_refused_by_position(tmp_path, caplog, label, data, status, position):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HTTPException) as refused:
        list(unpack_zip(io.BytesIO(data), store_dir=tmp_path / "store", max_total_bytes=1 << 30, max_members=100))
    e = refused.value
    assert e.status_code == status, (label, e.detail)
    assert f"zip member {position} " in e.detail
    assert SECRET not in e.detail and SECRET not in caplog.text and ".png" not in e.detail


def test_a_zip_without_a_directory_is_400_without_echo(tmp_path):
    data, _ = _zip()
    with pytest.raises(HTTPException) as refused:
        list(unpack_zip(io.BytesIO(data[: len(data) // 2]), store_dir=tmp_path, max_total_bytes=1 << 30,
                        max_members=100))
    assert refused.value.status_code == 400 and SECRET not in refused.value.detail


def test_a_readable_zip_still_unpacks(tmp_path):
    data, _ = _zip()
    members = list(unpack_zip(io.BytesIO(data), store_dir=tmp_path, max_total_bytes=1 << 30, max_members=100))
    assert [m.filename for m in members] == [f"{SECRET}-{i}.png" for i in range(3)]


@pytest.mark.parametrize("zip64", [False, True])
def test_a_huge_directory_is_refused_from_the_end_record_before_it_is_parsed(tmp_path, zip64):
    """Empty entries cost a few dozen bytes in the upload and far more once zipfile parses the
    directory: the declared count (end record, or the Zip64 one) is checked first."""
    import tracemalloc

    from api.uploads import ZIP_ENTRIES_PER_MEMBER, declared_entries

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for i in range(70_000 if zip64 else 3_000):  # over 65,535 entries needs the Zip64 record
            z.writestr(f"d/{i}", b"")
    data = buf.getvalue()
    assert (data.find(b"PK\x06\x06") != -1) is zip64
    assert declared_entries(io.BytesIO(data)) == (70_000 if zip64 else 3_000)
    max_members = 100
    assert declared_entries(io.BytesIO(data)) > ZIP_ENTRIES_PER_MEMBER * max_members
    tracemalloc.start()
    with pytest.raises(HTTPException) as e:
        list(unpack_zip(io.BytesIO(data), store_dir=tmp_path, max_total_bytes=1 << 30, max_members=max_members))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.status_code == 413 and "declares" in e.value.detail
    assert peak < len(data) // 4 + (1 << 20)  # the directory was never parsed (70,000 ZipInfo would be ~40 MB)
    assert not any(tmp_path.iterdir())


def test_a_zip_with_a_few_folders_and_macos_twins_is_not_refused_for_its_entry_count(tmp_path):
    """Entries that are skipped (folders, __MACOSX/._*) are allowed for up to the declared factor."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(3):
            z.writestr(f"films/{i}.png", png_bytes(chest_like(64, seed=i)))
            z.writestr(f"__MACOSX/films/._{i}.png", b"\x00\x05\x16\x07")
        z.writestr("films/", b"")
    members = list(unpack_zip(io.BytesIO(buf.getvalue()), store_dir=tmp_path, max_total_bytes=1 << 30, max_members=3))
    assert len(members) == 3
