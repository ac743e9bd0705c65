"""Torn writes and crashes in the write-ahead log (DESIGN §5, STYLE §6 and §9).

Byte-exhaustive: the log is cut at every byte of its last frame, and every byte of the
last, first and a middle frame is flipped.  A cut or damaged *last* frame must come back
as a torn tail (set aside, truncated, the committed records intact, the next append
chaining on); damage *before* the last frame must be refused with its offset, the file
untouched.  Then child processes are killed (``os._exit(137)``) at every WAL fault point
and at every fsync, and the log must reopen with every committed record.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest

import appliance
from appliance.errors import WalCorrupted
from appliance.wal import ZERO_HASH, Wal, verify_chain
from appliance.wal.frame import encode_body, encode_frame, record_hash

pytestmark = pytest.mark.crash

T0: Final = 1_700_000_000_000
TYPE: Final = "key.state"
FIELDS: Final[tuple[dict[str, Any], ...]] = (
    {"key_id": "k-0001", "state": "CLASSICAL", "cka_id": b"\x01" * 16},
    {"key_id": "k-0001", "state": "HYBRID", "blob_sha3": b"\x02" * 32},
    {"key_id": "k-0001", "state": "PQC_PREFERRED", "reason": "scheduled"},
)
REPO: Final = Path(appliance.__file__).resolve().parent.parent


def _expected_frames() -> tuple[bytes, ...]:
    """The exact frames a Wal with clock T0, T0+1, ... writes for FIELDS (checked below)."""
    frames, prev = [], ZERO_HASH
    for seq, fields in enumerate(FIELDS):
        body = encode_body(seq, prev, T0 + seq, TYPE, fields)
        frames.append(encode_frame(body))
        prev = record_hash(body)
    return tuple(frames)


FRAMES: Final = _expected_frames()
HASHES: Final = tuple(record_hash(f[8:]) for f in FRAMES)
GOOD_END: Final = len(FRAMES[0]) + len(FRAMES[1])


def ticking(start: int) -> Callable[[], int]:
    now = [start - 1]

    def clock() -> int:
        now[0] += 1
        return now[0]

    return clock


def put(d: Path, data: bytes) -> Path:
    """A WAL directory holding ``data`` as its wal.log (test set-up, no fsync needed)."""
    d.mkdir(mode=0o700)
    fd = os.open(d / "wal.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return d


def flipped(frame: bytes, i: int) -> bytes:
    return frame[:i] + bytes([frame[i] ^ 0xFF]) + frame[i + 1 :]


def test_the_expected_frames_are_what_the_log_writes(tmp_path: Path) -> None:
    with Wal.open(tmp_path / "wal", clock=ticking(T0)) as wal:
        for fields in FIELDS:
            wal.append(TYPE, fields)
        wal.commit()
    assert (tmp_path / "wal" / "wal.log").read_bytes() == b"".join(FRAMES)


def _reopen_and_continue(d: Path, torn: bytes) -> None:
    """Opening keeps the two committed records and sets ``torn`` aside; the next append
    chains on and writes exactly the frame that was lost."""
    with Wal.open(d, clock=ticking(T0 + 2)) as wal:
        assert len(wal) == 2
        assert wal.head == (1, HASHES[1])
        assert wal.torn_bytes == len(torn)
        assert [r.fields["state"] for r in wal.records()] == ["CLASSICAL", "HYBRID"]
        assert (d / "wal.log").stat().st_size == GOOD_END
        if torn:
            assert wal.torn_path == d / "wal.log.torn"
            assert (d / "wal.log.torn").read_bytes() == torn
        else:
            assert wal.torn_path is None
            assert not (d / "wal.log.torn").exists()
        rec = wal.append_commit(TYPE, FIELDS[2])
        assert rec.seq == 2
        assert rec.prev == HASHES[1]
    assert (d / "wal.log").read_bytes() == b"".join(FRAMES)
    assert verify_chain(d) == (2, HASHES[2])
    with Wal.open(d, readonly=True) as again:
        assert again.torn_bytes == 0
        assert len(again) == 3


@pytest.mark.parametrize("k", range(len(FRAMES[2])))
def test_cut_at_every_byte_of_the_last_frame(tmp_path: Path, k: int) -> None:
    d = put(tmp_path / "wal", FRAMES[0] + FRAMES[1] + FRAMES[2][:k])
    _reopen_and_continue(d, FRAMES[2][:k])


@pytest.mark.parametrize("i", range(len(FRAMES[2])))
def test_flip_every_byte_of_the_last_frame(tmp_path: Path, i: int) -> None:
    damaged = flipped(FRAMES[2], i)
    d = put(tmp_path / "wal", FRAMES[0] + FRAMES[1] + damaged)
    _reopen_and_continue(d, damaged)


def _assert_refused(d: Path, offset: int) -> None:
    before = (d / "wal.log").read_bytes()
    with pytest.raises(WalCorrupted) as info:
        Wal.open(d)
    assert info.value.offset == offset
    assert f"at offset {offset}" in str(info.value)
    assert (d / "wal.log").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["lock", "wal.log"]
    with pytest.raises(WalCorrupted):
        Wal.open(d, readonly=True)


@pytest.mark.parametrize("i", range(len(FRAMES[0])))
def test_flip_every_byte_of_the_first_of_two_frames(tmp_path: Path, i: int) -> None:
    d = put(tmp_path / "wal", flipped(FRAMES[0], i) + FRAMES[1])
    _assert_refused(d, 0)


@pytest.mark.parametrize("i", range(len(FRAMES[1])))
def test_flip_every_byte_of_a_middle_frame(tmp_path: Path, i: int) -> None:
    d = put(tmp_path / "wal", FRAMES[0] + flipped(FRAMES[1], i) + FRAMES[2])
    _assert_refused(d, len(FRAMES[0]))


# -- killed child processes ------------------------------------------------------------------


def _run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _committed(out: subprocess.CompletedProcess[str]) -> list[int]:
    """The seqs the child saw committed (it prints one per returned commit)."""
    return [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("ok ")]


FAULT_CHILD: Final = """
    import os, sys
    from pathlib import Path
    from appliance import fsio
    from appliance.wal import Wal
    point = sys.argv[2]
    with Wal.open(Path(sys.argv[1])) as wal:
        for i in range(3):
            rec = wal.append_commit("t", {"i": i})
            print("ok", rec.seq, flush=True)
        fsio._fault_hook = lambda name: os._exit(137) if name == point else None
        rec = wal.append_commit("t", {"i": 3})
        print("ok", rec.seq, flush=True)
