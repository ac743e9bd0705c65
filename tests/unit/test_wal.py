"""The write-ahead log (DESIGN §5): format, chain, recovery rules, lock, durability seams.

Real files in ``tmp_path``; the only thing replaced is :func:`appliance.fsio._durable_sync`,
the seam made for it, to make an fsync fail.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import appliance
from appliance import codec, fsio
from appliance.errors import CallerError, ConfigError, DeviceError, WalCorrupted, WalLocked
from appliance.wal import FRAME, MAX_BODY, RESERVED, ZERO_HASH, Wal, WalRecord, verify_chain
from appliance.wal.frame import MAX_DEPTH, BodyError, check_body, encode_body
from conftest import wal_scan_starts

T0 = 1_700_000_000_000
REPO = Path(appliance.__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------------


def ticking(start: int = T0) -> Callable[[], int]:
    """A deterministic clock: start, start+1, ..."""
    now = [start - 1]

    def clock() -> int:
        now[0] += 1
        return now[0]

    return clock


def log_path(d: Path) -> Path:
    return d / "wal.log"


def make_log(d: Path, n: int = 3) -> list[WalRecord]:
    with Wal.open(d, clock=ticking()) as wal:
        return [wal.append_commit("test", {"i": i, "name": f"record-{i}"}) for i in range(n)]


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, body) of every frame; the test data is well-formed."""
    out, pos = [], 0
    while pos < len(data):
        length, _ = FRAME.unpack_from(data, pos)
        out.append((pos, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    return out


def frame_of(body: bytes) -> bytes:
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def replace_body(d: Path, index: int, body: bytes) -> int:
    """Swap frame ``index``'s body for ``body`` (with a valid CRC); return its offset."""
    data = log_path(d).read_bytes()
    frames = split_frames(data)
    offset = frames[index][0]
    rebuilt = b"".join(frame_of(body if i == index else old) for i, (_, old) in enumerate(frames))
    log_path(d).write_bytes(rebuilt)
    return offset


def reencode(record: WalRecord, **changes: Any) -> bytes:
    fields = dict(record.fields)
    fields.update(changes)
    return codec.dumps(fields)


def assert_corrupt_untouched(d: Path, offset: int, why: str) -> None:
    before = log_path(d).read_bytes()
    names = sorted(os.listdir(d))
    with pytest.raises(WalCorrupted) as info:
        Wal.open(d)
    assert info.value.offset == offset
    assert why in str(info.value)
    assert f"offset {offset}" in str(info.value)
    assert log_path(d).read_bytes() == before
    assert sorted(os.listdir(d)) == names  # no torn file, nothing new
    with pytest.raises(WalCorrupted):
        verify_chain(d)


# -- round trip ------------------------------------------------------------------------------


def test_empty_log(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with Wal.open(d) as wal:
        assert wal.head == (-1, ZERO_HASH)
        assert len(wal) == 0
        assert list(wal.records()) == []
        assert wal.torn_bytes == 0
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(log_path(d).stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "lock").stat().st_mode) == 0o600
    assert verify_chain(d) == (-1, ZERO_HASH)


def test_round_trip_head_len_get_records(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with Wal.open(d, clock=ticking()) as wal:
        written = [
            wal.append_commit("key.create", {"key_id": "k1", "pub": b"\x01" * 40}),
            wal.append_commit("key.state", {"key_id": "k1", "to": "HYBRID", "n": -5}),
            wal.append_commit("note", {"nested": {"a": [1, None, True, False, "x"]}}),
        ]
        assert len(wal) == 3
        assert wal.head == (2, written[-1].hash)
        assert [wal.get(i) for i in range(3)] == written
        assert list(wal.records()) == written
        assert list(wal.records(1)) == written[1:]
        assert list(wal.records(3)) == []
    first = written[0]
    assert first.seq == 0
    assert first.prev == ZERO_HASH
    assert first.offset == 0
    assert first.ts == T0
    assert first.type == "key.create"
    assert first.fields["pub"] == b"\x01" * 40
    assert first.fields["seq"] == 0
    assert first.fields["type"] == "key.create"
    for before, after in itertools.pairwise(written):
        assert after.seq == before.seq + 1
        assert after.prev == before.hash
        assert after.ts == before.ts + 1
        assert after.offset == before.offset + FRAME.size + len(before.body)
    for rec in written:
        assert rec.hash == hashlib.sha3_256(rec.body).digest()
        assert codec.dumps(dict(rec.fields)) == rec.body
    assert log_path(d).stat().st_size == written[-1].offset + 8 + len(written[-1].body)


def test_reopen_sees_the_same_records(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 5)
    with Wal.open(d) as wal:
        assert list(wal.records()) == written
        assert wal.head == (4, written[-1].hash)
        nxt = wal.append_commit("more", {})
    assert nxt.seq == 5
    assert nxt.prev == written[-1].hash
    with Wal.open(d, readonly=True) as ro:
        assert list(ro.records()) == [*written, nxt]
    assert verify_chain(d) == (5, nxt.hash)


def test_records_are_read_only_views(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    (rec,) = make_log(d, 1)
    with pytest.raises(TypeError):
        rec.fields["i"] = 99  # type: ignore[index]
    with pytest.raises(AttributeError):
        rec.seq = 3  # type: ignore[misc]


def test_get_and_records_reject_unknown_seq(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    make_log(d, 2)
    with Wal.open(d) as wal:
        for bad in (-1, 2, 10, True):
            with pytest.raises(CallerError, match="no record"):
                wal.get(bad)
        with pytest.raises(CallerError):
            wal.records(-1)
        with pytest.raises(CallerError):
            wal.records(3)


def test_get_notices_a_frame_changed_after_open(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 2)
    with Wal.open(d) as wal:
        data = bytearray(log_path(d).read_bytes())
        data[written[1].offset + 12] ^= 0x01
        with log_path(d).open("r+b") as f:
            f.write(data)
        assert wal.get(0) == written[0]
        with pytest.raises(WalCorrupted) as info:
            wal.get(1)
        assert info.value.offset == written[1].offset


# -- the lock --------------------------------------------------------------------------------


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with Wal.open(d):
        with pytest.raises(WalLocked, match="held by another writer") as info:
            Wal.open(d)
        assert str(d / "lock") in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
        with Wal.open(d, readonly=True) as ro:  # readers take no lock
            assert len(ro) == 0
    with Wal.open(d):  # released on close
        pass


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_second_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    child = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from appliance.errors import WalLocked
        from appliance.wal import Wal
        try:
            Wal.open(Path(sys.argv[1]))
        except WalLocked as exc:
            print("locked:", exc)
            sys.exit(3)
        print("opened")
        """
    )
    run = [sys.executable, "-c", child, str(d)]
    with Wal.open(d):
        out = subprocess.run(run, capture_output=True, text=True, env=_child_env(), check=False)
        assert out.returncode == 3, out.stderr
        assert f"locked: {d / 'lock'}" in out.stdout
    out = subprocess.run(run, capture_output=True, text=True, env=_child_env(), check=False)
    assert out.returncode == 0
    assert "opened" in out.stdout


def test_a_child_holding_the_lock_blocks_us(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    holder = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from appliance.wal import Wal
        with Wal.open(Path(sys.argv[1])):
            print("ready", flush=True)
            sys.stdin.read()
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder, str(d)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(),
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(WalLocked, match=f"pid {proc.pid}"):
            Wal.open(d)
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    Wal.open(d).close()


# -- read-only -------------------------------------------------------------------------------


def test_readonly_changes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with pytest.raises(ConfigError, match="no such file"):
        Wal.open(d, readonly=True)
    assert not d.exists()
    written = make_log(d, 2)
    with Wal.open(d, readonly=True) as ro:
        assert ro.readonly
        assert list(ro.records()) == written
        with pytest.raises(CallerError, match="read-only"):
            ro.append("x", {})
        with pytest.raises(CallerError, match="read-only"):
            ro.commit()


# -- writing rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(RESERVED))
def test_fields_cannot_set_reserved_keys(tmp_path: Path, key: str) -> None:
    d = tmp_path / "wal"
    with Wal.open(d) as wal:
        with pytest.raises(CallerError, match=key):
            wal.append("x", {key: 1, "other": 2})
        assert len(wal) == 0
    assert log_path(d).stat().st_size == 0


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        {1, 2},
        (1, 2),
        bytearray(b"x"),
        memoryview(b"x"),
        2**64,
        -(2**64) - 1,
        {1: "int key"},
        "\udc80",
        object(),
    ],
    ids=repr,
)
def test_values_outside_the_set_are_refused(tmp_path: Path, value: object) -> None:
    d = tmp_path / "wal"
    with Wal.open(d) as wal:
        with pytest.raises(CallerError, match="WAL record fields"):
            wal.append("x", {"v": value})
        assert len(wal) == 0
        wal.append_commit("x", {"v": [2**64 - 1, -(2**64)]})  # the extremes are fine
    assert log_path(d).stat().st_size > 0


def nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_limit(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with Wal.open(d) as wal:
        wal.append_commit("deep", {"v": nested(MAX_DEPTH - 1)})
        with pytest.raises(CallerError, match="nested deeper"):
            wal.append("deep", {"v": nested(MAX_DEPTH)})
    with Wal.open(d) as wal:
        assert wal.get(0).fields["v"] == nested(MAX_DEPTH - 1)


@pytest.mark.parametrize("bad", ["", b"x", 3, None])
def test_type_must_be_a_non_empty_str(tmp_path: Path, bad: Any) -> None:
    with Wal.open(tmp_path / "wal") as wal, pytest.raises(CallerError, match="type"):
        wal.append(bad, {})


@pytest.mark.parametrize("clock_value", [1.5, -1, "now", True])
def test_clock_must_return_non_negative_int(tmp_path: Path, clock_value: Any) -> None:
    with Wal.open(tmp_path / "wal", clock=lambda: clock_value) as wal:
        with pytest.raises(CallerError, match="clock"):
            wal.append("x", {})
        assert len(wal) == 0


def test_body_over_the_maximum_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with Wal.open(d) as wal:
        with pytest.raises(CallerError, match="exceeds"):
            wal.append("big", {"blob": bytes(MAX_BODY)})
        assert len(wal) == 0
        wal.append_commit("small", {"blob": bytes(1000)})
    assert len(split_frames(log_path(d).read_bytes())) == 1


def test_oversized_length_field_is_a_bad_frame(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 2)
    data = bytearray(log_path(d).read_bytes())
    struct.pack_into(">I", data, 0, MAX_BODY + 1)
    log_path(d).write_bytes(data)
    assert_corrupt_untouched(d, 0, "bad frame length")
    assert written


# -- group commit and fsync ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 10, 100])
def test_one_fsync_per_group_commit(tmp_path: Path, n: int) -> None:
    d = tmp_path / "wal"
    with Wal.open(d) as wal:
        start = wal.fsync_count
        assert start == 1  # the sync at open
        for group in range(3):
            for i in range(n):
                wal.append("bulk", {"g": group, "i": i})
            wal.commit()
            assert wal.fsync_count == start + group + 1
        wal.commit()  # nothing pending: no fsync
        assert wal.fsync_count == start + 3
        assert len(wal) == 3 * n


def test_fsync_failure_is_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "wal"
    make_log(d, 1)
    wal = Wal.open(d)
    wal.append("x", {"n": 1})

    def broken(fd: int) -> None:
        raise DeviceError("fsync failed: Input/output error")

    monkeypatch.setattr(fsio, "_durable_sync", broken)
    with pytest.raises(DeviceError, match="fsync failed"):
        wal.commit()
    assert wal.closed
    with pytest.raises(DeviceError, match="storage failure"):
        wal.append("y", {})
    with pytest.raises(DeviceError):
        wal.commit()
    with pytest.raises(DeviceError):
        wal.get(0)
    monkeypatch.undo()
    with Wal.open(d) as again:  # the lock was released; the log reopens
        assert len(again) in (1, 2)


def test_closed_log_refuses_calls(tmp_path: Path) -> None:
    wal = Wal.open(tmp_path / "wal")
    wal.close()
    wal.close()
    assert wal.closed
    for call in (lambda: wal.append("x", {}), wal.commit, lambda: wal.get(0), wal.records):
        with pytest.raises(CallerError, match="closed"):
            call()


# -- corruption is refused, the file left alone ------------------------------------------------


def test_broken_prev_link_in_a_middle_record(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 4)
    offset = replace_body(d, 1, reencode(written[1], prev=b"\x11" * 32))
    assert offset == written[1].offset
    assert_corrupt_untouched(d, offset, "broken prev link")


def test_broken_prev_link_in_the_last_record_is_not_a_torn_write(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    offset = replace_body(d, 2, reencode(written[2], prev=ZERO_HASH))
    assert_corrupt_untouched(d, offset, "broken prev link")


def test_seq_gap(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    offset = replace_body(d, 1, reencode(written[1], seq=2))
    assert_corrupt_untouched(d, offset, "seq gap")


def test_seq_repeated(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    offset = replace_body(d, 2, reencode(written[2], seq=1, prev=written[1].hash))
    assert_corrupt_untouched(d, offset, "seq gap")


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        (b"cseq\x01", b"cseq\x18\x01", "non-canonical"),  # seq 1 in a two-byte head
        (b"ai\x01", b"ai\x19\x00\x01", "non-canonical"),
        (b"dnamehrecord-1", b"dname\x78\x08record-1", "non-canonical"),
        (b"dnamehrecord-1", b"dname\x7f\x68record-1\xff", "indefinite"),
        (b"ai\x01", b"ai\xc2\x41\x01", "tag"),  # bignum 1
        (b"ai\x01", b"ai\xf9\x3c\x00", "float"),  # half float 1.0
    ],
)
def test_non_canonical_body(tmp_path: Path, old: bytes, new: bytes, why: str) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    assert old in written[1].body
    offset = replace_body(d, 1, written[1].body.replace(old, new))
    assert_corrupt_untouched(d, offset, why)


def test_keys_out_of_canonical_order(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 2)
    body = written[1].body
    # body = map head, then "ai" (2 bytes) sorts before "bts"; swap the first two entries
    first, second = body[1:4], body[4:16]  # "i": 1, then "ts": 9-byte integer
    assert first == b"ai\x01"
    assert second.startswith(b"bts\x1b")
    offset = replace_body(d, 1, body[:1] + second + first + body[16:])
    assert_corrupt_untouched(d, offset, "canonical order")


@pytest.mark.parametrize("missing", sorted(RESERVED))
def test_body_missing_a_reserved_field(tmp_path: Path, missing: str) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    fields = dict(written[1].fields)
    del fields[missing]
    offset = replace_body(d, 1, codec.dumps(fields))
    assert_corrupt_untouched(d, offset, f"without a valid {missing}")


@pytest.mark.parametrize(
    ("key", "value"),
    [("seq", -1), ("seq", "1"), ("prev", b"\x00" * 31), ("ts", -5), ("type", ""), ("type", 7)],
)
def test_reserved_field_of_the_wrong_type(tmp_path: Path, key: str, value: object) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    offset = replace_body(d, 1, reencode(written[1], **{key: value}))
    assert_corrupt_untouched(d, offset, "without a valid")


def test_bad_crc_in_an_earlier_frame(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    data = bytearray(log_path(d).read_bytes())
    data[written[1].offset + 4] ^= 0x5A  # the CRC field of frame 1
    log_path(d).write_bytes(data)
    assert_corrupt_untouched(d, written[1].offset, "checksum mismatch")


def test_valid_crc_but_not_cbor_in_the_middle(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    offset = replace_body(d, 1, b"\xff" * 40)
    assert_corrupt_untouched(d, offset, "undecodable")
    assert written


def test_valid_crc_but_not_cbor_in_the_last_frame_is_torn(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    replace_body(d, 2, b"\xff" * 40)
    with Wal.open(d) as wal:
        assert wal.torn_bytes == 48
        assert list(wal.records()) == written[:2]


def test_field_count_limit(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with Wal.open(d) as wal:
        wal.append_commit("wide", {f"f{i:03d}": i for i in range(255 - len(RESERVED))})
        with pytest.raises(CallerError, match="fields"):
            wal.append("wider", {f"f{i:03d}": i for i in range(256 - len(RESERVED))})
    with Wal.open(d) as wal:
        assert len(wal.get(0).fields) == 255


def test_zero_length_frame_in_the_middle(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 3)
    data = log_path(d).read_bytes()
    cut = written[1].offset
    log_path(d).write_bytes(data[:cut] + bytes(8) + data[cut:])
    assert_corrupt_untouched(d, cut, "bad frame length")


# -- torn tails (more in tests/crash) ---------------------------------------------------------


def test_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    """Power loss after the size grew but before the data landed: zeros at the end."""
    d = tmp_path / "wal"
    written = make_log(d, 2)
    with log_path(d).open("ab") as f:
        f.write(bytes(300))
    with Wal.open(d) as wal:
        assert wal.torn_bytes == 300
        assert list(wal.records()) == written
    assert (d / "wal.log.torn").read_bytes() == bytes(300)


def test_torn_copies_are_numbered_not_overwritten(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    make_log(d, 1)
    for n in range(3):
        with log_path(d).open("ab") as f:
            f.write(b"\x00\x00\x00\x40torn" + bytes([n]))
        with Wal.open(d) as wal:
            assert wal.torn_bytes == 9
            assert wal.torn_path is not None
            assert wal.torn_path.name == ("wal.log.torn" if n == 0 else f"wal.log.torn.{n}")
    assert (d / "wal.log.torn.2").read_bytes()[-1] == 2
    assert stat.S_IMODE((d / "wal.log.torn.1").stat().st_mode) == 0o600


def test_readonly_leaves_a_torn_tail_in_place(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 2)
    with log_path(d).open("ab") as f:
        f.write(b"\x00\x00\x01")
    before = log_path(d).read_bytes()
    with Wal.open(d, readonly=True) as ro:
        assert ro.torn_bytes == 3
        assert ro.torn_path is None
        assert list(ro.records()) == written
    assert log_path(d).read_bytes() == before
    assert not (d / "wal.log.torn").exists()
    with pytest.raises(WalCorrupted, match="incomplete last frame"):
        verify_chain(d)
    assert verify_chain(d, allow_torn_tail=True) == (1, written[-1].hash)
    assert log_path(d).read_bytes() == before


def test_a_reader_follows_a_writer_reading_only_new_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wal.follow (a serve --processes follower): each call reads only the frames the
    writer committed since the last one, never past the committed length."""
    d = tmp_path / "wal"
    scanned_from = wal_scan_starts(monkeypatch)
    with Wal.open(d, clock=ticking()) as wal:
        first = [wal.append_commit("test", {"i": i}) for i in range(3)]
        with Wal.open(d, readonly=True, limit=wal.committed_end) as ro:
            assert ro.follow(wal.committed_end) == 3  # nothing new: nothing read
            more = [wal.append_commit("test", {"i": i}) for i in range(3, 6)]
            pending = wal.append("test", {"i": 6})  # appended, not committed
            read_up_to = ro.committed_end
            scanned_from.clear()
            assert ro.follow(wal.committed_end) == 3
            assert scanned_from == [read_up_to]
            assert list(ro.records(3)) == more
            assert (len(ro), ro.head) == (6, (5, more[-1].hash))
            wal.commit()
            assert ro.follow(wal.committed_end) == 6
            assert list(ro.records()) == [*first, *more, pending]
            assert ro.committed_end == wal.committed_end
            with pytest.raises(CallerError, match="below what was read"):
                ro.follow(0)
        with pytest.raises(CallerError, match="read-only"):
            wal.follow(wal.committed_end)


def test_follow_refuses_a_damaged_new_frame_and_keeps_its_index(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with Wal.open(d, clock=ticking()) as wal:
        wal.append_commit("test", {"i": 0})
        with Wal.open(d, readonly=True, limit=wal.committed_end) as ro:
            damaged_at = wal.committed_end
            for i in range(1, 4):
                wal.append_commit("test", {"i": i})
            with log_path(d).open("r+b") as f:  # a byte of the first new body flips
                f.seek(damaged_at + FRAME.size + 2)
                b = f.read(1)
                f.seek(damaged_at + FRAME.size + 2)
                f.write(bytes((b[0] ^ 0x40,)))
            with pytest.raises(WalCorrupted):
                ro.follow(wal.committed_end)
            assert (len(ro), ro.committed_end) == (1, damaged_at)
            assert [r.fields["i"] for r in ro.records()] == [0]


# -- properties ------------------------------------------------------------------------------

cbor_ints = st.integers(min_value=-(2**64), max_value=2**64 - 1)
leaves = st.none() | st.booleans() | cbor_ints | st.text(max_size=30) | st.binary(max_size=40)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_dicts = st.dictionaries(
    st.text(min_size=1, max_size=30).filter(lambda k: k not in RESERVED), values, max_size=6
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.text(min_size=1, max_size=12), field_dicts), max_size=8))
def test_any_fields_read_back_identical(entries: list[tuple[str, dict[str, Any]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "wal"
        with Wal.open(d) as wal:
            written = [wal.append(kind, fields) for kind, fields in entries]
            wal.commit()
        with Wal.open(d) as wal:
            read = list(wal.records())
    assert read == written
    for (kind, fields), rec in zip(entries, read, strict=True):
        assert rec.type == kind
        assert {k: v for k, v in rec.fields.items() if k not in RESERVED} == fields


def body_of(fields: dict[str, Any], seq: int = 0) -> bytes:
    return encode_body(seq, ZERO_HASH, T0, "t", fields)


@settings(max_examples=300, deadline=None)
@given(field_dicts)
def test_the_validator_accepts_what_the_codec_writes(fields: dict[str, Any]) -> None:
    body = codec.dumps({**fields, "seq": 7, "prev": b"\x01" * 32, "ts": T0, "type": "t"})
    assert check_body(body) == (7, b"\x01" * 32)
    assert body_of(fields) == codec.dumps(
        {**fields, "seq": 0, "prev": ZERO_HASH, "ts": T0, "type": "t"}
    )


def _allowed(value: object, depth: int) -> bool:
    kind = type(value)
    if kind in (str, bytes, bool) or value is None:
        return True
    if kind is int:
        assert isinstance(value, int)
        return -(2**64) <= value < 2**64
    if kind not in (list, dict) or depth >= MAX_DEPTH:
        return False
    if isinstance(value, list):
        return all(_allowed(v, depth + 1) for v in value)
    assert isinstance(value, dict)
    return all(type(k) is str and _allowed(v, depth + 1) for k, v in value.items())


def oracle(body: bytes) -> bool:
    """The slow, obvious definition of a valid body: cbor2 decodes it, the values are in the
    restricted set, re-encoding gives the same bytes, and the reserved fields are right."""
    try:
        value = codec.loads(body)
    except codec.CodecError:
        return False
    if type(value) is not dict or len(value) >= 256 or not _allowed(value, 0):
        return False
    if codec.dumps(value) != body:
        return False
    seq, prev, ts, kind = (value.get(k) for k in ("seq", "prev", "ts", "type"))
    return (
        type(seq) is int
        and seq >= 0
        and type(prev) is bytes
        and len(prev) == 32
        and type(ts) is int
        and ts >= 0
        and type(kind) is str
        and kind != ""
    )


def accepted(body: bytes) -> bool:
    try:
        check_body(body)
    except BodyError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(field_dicts, st.data())
def test_the_validator_agrees_with_cbor2_on_mutated_bodies(
    fields: dict[str, Any], data: st.DataObject
) -> None:
    body = bytearray(body_of(fields, seq=data.draw(st.integers(0, 2**40))))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = data.draw(st.integers(0, len(body) - 1)) if body else 0
        if op == "flip" and body:
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and body:
            body[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            body.insert(i, data.draw(st.integers(0, 255)))
        elif body:
            del body[i]
    mutated = bytes(body)
    assert accepted(mutated) == oracle(mutated)


def test_the_validator_agrees_on_hand_picked_edge_cases() -> None:
    good = body_of({"a": 1})
    cases = [
        good,
        good + b"\x00",
        good[:-1],
        b"",
        b"\xa0",
        body_of({"s": "é"}),
        body_of({"s": "é"}).replace("é".encode(), b"\xc3\x28"),  # invalid UTF-8
        body_of({"m": {"b": 1, "a": 2}}),
        body_of({"m": {"b": 1, "a": 2}}).replace(b"aa\x02ab\x01", b"ab\x01aa\x02"),
        body_of({"m": {"a": 1, "b": 2}}).replace(b"aa\x01ab\x02", b"aa\x01aa\x02"),
        body_of({"k" * 30: 1}),
        body_of({"l": [1, 2, 3]}).replace(b"\x83\x01\x02\x03", b"\x9f\x01\x02\x03\xff"),
        body_of({"n": -(2**64)}),
        body_of({"n": 2**64 - 1}),
        body_of({"u": None}).replace(b"\xf6", b"\xf7"),  # undefined
        body_of({"u": None}).replace(b"\xf6", b"\xf8\x20"),  # simple(32)
        body_of({"v": nested(MAX_DEPTH - 1)}),
        codec.dumps({"v": nested(MAX_DEPTH), "seq": 0, "prev": ZERO_HASH, "ts": 0, "type": "t"}),
    ]
    for body in cases:
        assert accepted(body) == oracle(body), body


def _frames_in(data: bytes) -> Iterator[bytes]:
    for _, body in split_frames(data):
        yield body


def test_verify_chain_agrees_with_open(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    written = make_log(d, 4)
    before = log_path(d).read_bytes()
    assert verify_chain(d) == (3, written[-1].hash)
    assert [hashlib.sha3_256(b).digest() for b in _frames_in(before)] == [r.hash for r in written]
    assert log_path(d).read_bytes() == before
    with pytest.raises(ConfigError):
        verify_chain(tmp_path / "nowhere")
