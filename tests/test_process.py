"""The ``unet3d`` process as a Unix program: closed or vanished standard streams, wrapping tools (profilers,
debuggers) that must see the run end normally, and the stop signals of terminals and job scripts (SIGHUP, SIGUSR1)."""

from __future__ import annotations

import errno
import os
import pstats
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from test_cli import subprocess_env, unet3d_command
from test_signals import global_step, long_fit, wait_for  # noqa: F401 - long_fit is a fixture
from unet3d_lightning import launcher, signals
from unet3d_lightning.cli import main


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def _python(code: str, *args: str, shell_redirect: str = "", **kwargs) -> subprocess.CompletedProcess:
    """``python -c code args`` with an optional shell redirection (``>&-`` closes standard output)."""
    command = [sys.executable, "-c", textwrap.dedent(code), *args]
    if shell_redirect:
        command = ["/bin/sh", "-c", f'exec "$@" {shell_redirect}', "sh", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=subprocess_env(), **kwargs)


@pytest.fixture
def predict_setup(tmp_path):
    """A tiny model checkpoint and a volume; returns the predict arguments (output under ``tmp_path/out``)."""
    from unet3d_lightning.module import UNet3DModule

    module = UNet3DModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "m.ckpt")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = np.random.default_rng(0).random((8, 32, 32), dtype=np.float32)
    return ["predict", "--ckpt_path", str(tmp_path / "m.ckpt"), "--data.predict_paths", str(tmp_path / "v.h5"),
            "--data.predict_patch_shape", "[8,32,32]", "--trainer.accelerator", "cpu",
            "--prediction.output_dir", str(tmp_path / "out")]


def _prediction_shape(tmp_path: Path) -> tuple[int, ...]:
    with h5py.File(tmp_path / "out" / "v_predictions.h5", "r") as f:
        return f["predictions"].shape


# ------------------------------------------------------------------------------------------ standard streams
def test_closed_standard_descriptors_get_dev_null_before_any_file_can_take_them(tmp_path):
    """With descriptor 1 closed, the next file opened would become standard output: prints would land in it."""
    result = _python("""
        import os, sys
        from unet3d_lightning import launcher
        launcher.standard_streams()
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
        print("to standard output")
        sys.stdout.flush()
        os.write(1, b"from C code\\n")
        print("file descriptor", fd, file=sys.stderr)
    """, str(tmp_path / "data.bin"), shell_redirect=">&- <&-")
    assert result.returncode == 0, result.stderr
    assert int(result.stderr.split("file descriptor")[1]) > 2
    assert (tmp_path / "data.bin").read_bytes() == b""
    assert os.stat("/dev/null").st_rdev != 0  # the descriptor went to the null device, not to a file


def test_vanished_reader_puts_dev_null_on_the_descriptor():
    """After the first failed write, the descriptor itself is /dev/null: writes by other objects on it (C code,
    the original stream, the interpreter's final flush) succeed instead of failing again."""
    read, write = os.pipe()
    os.close(read)  # the reader went away (`| head`)
    stream = os.fdopen(write, "w")
    safe = launcher.PipeSafe(stream)
    assert safe.write("lost " * 10_000) == 50_000  # more than the buffer: the write itself fails
    safe.flush()
    assert safe.broken
    assert os.fstat(write).st_rdev == os.stat(os.devnull).st_rdev
    assert os.write(write, b"later") == 5
    stream.write("also lost")
    stream.close()  # the flush at close goes to /dev/null too


def test_hung_up_terminal_is_a_vanished_reader_but_other_errors_still_raise():
    class Failing:
        def __init__(self, code):
            self.code = code

        def write(self, text):
            raise OSError(self.code, os.strerror(self.code))

        def flush(self):
            raise OSError(self.code, os.strerror(self.code))

    hung_up = launcher.PipeSafe(Failing(errno.EIO))  # what a write to a terminal gives after SIGHUP
    assert hung_up.write("message\n") == 8
    hung_up.flush()
    assert hung_up.broken
    with pytest.raises(OSError, match="No space left"):
        launcher.PipeSafe(Failing(errno.ENOSPC)).write("a full disk is an error\n")