"""


@pytest.mark.parametrize("point", ["wal.append", "wal.commit.before", "wal.fsync"])
def test_killed_at_a_fault_point(tmp_path: Path, point: str) -> None:
    d = tmp_path / "wal"
    out = _run_child(FAULT_CHILD, str(d), point)
    assert out.returncode == 137, out.stderr
    assert _committed(out) == [0, 1, 2]
    with Wal.open(d) as wal:
        assert wal.torn_bytes == 0  # a process crash cannot tear a single write
        records = list(wal.records())
        assert [r.fields["i"] for r in records[:3]] == [0, 1, 2]
        # the kernel kept the un-synced frame; after "wal.fsync" it is durable as well
        assert len(records) == 4
        wal.append_commit("t", {"i": 4})
    assert verify_chain(d)[0] == 4


SYNC_CHILD: Final = """
    import os, sys
    from pathlib import Path
    from appliance import fsio
    from appliance.wal import Wal
    kill_at = int(sys.argv[2])
    calls = 0
    real = fsio._durable_sync
    def sync(fd):
        global calls
        calls += 1
        if calls == kill_at:
            os._exit(137)
        real(fd)
    fsio._durable_sync = sync
    with Wal.open(Path(sys.argv[1])) as wal:
        print("ok", -1, flush=True)
        for i in range(2):
            print("ok", wal.append_commit("single", {"i": i}).seq, flush=True)
        for i in range(3):
            rec = wal.append("group", {"i": i})
        wal.commit()
        print("ok", rec.seq, flush=True)
        print("ok", wal.append_commit("single", {"i": 9}).seq, flush=True)
    print("done", calls, flush=True)
"""
SYNC_POINTS: Final = 7  # mkdir, create wal.log, open, 2 commits, group commit, 1 commit


@pytest.mark.parametrize("kill_at", range(1, SYNC_POINTS + 2))
def test_killed_at_every_fsync(tmp_path: Path, kill_at: int) -> None:
    d = tmp_path / "state" / "wal"
    out = _run_child(SYNC_CHILD, str(d), str(kill_at))
    committed = _committed(out)
    if kill_at > SYNC_POINTS:
        assert out.returncode == 0, out.stderr
        assert f"done {SYNC_POINTS}" in out.stdout
    else:
        assert out.returncode == 137, out.stderr
    if not (d / "wal.log").exists():
        assert committed == []
        return
    with Wal.open(d) as wal:
        assert wal.torn_bytes == 0
        assert len(wal) - 1 >= max(committed, default=-1)
        records = list(wal.records())  # records() re-checks every prev link
    expected = ["single", "single", "group", "group", "group", "single"]
    assert [r.type for r in records] == expected[: len(records)]
    if records:
        assert verify_chain(d) == (records[-1].seq, records[-1].hash)


TORN_CHILD: Final = """
    import os, sys
    from pathlib import Path
    from appliance import fsio
    point = sys.argv[2]
    fsio._fault_hook = lambda name: os._exit(137) if name == point else None
    from appliance.wal import Wal
    Wal.open(Path(sys.argv[1])).close()
    print("ok", 0)
"""


@pytest.mark.parametrize(
    "point",
    [
        "wal.torn.write",
        "wal.torn.fsync",
        "wal.torn.rename",
        "wal.torn.dirsync",
        "wal.torn.truncate",
    ],
)
def test_killed_while_setting_a_torn_tail_aside(tmp_path: Path, point: str) -> None:
    torn = FRAMES[2][:20]
    d = put(tmp_path / "wal", FRAMES[0] + FRAMES[1] + torn)
    out = _run_child(TORN_CHILD, str(d), point)
    assert out.returncode == 137, out.stderr
    with Wal.open(d, clock=ticking(T0 + 2)) as wal:
        assert len(wal) == 2
        assert wal.head == (1, HASHES[1])
        wal.append_commit(TYPE, FIELDS[2])
    assert (d / "wal.log").read_bytes() == b"".join(FRAMES)
    kept = sorted(p.name for p in d.iterdir() if p.name.startswith("wal.log.torn"))
    assert kept, "the torn bytes must have been kept somewhere"
    assert all((d / name).read_bytes() == torn for name in kept)
