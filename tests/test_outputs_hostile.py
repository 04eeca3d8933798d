"""Hostile paths at `tmconvert SOURCE --to TARGET`: outputs that are inputs or not regular files, full disks, and
sources that are FIFOs, link loops or unreadable. Each is one line on stderr, exit 1, and nothing written."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.cli import main
from tmconvert.converter.modelfile.errors import OutputError
from tmconvert.converter.modelfile.files import AtomicFile
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.vim import VimConfig

TARGET = "vim-test-hostile"
REPO = Path(__file__).resolve().parents[1]
MAPPING = REPO / "mappings" / "vit-vim-mlp.yaml"
REFUSED = "refusing to replace it, even with --force"
NOT_REGULAR = "not a regular file (a FIFO); expected a checkpoint file or a model folder"


@pytest.fixture(autouse=True)
def tiny_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register(TARGET, VimConfig(embed_dim=16, depth=3, d_state=4))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_checkpoint(make_vit_state_dict(SMALL, seed=0), tmp_path / "teacher.safetensors")


def _convert(capsys: pytest.CaptureFixture[str], source: Path, *args: str) -> tuple[int, str]:
    code = main([str(source), "--to", TARGET, "--heads", "2", "--no-verify", *args])
    return code, capsys.readouterr().err


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry of the folder with its mode and size: what a refused command must leave exactly as it was."""
    return {name: (os.lstat(folder / name).st_mode, os.lstat(folder / name).st_size) for name in os.listdir(folder)}


# 2. An output that is an input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "symbolic link", "hard link"])
def test_an_output_that_is_the_source_is_refused_even_with_force(tmp_path, src, capsys, how):
    out = {
        "same path": src,
        "symbolic link": tmp_path / "link.safetensors",
        "hard link": tmp_path / "hard.safetensors",
    }[how]
    if how == "symbolic link":
        out.symlink_to(src)
    if how == "hard link":
        os.link(src, out)
    before, content = _listing(tmp_path), src.read_bytes()
    code, err = _convert(capsys, src, "--out", str(out), "--force")
    assert (code, err) == (1, f"error: {out}: is the input file {src}; choose another output path\n")
    assert _listing(tmp_path) == before and src.read_bytes() == content
    assert _convert(capsys, src, "--out", str(out))[1] == err  # without --force: the same reason, not "exists"


def test_an_output_that_is_a_shard_of_the_source_is_refused(tmp_path, capsys):
    index = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "sharded", fmt="safetensors-sharded")
    shard = index.parent / "model-00002-of-00002.safetensors"
    before = _listing(index.parent)
    code, err = _convert(capsys, index, "--out", str(shard), "--force")
    assert (code, err) == (1, f"error: {shard}: is the input file {shard}; choose another output path\n")
    assert _listing(index.parent) == before


def test_a_companion_output_that_is_the_mapping_file_is_refused(tmp_path, src, capsys):
    mapping = tmp_path / "v.config.json"  # any existing file is taken as a mapping: here a YAML one
    mapping.write_bytes(MAPPING.read_bytes())
    out = tmp_path / "v.safetensors"
    before = _listing(tmp_path)
    code, err = _convert(capsys, src, "--mapping", str(mapping), "--out", str(out), "--force")
    assert (code, err) == (1, f"error: {mapping}: is the input file {mapping}; choose another output path\n")
    assert _listing(tmp_path) == before and mapping.read_bytes() == MAPPING.read_bytes()


# 3. Outputs that are not regular files --------------------------------------------------------------------------


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return "a FIFO"


def _socket(path: Path) -> str:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()
    return "a socket"


def _link_to_null(path: Path) -> str:
    path.symlink_to("/dev/null")
    return "a symbolic link to a character device"


@pytest.mark.parametrize("make", [_fifo, _socket, _link_to_null], ids=["fifo", "socket", "link-to-dev-null"])
@pytest.mark.parametrize("which", ["v.safetensors", "v.config.json"])
@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_an_output_that_is_not_a_regular_file_is_never_replaced(tmp_path, src, capsys, make, which, force):
    kind = make(tmp_path / which)
    before = _listing(tmp_path)
    code, err = _convert(capsys, src, "--out", str(tmp_path / "v.safetensors"), *(["--force"] if force else []))
    assert (code, err) == (1, f"error: {tmp_path / which}: is {kind}, not a regular file; {REFUSED}\n")
    assert _listing(tmp_path) == before


def test_a_fifo_that_appears_after_the_check_is_not_replaced_either(tmp_path):
    path = tmp_path / "f.bin"
    handle = AtomicFile(path, overwrite=True)
    handle.file.write(b"data")
    os.mkfifo(path)
    with pytest.raises(OutputError, match=rf"^{path}: is a FIFO, not a regular file; {REFUSED}$"):
        handle.commit()
    handle.discard()
    assert os.listdir(tmp_path) == ["f.bin"] and stat.S_ISFIFO(os.lstat(path).st_mode)


# 8. Disk full, file too large ----------------------------------------------------------------------------------


class _FullDisk:
    """A file whose writes fail the way a full disk (or a file size limit) fails them."""

    def __init__(self, file, code: int):
        self._file, self._code = file, code

    def write(self, data):
        raise OSError(self._code, os.strerror(self._code))

    def __getattr__(self, name):
        return getattr(self._file, name)


