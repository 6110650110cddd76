"""The ``unet3d`` entry point: allocator settings (PyTorch's huge pages, heap reuse), quick exit, output streams."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from unet3d_lightning import launcher


def _env(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", launcher.ENV_VAR, launcher.TORCH_HUGEPAGES_VAR, "LD_PRELOAD")
           and not k.startswith("MALLOC_")}
    for key, value in changes.items():
        if value is not None:
            env[key] = value
    return env


def _python(code: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          check=check, timeout=120)


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
    assert launcher.user_controls_allocator({"THP_MEM_ALLOC_ENABLE": "0"})
    assert not launcher.user_controls_allocator({"LD_PRELOAD": "/opt/libfoo.so"})
    assert not launcher.user_controls_allocator({"UNET3D_CPU_ALLOCATOR": "hugepages"})


def test_transparent_hugepage_mode_is_read(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert launcher.transparent_hugepages(str(setting)) == "madvise"
    setting.write_text("always madvise [never]\n")
    assert launcher.transparent_hugepages(str(setting)) == "never"
    assert launcher.transparent_hugepages(str(tmp_path / "missing")) is None


# The unet3d command as its console script runs it, the CLI replaced by a stand-in that reports what the run sees:
# its process id, PyTorch's huge-page switch when torch was first imported, and the page faults of filling a new
# 64 MiB tensor (16 384 pages of 4 KiB; 32 huge pages). A re-executed process would print "started" twice.
_COMMAND = """
    import os, sys, types
    print("started", os.getpid(), flush=True)
    seen = {}
    class WatchTorchImport:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and "switch" not in seen:
                seen["switch"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
            return None
    sys.meta_path.insert(0, WatchTorchImport())
    def main():
        import resource, torch
        def fill():
            torch.empty(16 << 20).fill_(1.0)  # 64 MiB of float32, freed at once
        fill()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fill()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print("main", os.getpid(), seen["switch"], faults, flush=True)
    cli = types.ModuleType("unet3d_lightning.cli")
    cli.main = main
    sys.modules["unet3d_lightning.cli"] = cli
    sys.argv = ["unet3d", "predict"]
    from unet3d_lightning.launcher import run
    run()
"""
_PAGES_64_MIB = (64 << 20) // resource.getpagesize()


def _command(env: dict[str, str]) -> tuple[str, str, int]:
    """Run :data:`_COMMAND`, check that it started once and ran once, in one process; return (process id, the
    switch as torch was imported, page faults)."""
    result = _python(_COMMAND, env)
    lines = result.stdout.splitlines()
    started = [line.split() for line in lines if line.startswith("started ")]
    ran = [line.split() for line in lines if line.startswith("main ")]
    assert len(started) == 1 and len(ran) == 1, result.stdout + result.stderr  # one start, one run: no re-execution
    assert ran[0][1] == started[0][1]  # the same process
    return ran[0][1], ran[0][2], int(ran[0][3])


def test_command_turns_on_pytorchs_huge_pages_before_torch_is_imported_in_the_same_process():
    _, switch, faults = _command(_env())
    if launcher.hugepages_supported():
        assert switch == "1"
        assert faults < _PAGES_64_MIB // 10, faults  # PyTorch honoured it: 2 MiB pages
    else:
        assert switch == "None"


@pytest.mark.parametrize("env, switch", [
    ({launcher.TORCH_HUGEPAGES_VAR: "0"}, "0"),  # the user's own setting, kept, not overridden
    ({launcher.ENV_VAR: "system"}, "None"),
    ({launcher.ENV_VAR: "reuse"}, "None"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, "None"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "None"),
])
def test_users_setting_or_another_mode_leaves_pytorchs_switch_alone(env, switch):
    _, seen, faults = _command(_env(**env))
    assert seen == switch
    if launcher.transparent_hugepages() == "madvise" and env.get(launcher.ENV_VAR) != "reuse":
        assert faults > _PAGES_64_MIB // 2, faults  # 4 KiB pages: no huge pages asked for


def test_switch_is_not_set_once_torch_is_imported_and_processes_of_the_run_keep_it():
    out = _python("""
        import os, subprocess, sys
        from unet3d_lightning import launcher
        print(launcher.configure_allocator(), os.environ.get("THP_MEM_ALLOC_ENABLE"))
        # a reader process or a DDP rank started by the run: the inherited switch counts as set, and stays
        subprocess.run([sys.executable, "-c", "import os; from unet3d_lightning import launcher; "
                        "print(launcher.configure_allocator(), os.environ.get('THP_MEM_ALLOC_ENABLE'))"])
    """, _env()).stdout.split()
    late = _python("""
        import os, torch
        from unet3d_lightning import launcher
        print(launcher.configure_allocator(), os.environ.get("THP_MEM_ALLOC_ENABLE"))
    """, _env()).stdout.split()
    if launcher.hugepages_supported():
        assert out == ["hugepages", "1", "user", "1"]
    else:
        assert out == ["system", "None", "system", "None"]
    # PyTorch reads the switch at its first allocation: after `import torch` that may have happened already.
    assert late == ["system", "None"]


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


def test_quick_exit_flushes_what_c_code_printed():
    """C stdio buffers output into a pipe or file; the C library flushes it in exit(), which os._exit skips."""
    result = _python("""
        import ctypes
        from unet3d_lightning import launcher
        ctypes.CDLL(None).printf(b"printed by C code\\n")
        launcher.quick_exit(0)
    """, {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}, check=False)  # it unbuffers C's stdout too
    assert result.returncode == 0, result.stderr
    assert result.stdout == "printed by C code\n"


def _vanished_reader() -> tuple[int, object]:
    read, write = os.pipe()
    os.close(read)  # the reader went away (`| head`)
    return write, os.fdopen(write, "w")


@pytest.mark.parametrize("path", ["writelines", "buffer", "close"])
def test_every_write_path_survives_a_vanished_reader(path):
    fd, stream = _vanished_reader()
    safe = launcher.PipeSafe(stream)
    if path == "writelines":
        safe.writelines(["lost\n"] * 20_000)  # more than the buffer holds: the write itself fails
    elif path == "buffer":
        assert safe.buffer.write(b"lost\n" * 20_000) == 100_000
        safe.buffer.flush()
        assert safe.buffer.broken
    else:
        safe.write("still in the buffer")
        safe.close()  # the flush inside close meets the closed pipe
        assert stream.closed
        return
    assert os.fstat(fd).st_rdev == os.stat(os.devnull).st_rdev  # later writes, from anywhere, go to /dev/null
    assert os.write(fd, b"later") == 5
    stream.close()


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
