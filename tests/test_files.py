"""celldino.files: atomic writes leave the old content or the new one, never a temporary or half a file."""
import os

import pytest
import torch

from celldino.files import atomic_torch_save, atomic_write, atomic_write_text


def test_write_replaces_and_creates_the_directory(tmp_path):
    path = tmp_path / "new" / "dir" / "a.txt"
    assert atomic_write_text(path, "one") == path and path.read_text() == "one"
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def half_then_fail(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_temporary_keeps_the_extension_and_is_hidden(tmp_path):
    seen = []

    def write(tmp):
        seen.append(os.path.basename(tmp))
        with open(tmp, "wb") as handle:
            handle.write(b"x")

    atomic_write(tmp_path / "x.npy", write)
    assert seen[0].startswith(".tmp-") and seen[0].endswith("x.npy")
    assert (tmp_path / "x.npy").read_bytes() == b"x"


def test_files_get_the_usual_permissions_not_private_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    # safetensors creates its file 0600: the written target still gets what open() gives (the umask's mode)
    from safetensors.torch import save_file
    atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_torch_save_round_trip(tmp_path):
    obj = {"w": torch.arange(5.0)}
    atomic_torch_save(obj, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], obj["w"])
