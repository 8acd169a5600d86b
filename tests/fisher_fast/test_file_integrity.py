"""Digests, path checks and atomic writes."""

import hashlib
import os

import pytest
import torch

from fisher_fast.file_integrity import (
    atomic_write,
    check_digests,
    readable_file,
    tensor_digest,
    writable_path,
)


def test_tensor_digest_is_sha256_of_dtype_shape_and_bytes():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    want = hashlib.sha256(b"torch.float32:(2, 2):" + t.numpy().tobytes()).hexdigest()
    assert tensor_digest(t) == want
    assert tensor_digest(t.t()) != want  # another layout of the same bytes: other values
    assert tensor_digest(t.reshape(4)) != want  # same bytes, other shape
    assert tensor_digest(t.view(torch.int32)) != want  # same bytes, other dtype
    assert tensor_digest(torch.ones(3, dtype=torch.bfloat16)) == tensor_digest(
        torch.ones(3, dtype=torch.bfloat16))


def test_check_digests_names_the_file_and_the_tensor():
    good = {"a": torch.zeros(2), "b": torch.ones(3)}
    digests = {k: tensor_digest(v) for k, v in good.items()}
    check_digests("f.st", good, digests)
    with pytest.raises(ValueError, match=r"f.st: expected tensor 'b' to have the checksum"):
        check_digests("f.st", {**good, "b": torch.tensor([1.0, 1.0, 1.5])}, digests)
    with pytest.raises(ValueError, match=r"f.st: expected tensor 'b' \(recorded in the header\)"):
        check_digests("f.st", {"a": good["a"]}, digests)
    with pytest.raises(ValueError, match=r"f.st: expected a checksum for every tensor, got none "
                                         r"for 'c'"):
        check_digests("f.st", {**good, "c": torch.zeros(1)}, digests)


@pytest.mark.parametrize("check", [writable_path, readable_file])
@pytest.mark.parametrize("path, message", [
    (None, "path: expected a str or os.PathLike, got NoneType."),
    (3, "path: expected a str or os.PathLike, got int."),
    ("", "path: expected a file name, got ''."),
])
def test_paths_that_are_not_paths_are_value_errors(check, path, message):
    with pytest.raises(ValueError) as err:
        check(path)
    assert str(err.value) == message


def test_path_checks_name_the_missing_directory_or_file(tmp_path):
    with pytest.raises(ValueError, match=r"expected a file in an existing directory, got .*"
                                         r"(no directory .*missing'; create it first)"):
        writable_path(tmp_path / "missing" / "x.st")
    with pytest.raises(ValueError, match="expected a file name, got the directory"):
        writable_path(tmp_path)
    with pytest.raises(ValueError, match=r"expected an existing file, got .* \(no such file\)"):
        readable_file(tmp_path / "x.st")
    with pytest.raises(ValueError, match=r"expected a file, got .* \(not a regular file\)"):
        readable_file(tmp_path)


def test_atomic_write_replaces_the_file_whole_with_the_usual_permissions(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not replaced until the block succeeds
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()],
                         ids=["oserror", "interrupt"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise error
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_into_a_missing_directory_fails_before_the_block(tmp_path):
    ran = []
    with pytest.raises(ValueError, match="no directory"):
        with atomic_write(tmp_path / "missing" / "out.bin"):
            ran.append(1)
    assert ran == [] and os.listdir(tmp_path) == []
