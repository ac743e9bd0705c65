"""Model-check the key-migration protocol (``model/migration.pml``) with spin.

Each case copies the model into ``tmp_path``, generates the verifier (``spin -a``),
compiles it (``gcc -DSAFETY -DNOREDUCE``) and runs an exhaustive search (``./pan -m...``,
no bitstate hashing).  The clean configurations must explore the whole state space with
``errors: 0``; every deliberately broken variant (``-DBUG_*``) and the reachability probe
must make spin report an error naming the property it breaks.  See ``model/README.md``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[2] / "model" / "migration.pml"
SPIN = shutil.which("spin")
GCC = shutil.which("gcc")

pytestmark = pytest.mark.skipif(
    SPIN is None or GCC is None,
    reason="model checking needs `spin` and `gcc` on PATH (Debian: apt-get install spin gcc)",
)

PAN_CFLAGS = ("-DSAFETY", "-DNOREDUCE")
DEPTH_LIMIT = "-m100000"  # the deepest configuration below reaches < 1,000 steps


@dataclass(frozen=True)
class PanRun:
    output: str
    errors: int
    states: int
    depth: int
    seconds: float
    trail: bool


def _number(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    assert m is not None, f"no match for {pattern!r} in pan output:\n{text}"
    return m.group(1)


def run_spin(tmp_path: Path, defines: tuple[str, ...], *, optimize: str) -> PanRun:
    work = tmp_path / "spin"
    work.mkdir()
    shutil.copy(MODEL, work / MODEL.name)
    assert SPIN is not None
    assert GCC is not None
    gen = subprocess.run(
        [SPIN, "-a", *defines, MODEL.name],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert gen.returncode == 0, gen.stdout + gen.stderr
    assert (work / "pan.c").is_file(), gen.stdout + gen.stderr
    cc = subprocess.run(
        [GCC, optimize, *PAN_CFLAGS, "-o", "pan", "pan.c"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cc.returncode == 0, cc.stderr
    pan = subprocess.run(
        ["./pan", DEPTH_LIMIT],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = pan.stdout + pan.stderr
    return PanRun(
        output=out,
        errors=int(_number(r"errors: (\d+)", out)),
        states=int(_number(r"(\d+) states, stored", out)),
        depth=int(_number(r"depth reached (\d+)", out)),
        seconds=float(_number(r"pan: elapsed time ([0-9.e+-]+) seconds", out)),
        trail=(work / f"{MODEL.name}.trail").exists(),
    )


def _summary(name: str, run: PanRun) -> None:
    print(  # noqa: T201
        f"spin {name}: {run.states} states stored, depth {run.depth}, "
        f"{run.seconds:g} s, errors: {run.errors}"
    )


@pytest.mark.parametrize(
    "defines",
    [
        pytest.param((), id="2keys-3crashes-1backward"),
        pytest.param(("-DNK=3",), id="3keys-3crashes-1backward"),
        pytest.param(("-DFULL_LOG", "-DMAXBACK=0"), id="full-log-2keys-3crashes"),
    ],
)
def test_model_has_no_errors_in_full_state_space(tmp_path: Path, defines: tuple[str, ...]) -> None:
    run = run_spin(tmp_path, defines, optimize="-O2")
    _summary(" ".join(defines) or "default", run)
    out = run.output
    assert "max search depth too small" not in out, out
    assert "Search not completed" not in out, out
    assert "out of memory" not in out, out
    assert "Full statespace search for:" in out, out
    assert "never claim         \t+" in out, out  # I1/I5 were checked in every state
    assert "assertion violated" not in out, out
    assert run.errors == 0, out
    assert not run.trail
    assert run.depth < 100_000
    assert run.states > 10_000  # sanity: the crash/recovery paths were actually explored


@pytest.mark.parametrize(
    ("define", "tag"),
    [
        # erasure after the PQC_ONLY record: the durable log says PQC_ONLY, token has the key
        ("BUG_WAL_BEFORE_ERASE", "tag_I1"),
        # recovery leaves FINALIZING keys half-finished
        ("BUG_NO_RECOVERY_FINISH", "tag_REC"),
        # CLASSICAL -> HYBRID record durable before the blob: HYBRID key without its blob
        ("BUG_BLOB_AFTER_RECORD", "tag_I3"),
        # HYBRID -> CLASSICAL unlinks the blob before the record
        ("BUG_DELETE_BLOB_FIRST", "tag_I3"),
        # blob rename not made durable (no directory fsync) before the record
        ("BUG_NO_DIRSYNC", "tag_I3"),
        # key state from an append-time cache, not replayed from the durable WAL
        ("BUG_TRUST_CACHE", "tag_I6"),
        # reachability probe: every key PQC_ONLY after the maximum number of crashes
        ("REACH_ALL_PQC_ONLY", "tag_REACH"),
    ],
)
def test_broken_variant_is_caught(tmp_path: Path, define: str, tag: str) -> None:
    run = run_spin(tmp_path, (f"-D{define}",), optimize="-O0")
    _summary(define, run)
    assert run.errors > 0, run.output
    assert f"assertion violated ({tag}||" in run.output, run.output
    assert run.trail, "spin should have written a counterexample trail"
