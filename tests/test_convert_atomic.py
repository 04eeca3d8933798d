"""A conversion that fails, is interrupted or is killed mid-write leaves no output and no temp file; one stopped while
its files are moved into place leaves them all or none (or, after SIGKILL, what the next run undoes)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.cli import main
from tmconvert.converter.convert import engine
from tmconvert.converter.convert.engine import ConvertRequest, convert
from tmconvert.converter.modelfile.files import AtomicFile
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.vim import VimConfig

TARGET = "vim-test-atomic"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    return write_checkpoint(make_vit_state_dict(SMALL, seed=0), folder / "teacher.safetensors")


@pytest.fixture
def tiny_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register(TARGET, VimConfig(embed_dim=16, depth=3, d_state=4))


def _failing_stream(exc: BaseException, after: int):
    real = engine.iter_target_tensors

    def stream(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == after:
                raise exc
            yield item

    return stream


@pytest.mark.usefixtures("tiny_target")
@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_exception_during_write_leaves_nothing(tmp_path, src, monkeypatch, exc):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(engine, "iter_target_tensors", _failing_stream(exc, after=5))
    with pytest.raises(type(exc)):
        convert(ConvertRequest(source=src, target=TARGET, out=out_dir / "v.safetensors", num_heads=2, format="vim"))
    assert os.listdir(out_dir) == []


@pytest.mark.usefixtures("tiny_target")
def test_ctrl_c_at_the_cli_exits_130_and_leaves_nothing(tmp_path, src, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(engine, "iter_target_tensors", _failing_stream(KeyboardInterrupt(), after=2))
    assert main([str(src), "--to", TARGET, "--heads", "2", "--out", str(out_dir / "v.safetensors")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert os.listdir(out_dir) == []


def test_overwrite_is_all_or_nothing(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    handle = AtomicFile(target, overwrite=True)
    handle.file.write(b"new data")
    handle.discard()
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    handle = AtomicFile(target, overwrite=True)
    handle.file.write(b"new data")
    handle.commit()
    assert target.read_bytes() == b"new data" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.usefixtures("tiny_target")
def test_without_o_tmpfile_a_hidden_temp_file_is_cleaned_up(tmp_path, src, monkeypatch):
    monkeypatch.delattr(os, "O_TMPFILE")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real = engine.iter_target_tensors
    seen: list[list[str]] = []

    def watching(*args, **kwargs):
        for item in real(*args, **kwargs):
            seen.append(os.listdir(out_dir))
            yield item

    monkeypatch.setattr(engine, "iter_target_tensors", watching)
    out = out_dir / "v.safetensors"
    convert(ConvertRequest(source=src, target=TARGET, out=out, num_heads=2))
    assert any(name.startswith(".v.safetensors.") and name.endswith(".tmp") for name in seen[0])  # the fallback ran
    assert sorted(os.listdir(out_dir)) == ["v.config.json", "v.safetensors"]
    monkeypatch.setattr(engine, "iter_target_tensors", _failing_stream(RuntimeError("boom"), after=3))
    with pytest.raises(RuntimeError):
        convert(ConvertRequest(source=src, target=TARGET, out=out_dir / "w.safetensors", num_heads=2))
    assert sorted(os.listdir(out_dir)) == ["v.config.json", "v.safetensors"]


# A real process, stopped by a signal while the output file is half written.
_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from tmconvert.converter.convert import engine
    from tmconvert.converter.modelfile import files
    from tmconvert.converter.cli import main
    from tmconvert.models.registry import register
    from tmconvert.models.vim import VimConfig

    register("vim-test-atomic", VimConfig(embed_dim=16, depth=3, d_state=4))
    files.WRITE_BUFFER = 0  # unbuffered: the bytes streamed so far are in the file when the signal comes
    out_dir = os.path.dirname(sys.argv[-1])
    real = engine.iter_target_tensors

    def written_so_far():
        sizes = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(out_dir):
                    sizes.append(os.fstat(int(fd)).st_size)
            except OSError:
                pass
        return max(sizes, default=0)

    def slow(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            yield item
            if i == 10:
                print("WRITING", written_so_far(), flush=True)
                time.sleep(60)

    engine.iter_target_tensors = slow
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["KILL", "INT", "TERM"])
def test_killed_process_leaves_no_output_and_no_temp_file(tmp_path, src, sig):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = [str(src), "--to", TARGET, "--heads", "2", "--format", "vim", "--out", str(out_dir / "v.safetensors")]
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "WRITING", proc.stderr.read()
        assert int(line[1]) > 1000  # header and ten tensors are on disk, in a file that has no name yet
        assert os.listdir(out_dir) == []
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == (130 if sig == signal.SIGINT else -sig)
    assert os.listdir(out_dir) == []


# A real process, stopped by a signal at the commit: a companion (`.pth` or sidecar) is in place, the weights not yet.
_COMMIT_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from tmconvert.converter.modelfile import files
    from tmconvert.converter.cli import main
    from tmconvert.models.registry import register
    from tmconvert.models.vim import VimConfig

    register("vim-test-atomic", VimConfig(embed_dim=16, depth=3, d_state=4))
    weights = sys.argv[sys.argv.index("--out") + 1]
    stem = weights.removesuffix(".safetensors")
    companions = [stem + ".config.json", stem + ".pth"]

    def identity(path):
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None
        return info.st_dev, info.st_ino

    before = {path: identity(path) for path in [weights, *companions]}
    real = files._fsync_dir

    def pausing(folder):  # called once each file is moved into place
        real(folder)
        if identity(weights) == before[weights] and any(identity(p) != before[p] for p in companions):
            print("COMMITTING", flush=True)
            time.sleep(60)

    files._fsync_dir = pausing
    sys.exit(main(sys.argv[1:]))
    """
)


