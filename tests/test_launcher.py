"""The ``unet3d`` entry point: allocator settings (huge pages by re-executing, heap reuse), quick exit."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

import pytest

from unet3d_lightning import launcher


def _env(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", launcher.ENV_VAR, launcher._APPLIED_VAR, "LD_PRELOAD")
           and not k.startswith("MALLOC_")}
    for key, value in changes.items():
        if value is not None:
            env[key] = value
    return env


def _python(code: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          check=check, timeout=120)


# The child re-executes itself into a command that prints the tunables it was started with.
_REEXEC = """
    import os, sys
    from unet3d_lightning import launcher
    mode = launcher.configure_allocator(argv=[sys.executable, "-c", "import os; print('tunables', os.environ.get('GLIBC_TUNABLES'))"])
    print("not re-executed:", mode)
"""


def test_choice_is_validated():
    assert launcher.allocator_choice({}) == "hugepages"
    assert launcher.allocator_choice({launcher.ENV_VAR: " Reuse "}) == "reuse"
    with pytest.raises(ValueError, match="UNET3D_CPU_ALLOCATOR='fast' is not one of hugepages, reuse, system"):
        launcher.allocator_choice({launcher.ENV_VAR: "fast"})


def test_unknown_choice_is_one_error_line_before_anything_is_imported():
    result = subprocess.run([sys.executable, "-m", "unet3d_lightning", "predict", "--help"], capture_output=True,
                            text=True, env=_env(**{launcher.ENV_VAR: "fast"}), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: UNET3D_CPU_ALLOCATOR='fast' is not one of hugepages, reuse, system"
    ]


def test_user_settings_win():
    assert launcher.user_controls_allocator({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
    assert launcher.user_controls_allocator({"MALLOC_ARENA_MAX": "2"})
    assert launcher.user_controls_allocator({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert not launcher.user_controls_allocator({"LD_PRELOAD": "/opt/libfoo.so"})
    # The launcher's own GLIBC_TUNABLES (after re-executing) is not the user's.
    assert not launcher.user_controls_allocator({"GLIBC_TUNABLES": launcher.HUGEPAGES_TUNABLE,
                                                 launcher._APPLIED_VAR: "hugepages"})


def test_transparent_hugepage_mode_is_read(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert launcher.transparent_hugepages(str(setting)) == "madvise"
    setting.write_text("always madvise [never]\n")
    assert launcher.transparent_hugepages(str(setting)) == "never"
    assert launcher.transparent_hugepages(str(tmp_path / "missing")) is None


@pytest.mark.skipif(not launcher.hugepages_supported(), reason="needs glibc >= 2.35 and transparent huge pages")
def test_hugepages_reexecutes_once_with_the_tunable():
    result = _python(_REEXEC, _env())
    assert result.stdout.split("\n")[0] == f"tunables {launcher.HUGEPAGES_TUNABLE}"
    assert "not re-executed" not in result.stdout


@pytest.mark.parametrize("env", [
    {launcher.ENV_VAR: "system"},
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"},
    {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
    {launcher._APPLIED_VAR: "hugepages"},  # already re-executed: never again
])
def test_no_reexecution_when_told_or_done(env):
    result = _python(_REEXEC, _env(**env))
    assert "tunables" not in result.stdout
    assert "not re-executed:" in result.stdout


# Allocate and free a 64 MiB block twice and count the page faults of the second time: with the heap kept for
# reuse the memory is still mapped (hardly any faults); by default glibc unmaps it on free and faults it in again.
_FAULTS = """
    import ctypes, os, resource, sys
    from unet3d_lightning import launcher
    print("mode", launcher.configure_allocator())
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    def touch_and_free():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
    touch_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch_and_free()
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(launcher.glibc_version() is None, reason="glibc only")
def test_reuse_keeps_freed_memory_mapped():
    pages = (64 << 20) // resource.getpagesize()
    faults = {}
    for mode in ("reuse", "system"):
        out = _python(_FAULTS, _env(**{launcher.ENV_VAR: mode})).stdout.split()
        assert out[1] == mode
        faults[mode] = int(out[3])
    assert faults["reuse"] < pages // 10, faults
    assert faults["system"] > pages // 2, faults


def test_exit_status_follows_python():
    assert launcher.exit_status(None) == 0
    assert launcher.exit_status(0) == 0
    assert launcher.exit_status(2) == 2
    assert launcher.exit_status(143) == 143
    assert launcher.exit_status(256 + 3) == 3


def test_quick_exit_runs_exit_handlers_and_flushes():
    result = _python("""
        import atexit, sys
        from unet3d_lightning import launcher
        atexit.register(lambda: print("handler ran"))
        sys.stdout.write("buffered, no newline")
        launcher.quick_exit(3)
        print("never")
    """, _env(), check=False)
    assert result.returncode == 3
    assert result.stdout == "buffered, no newlinehandler ran\n"


def test_message_exit_prints_and_returns_one(capsys):
    assert launcher.exit_status("stopped: reason") == 1
    assert capsys.readouterr().err == "stopped: reason\n"


def test_pipe_safe_stream_drops_output_after_the_reader_left():
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def isatty(self):
            return False

    stream = launcher.PipeSafe(Closed())
    assert stream.write("lost\n") == 5
    stream.flush()
    assert stream.broken
    assert stream.isatty() is False  # everything else is the wrapped stream's


@pytest.mark.slow
def test_predict_piped_into_a_reader_that_stops_still_writes_its_output(tmp_path):
    """``unet3d predict … | head -1``: the pipe closes after the first line; the run must still finish its file."""
    import h5py
    import numpy as np
    import torch

    from unet3d_lightning.module import UNet3DModule

    module = UNet3DModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "m.ckpt")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = np.random.default_rng(0).random((8, 32, 32), dtype=np.float32)
    process = subprocess.Popen(
        [sys.executable, "-m", "unet3d_lightning", "predict", "--ckpt_path", "m.ckpt", "--data.predict_paths",
         "[v.h5]", "--data.predict_patch_shape", "[8,32,32]", "--prediction.output_dir", "out"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), text=True,
    )
    first = process.stdout.readline()
    process.stdout.close()  # as `head -1` does
    assert process.wait(timeout=300) == 0, first
    with h5py.File(tmp_path / "out" / "v_predictions.h5", "r") as f:
        assert f["predictions"].shape == (2, 8, 32, 32)