@pytest.mark.parametrize(
    ("nth", "error", "name"),
    [(0, errno.ENOSPC, "v.safetensors"), (1, errno.EFBIG, "v.config.json"), (2, errno.ENOSPC, "v.pth")],
)
def test_a_failing_write_is_one_line_naming_the_file(tmp_path, src, capsys, monkeypatch, nth, error, name):
    """The outputs are opened weights, sidecar, `.pth`; the nth one's writes fail (torch.save hides the errno of a
    failed write behind its own RuntimeError: the message still names the file and the reason)."""
    real, written = os.fdopen, []

    def fdopen(fd, mode="r", *args, **kwargs):
        file = real(fd, mode, *args, **kwargs)
        if "w" not in mode:
            return file
        written.append(fd)
        return _FullDisk(file, error) if len(written) - 1 == nth else file

    monkeypatch.setattr(os, "fdopen", fdopen)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _convert(capsys, src, "--out", str(out_dir / "v.safetensors"), "--format", "vim")
    assert (code, err) == (1, f"error: {out_dir / name}: cannot write ({os.strerror(error)})\n")
    assert os.listdir(out_dir) == []


def test_a_failing_fsync_is_one_line_naming_the_file(tmp_path, src, capsys, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _convert(capsys, src, "--out", str(out_dir / "v.safetensors"))
    assert (code, err) == (1, f"error: {out_dir / 'v.safetensors'}: cannot write (No space left on device)\n")
    assert os.listdir(out_dir) == []


_SIZE_LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    from tmconvert.converter.cli import main
    from tmconvert.models.registry import register
    from tmconvert.models.vim import VimConfig

    register("vim-test-hostile", VimConfig(embed_dim=16, depth=3, d_state=4))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("fails", ["v.safetensors", "v.pth"])
def test_a_real_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, src, fails):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG): the weights (written when committed, their
    few KiB being buffered), or, with --format vim, only the larger `.pth`."""
    done = tmp_path / "done"
    done.mkdir()
    args = [str(src), "--to", TARGET, "--heads", "2", "--no-verify", "--format", "vim"]
    assert main([*args, "--out", str(done / "v.safetensors")]) == 0
    weights, pth = (done / "v.safetensors").stat().st_size, (done / "v.pth").stat().st_size
    assert pth > weights + 1024
    if fails == "v.safetensors":
        args, limit = args[:-2], 4096
    else:
        limit = weights + 512
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _SIZE_LIMITED, str(limit), *args, "--out", str(out_dir / "v.safetensors")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr) == (1, f"error: {out_dir / fails}: cannot write (File too large)\n")
    assert os.listdir(out_dir) == []


# 11. Sources that are FIFOs, link loops or unreadable ------------------------------------------------------------


@pytest.fixture
def alarm():
    """Fail instead of hanging forever (opening a FIFO with no writer blocks)."""

    def ring(*_):
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.usefixtures("alarm")
def test_a_fifo_source_is_refused_at_once(tmp_path, capsys):
    fifo = tmp_path / "teacher.safetensors"
    os.mkfifo(fifo)
    code, err = _convert(capsys, fifo, "--out", str(tmp_path / "v.safetensors"))
    assert (code, err) == (1, f"error: {fifo}: {NOT_REGULAR}\n")
    assert sorted(os.listdir(tmp_path)) == ["teacher.safetensors"]


@pytest.mark.usefixtures("alarm")
def test_a_fifo_shard_is_refused_at_once(tmp_path, capsys):
    index = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "sharded", fmt="safetensors-sharded")
    shard = index.parent / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    code, err = _convert(capsys, index, "--out", str(tmp_path / "v.safetensors"))
    assert (code, err) == (1, f"error: {shard}: {NOT_REGULAR}\n")


def test_a_symbolic_link_loop_is_not_called_missing(tmp_path, capsys):
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    source = tmp_path / "a.safetensors"
    code, err = _convert(capsys, source, "--out", str(tmp_path / "v.safetensors"))
    assert (code, err) == (
        1,
        f"error: {source}: symbolic link loop (expected a checkpoint file or a model folder)\n",
    )


def test_a_source_in_a_folder_without_search_permission_is_one_line(tmp_path, src, capsys, monkeypatch):
    """stat fails as for a user who may not search the folder (the tests run as root, which may do anything)."""
    real = os.stat

    def stat_(path, *args, **kwargs):
        if os.fspath(path) == str(src):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_)
    code, err = _convert(capsys, src, "--out", str(tmp_path / "v.safetensors"))
    assert (code, err) == (1, f"error: {src}: cannot read: Permission denied\n")


def test_an_unreadable_source_is_one_line(tmp_path, src, capsys, monkeypatch):
    real = Path.open

    def guarded(self, *args, **kwargs):
        if self == src:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded)
    code, err = _convert(capsys, src, "--out", str(tmp_path / "v.safetensors"))
    assert (code, err) == (1, f"error: {src}: cannot read: Permission denied\n")
    assert sorted(os.listdir(tmp_path)) == ["teacher.safetensors"]
