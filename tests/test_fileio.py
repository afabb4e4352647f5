"""fileio: atomic writes that end with the modes of the user's umask (not mkstemp's private 0600)."""
import os
import stat

import pytest

from cxpmrg_lib.util.fileio import atomic_dir, current_umask, write_json


@pytest.fixture
def umask():
    before = os.umask(0o022)
    os.umask(before)

    def set_mask(mask):
        os.umask(mask)
        return mask

    yield set_mask
    os.umask(before)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    f = write_json(tmp_path / "runs" / "summary.json", {"a": 1})
    assert mode(f) == 0o666 & ~mask
    with atomic_dir(tmp_path / "model") as d:
        write_json(d / "config.json", {})
        (d / "weights.bin").write_bytes(b"x")
    assert mode(tmp_path / "model") == 0o777 & ~mask
    assert mode(tmp_path / "model" / "config.json") == 0o666 & ~mask
    assert mode(tmp_path / "model" / "weights.bin") == 0o666 & ~mask


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model") as d:
            (d / "part").write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
