"""atomic_write: all or nothing, and no temporary file left behind."""
from __future__ import annotations

import pytest

from madcluster_plugin.files import atomic_write, atomic_write_text


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "sub" / "table.md"
    assert atomic_write_text(path, "first\n") == path  # creates the folder
    assert path.read_text() == "first\n"

    def fail_midway(fh):
        fh.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail_midway)
    assert path.read_text() == "first\n"
    assert [p.name for p in path.parent.iterdir()] == ["table.md"]
    atomic_write(path, lambda fh: fh.write("second\n".encode()))
    assert path.read_text() == "second\n"
