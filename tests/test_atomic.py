"""Outputs are replaced atomically, and only outputs wsiseg made are ever replaced or deleted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from wsiseg.atomic import (
    MARKER,
    OutputError,
    aside_path,
    atomic_path,
    check_replaceable,
    make_staging,
    publish,
    recover,
    remove_owned,
    staging_path,
)


def _output(path, text):
    tmp = make_staging(path)
    (tmp / "result.txt").write_text(text)
    return tmp


def test_publish_replaces_only_own_folders(tmp_path):
    final = tmp_path / "out"
    publish(_output(final, "one"), final)
    assert (final / "result.txt").read_text() == "one" and (final / MARKER).is_file()
    publish(_output(final, "two"), final)
    assert (final / "result.txt").read_text() == "two"
    assert not staging_path(final).exists() and not aside_path(final).exists()

    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("keep")
    with pytest.raises(OutputError, match="not created by wsiseg"):
        publish(_output(foreign, "x"), foreign)
    with pytest.raises(OutputError, match="not created by wsiseg"):
        remove_owned(foreign)
    assert (foreign / "thesis.txt").read_text() == "keep"


def test_folder_holding_an_input_is_never_replaced(tmp_path):
    final = tmp_path / "out"
    publish(_output(final, "one"), final)
    slide = final / "slide.svs"
    slide.write_bytes(b"slide")
    with pytest.raises(OutputError, match="holds an input"):
        check_replaceable(final, [slide])
    assert slide.read_bytes() == b"slide"


def test_kill_between_the_renames_keeps_one_complete_output(tmp_path):
    """A hard kill after the old output was moved aside: the next run puts it back."""
    final = tmp_path / "out"
    publish(_output(final, "old"), final)
    new = _output(final, "new")
    os.rename(final, aside_path(final))  # the first rename of publish; the process dies here
    assert not final.exists()
    recover(final)
    assert (final / "result.txt").read_text() == "old" and not aside_path(final).exists()
    publish(new, final)
    assert (final / "result.txt").read_text() == "new"


def test_signals_wait_for_the_swap(tmp_path):
    """SIGINT sent during a publish is delivered after it: old or new output, never neither."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from wsiseg.atomic import make_staging, publish, signals_held
        final = Path({str(tmp_path / 'out')!r})
        for text in ("old", "new"):
            tmp = make_staging(final)
            (tmp / "result.txt").write_text(text)
            if text == "new":
                import wsiseg.atomic as a
                rename = os.rename
                def slow_rename(src, dst):
                    rename(src, dst)
                    os.kill(os.getpid(), signal.SIGINT)  # arrives between the two renames
                a.os.rename = slow_rename
            try:
                publish(tmp, final)
            except KeyboardInterrupt:
                print("interrupted after", (final / "result.txt").read_text())
                sys.exit(130)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted after new" in proc.stdout
    assert (tmp_path / "out" / "result.txt").read_text() == "new"


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"step": 1}, path)
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"")  # a writer killed half-way
            raise RuntimeError("killed")
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