def _stop_at_commit(args: list[str], sig: signal.Signals) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", _COMMIT_DRIVER, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "COMMITTING", proc.stderr.read()
        proc.send_signal(sig)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_SIGNALS = pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["KILL", "INT", "TERM", "HUP"]
)


@pytest.mark.usefixtures("tiny_target")
@_SIGNALS
def test_a_kill_at_the_commit_leaves_nothing_a_rerun_trips_on(tmp_path, src, sig):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = [str(src), "--to", TARGET, "--heads", "2", "--format", "vim", "--no-verify"]
    args += ["--out", str(out_dir / "v.safetensors")]
    assert _stop_at_commit(args, sig) == (130 if sig == signal.SIGINT else -sig)
    if sig != signal.SIGKILL:  # undone by the process itself
        assert os.listdir(out_dir) == []
    assert main(args) == 0  # no --force: after SIGKILL, the rerun undoes the commit cut short first
    assert sorted(os.listdir(out_dir)) == ["v.config.json", "v.pth", "v.safetensors"]


@pytest.mark.usefixtures("tiny_target")
@_SIGNALS
def test_a_kill_while_replacing_outputs_keeps_the_old_ones_together(tmp_path, src, sig, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = [str(src), "--to", TARGET, "--heads", "2", "--format", "vim", "--no-verify"]
    args += ["--out", str(out_dir / "v.safetensors")]
    assert main(args) == 0
    old = {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)}
    assert _stop_at_commit([*args, "--seed", "1", "--force"], sig) == (130 if sig == signal.SIGINT else -sig)
    if sig != signal.SIGKILL:
        assert {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)} == old
    capsys.readouterr()
    assert main(args) == 1  # the old outputs are back, complete: replacing them needs --force again
    assert "v.safetensors: exists; pass --force to overwrite" in capsys.readouterr().err
    assert {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)} == old


@pytest.mark.usefixtures("tiny_target")
def test_a_commit_in_progress_elsewhere_is_not_undone(tmp_path, src, capsys):
    out = tmp_path / "v.safetensors"
    record = os.open(tmp_path / ".v.safetensors.commit", os.O_RDWR | os.O_CREAT)
    fcntl.flock(record, fcntl.LOCK_EX)  # another process, between placing the companions and the weights
    try:
        assert main([str(src), "--to", TARGET, "--heads", "2", "--out", str(out)]) == 1
    finally:
        os.close(record)
    err = capsys.readouterr().err
    assert (
        err
        == f"error: {out}: another process is writing it (its commit record {tmp_path}/.v.safetensors.commit is held)\n"
    )
    assert sorted(os.listdir(tmp_path)) == [".v.safetensors.commit", "src"]