@pytest.mark.slow
@pytest.mark.parametrize("redirect, allocator", [(">&-", "hugepages"), (">&-", "system"), ("2>&-", "hugepages")])
def test_predict_with_a_closed_standard_stream_completes(predict_setup, tmp_path, redirect, allocator):
    """``unet3d predict … >&-`` (as daemons and some schedulers start jobs): the run writes its output, status 0."""
    env = {**subprocess_env(), launcher.ENV_VAR: allocator}
    result = subprocess.run(["/bin/sh", "-c", f'exec "$@" {redirect}', "sh", *unet3d_command(), *predict_setup],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert _prediction_shape(tmp_path) == (2, 8, 32, 32)
    if redirect == "2>&-":
        assert "predict finished: 1 volume(s)" in result.stdout


# ------------------------------------------------------------------------------------------ wrapping tools
def test_only_the_command_itself_counts_as_invoked_directly(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import sys\nfrom unet3d_lightning import launcher\n"
                      "print('direct', launcher.invoked_directly(sys._getframe(0)))\n")
    env = subprocess_env()

    def direct(*command: str) -> bool:
        out = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, input="c\n",
                             timeout=120, cwd=tmp_path).stdout
        return out.split("direct ")[1].split()[0] == "True"

    assert direct(str(script))
    assert direct("-m", "probe")
    assert not direct("-m", "cProfile", str(script))
    assert not direct("-m", "cProfile", "-m", "probe")
    assert not direct("-m", "trace", "--listfuncs", str(script))
    assert not direct("-m", "pdb", str(script))
    assert not launcher.invoked_directly(sys._getframe(0))  # called from a function: a program that goes on


def test_quick_exit_joins_threads_before_the_exit_handlers():
    """As the interpreter's exit does: non-daemon threads (and thread pools) finish, then the exit handlers run."""
    result = _python("""
        import atexit, concurrent.futures, threading, time
        from unet3d_lightning import launcher
        atexit.register(lambda: print("handler ran", flush=True))
        def late(what):
            time.sleep(0.3)
            print(what, "finished", flush=True)
        threading.Thread(target=late, args=("thread",)).start()
        concurrent.futures.ThreadPoolExecutor(1).submit(late, "pool task")
        launcher.quick_exit(3)
    """)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(lines[:2]) == ["pool task finished", "thread finished"]
    assert lines[2:] == ["handler ran"]


@pytest.mark.slow
def test_cprofile_writes_its_profile(predict_setup, tmp_path):
    """``python -m cProfile -o prof.out -m unet3d_lightning predict …``: the profiler's work after the run is done."""
    profile = tmp_path / "prof.out"
    result = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "unet3d_lightning",
                             *predict_setup], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _prediction_shape(tmp_path) == (2, 8, 32, 32)
    stats = pstats.Stats(str(profile)).stats
    runs = [calls[0] for (file, _, function), calls in stats.items()
            if function == "main" and file.endswith(os.path.join("unet3d_lightning", "cli.py"))]
    assert runs == [1]  # profiled, and run once


# ------------------------------------------------------------------------------------------ signals
def test_signals_ignored_at_start_stay_ignored():
    """``nohup`` starts the command with SIGHUP ignored, a shell script's background job with SIGINT ignored."""
    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        shutdown = signals.GracefulShutdown()
        shutdown.install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == shutdown._handle
        assert signal.getsignal(signal.SIGUSR1) == shutdown._handle
        shutdown.uninstall()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_slurm_requeue_signal_is_left_to_lightning():
    """Lightning installs its requeue handler only where none is set: the setup hook gives the signal back."""
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        def trainer(environment):
            return SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=environment))

        shutdown = signals.GracefulShutdown()
        shutdown.install()
        shutdown.setup(trainer(LightningEnvironment()), None, "fit")
        assert signal.getsignal(signal.SIGUSR1) == shutdown._handle  # no requeueing: SIGUSR1 stops the run
        shutdown.setup(trainer(SLURMEnvironment(auto_requeue=False)), None, "fit")
        assert signal.getsignal(signal.SIGUSR1) == shutdown._handle
        shutdown.setup(trainer(SLURMEnvironment()), None, "fit")
        assert signal.getsignal(signal.SIGUSR1) == saved[signal.SIGUSR1]
        assert signal.getsignal(signal.SIGTERM) == shutdown._handle
        shutdown.uninstall()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_stop_message_to_a_vanished_terminal_does_not_raise(monkeypatch):
    """SIGHUP after a dropped SSH session: stderr's terminal is gone (EIO); the handler still arms the stop."""
    class HungUp:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sys, "stderr", HungUp())
    shutdown = signals.GracefulShutdown()
    connector = SimpleNamespace(received_sigterm=False)
    shutdown._trainer = SimpleNamespace(_signal_connector=connector)
    shutdown._training = True
    shutdown._handle(signal.SIGHUP, None)
    assert connector.received_sigterm and shutdown.signum == signal.SIGHUP


def _start_fit(config: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in (env or subprocess_env()).items() if not k.startswith("SLURM_")}
    return subprocess.Popen([*unet3d_command(), "fit", "--config", str(config), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _stopped_step(err: str, name: str) -> int:
    return int(err.split(f"fit stopped by {name} at step ")[1].split()[0])


@pytest.mark.slow
def test_sighup_to_the_process_group_stops_fit_with_a_resumable_checkpoint(long_fit, tmp_path, capsys):
    """A dropped SSH session hangs up the whole process group, reader workers included: fit saves, exits 129."""
    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    process = _start_fit(long_fit, "--data.num_workers", "1")
    wait_for(lambda: last.exists() and global_step(last) >= 2, process, "first checkpoint")
    os.killpg(process.pid, signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == 128 + signal.SIGHUP == 129, err[-3000:]
    assert "SIGHUP received: stopping after the current training step" in err, err[-3000:]
    stopped = _stopped_step(err, "SIGHUP")
    assert global_step(last) == stopped, err[-3000:]
    assert f"resumable checkpoint: {last}  (step {stopped})" in err
    assert "Traceback" not in err, err[-3000:]

    target = stopped + 2 + stopped % 2  # the next validation but one, where last.ckpt is written again
    main(["fit", "--config", str(last.parent.parent / "config.yaml"), "--ckpt_path", str(last),
          "--trainer.max_steps", str(target)])
    captured = capsys.readouterr()
    assert f"fit finished: {target} steps" in captured.out, captured.err[-3000:]
    assert global_step(last) == target


@pytest.mark.slow
def test_sigusr1_outside_slurm_stops_fit_with_a_resumable_checkpoint(long_fit, tmp_path):
    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    process = _start_fit(long_fit)
    wait_for(lambda: last.exists() and global_step(last) >= 2, process, "first checkpoint")
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == 128 + signal.SIGUSR1 == 138, err[-3000:]
    stopped = _stopped_step(err, "SIGUSR1")
    assert global_step(last) == stopped, err[-3000:]
    assert f"resumable checkpoint: {last}  (step {stopped})" in err
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_reader_workers_stops_fit_with_a_resumable_checkpoint(long_fit, tmp_path):
    """SLURM's time limit and ``kill -- -PGID`` signal every process of the group: the reader workers must leave the
    stop to the main process (PyTorch's own worker handler would die and take the run down without a checkpoint)."""
    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    process = _start_fit(long_fit, "--data.num_workers", "1")
    wait_for(lambda: last.exists() and global_step(last) >= 2, process, "first checkpoint")
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == 128 + signal.SIGTERM == 143, err[-3000:]
    stopped = _stopped_step(err, "SIGTERM")
    assert global_step(last) == stopped, err[-3000:]
    assert "killed by signal" not in err and "Traceback" not in err, err[-3000:]
