"""The ``unet3d`` command's entry point: the CPU memory allocator's settings, then :func:`cli.main`, then a quick exit.

This module imports nothing heavy, so that it can act before torch is loaded.

**Allocator** (``UNET3D_CPU_ALLOCATOR``). A 3D U-Net on the CPU allocates and frees tensors of tens to hundreds of
MiB in every forward pass. glibc's malloc serves each of them with a fresh ``mmap`` and returns it on ``free``, so
every batch page-faults all of its activations in again, 4 KiB at a time, and the kernel zeroes each page: on the
benchmark machine that system time was a third of the network's time. Tools commonly preload jemalloc or tcmalloc
(``LD_PRELOAD``) against it; ``unet3d`` gets the same from glibc itself:

* ``hugepages`` (default): glibc's ``glibc.malloc.hugetlb=1`` tunable, which asks for transparent huge pages for
  malloc's memory: 2 MiB pages, 512 times fewer faults, memory still returned when freed (no growth of the peak).
  glibc reads tunables only at process start, so ``unet3d`` re-executes itself once, at once, with
  ``GLIBC_TUNABLES`` set (same process id, same arguments). Used where glibc ≥ 2.35 and the kernel's transparent
  huge pages are ``always`` or ``madvise``; elsewhere this is ``system``.
* ``reuse``: ``mallopt`` keeps freed memory in the heap (no ``mmap`` per allocation, no trimming) and reuses it:
  faster still on some CPUs, but heap fragmentation raises the process's peak memory (by about the size of one
  forward pass's activations);
* ``system``: leave the allocator as it is.

Nothing is changed when the user set glibc's variables (``GLIBC_TUNABLES``, ``MALLOC_*``) or preloads another
allocator. ``unet3d_lightning.cli.main`` (the in-process API used by scripts and tests) never changes the allocator.

**Output.** A closed pipe on standard output or error (``unet3d predict … | head``) no longer aborts the run:
the messages are dropped, the run finishes its files (:class:`PipeSafe`).

**Exit.** Once a run has finished and its outputs are closed, tearing down the interpreter (thousands of modules
imported by torch and Lightning) takes another second or two. ``unet3d`` runs the exit handlers, flushes its
output and ends the process without that teardown.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import platform
import sys
from typing import Any

ENV_VAR = "UNET3D_CPU_ALLOCATOR"
CHOICES = ("hugepages", "reuse", "system")
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"

_USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
# Set in the re-executed process: the allocator mode applied by the launcher (for the run's own report).
_APPLIED_VAR = "_UNET3D_ALLOCATOR_APPLIED"

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def allocator_choice(environ: dict[str, str] | None = None) -> str:
    """The requested mode, one of :data:`CHOICES`. Raises ``ValueError`` for anything else."""
    env = os.environ if environ is None else environ
    choice = env.get(ENV_VAR, "").strip().lower() or "hugepages"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={env[ENV_VAR]!r} is not one of {', '.join(CHOICES)}")
    return choice


def user_controls_allocator(environ: dict[str, str] | None = None) -> bool:
    """Whether the user chose allocator settings of their own (glibc variables or a preloaded allocator)."""
    env = os.environ if environ is None else environ
    if _APPLIED_VAR in env:
        return False  # GLIBC_TUNABLES is ours: set by the launcher before re-executing
    preload = env.get("LD_PRELOAD", "")
    return any(name in env for name in _USER_SETTINGS) or any(name in preload for name in _OTHER_ALLOCATORS)


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None for another C library or platform."""
    if not sys.platform.startswith("linux"):
        return None
    name, version = platform.libc_ver()
    if name != "glibc":
        return None
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def transparent_hugepages(path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``), or None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def hugepages_supported() -> bool:
    version = glibc_version()
    return version is not None and version >= (2, 35) and transparent_hugepages() in ("always", "madvise")


def configure_allocator(argv: list[str] | None = None) -> str:
    """Apply ``UNET3D_CPU_ALLOCATOR`` to this process; return the mode in effect (``"user"`` when the user's own
    settings win). For ``hugepages`` this re-executes the process (it does not return) unless already done."""
    choice = allocator_choice()
    if os.environ.get(_APPLIED_VAR):
        return os.environ[_APPLIED_VAR]
    if choice == "system":
        return "system"
    if user_controls_allocator():
        return "user"
    if choice == "hugepages":
        if not hugepages_supported():
            return "system"
        env = dict(os.environ, GLIBC_TUNABLES=HUGEPAGES_TUNABLE, **{_APPLIED_VAR: "hugepages"})
        command = list(sys.orig_argv) if argv is None else argv
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, command, env)
        except OSError:
            return "system"  # cannot re-execute (unusual sandboxes): run as is
    libc = _glibc()
    if libc is None:
        return "system"
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap, not one mmap each
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of freed heap for the next batch
    libc.mallopt(M_ARENA_MAX, 2)  # fewer per-thread heaps: less memory held in several places
    return "reuse"


def _glibc() -> ctypes.CDLL | None:
    if glibc_version() is None:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def exit_status(code: object) -> int:
    """The process exit status for ``SystemExit(code)``, as Python computes it (printing a message code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF if code >= 0 else code % 256
    print(code, file=sys.stderr)
    return 1


def quick_exit(status: int) -> None:
    """End the process now: exit handlers (joining reader processes, closing loggers) run, streams are flushed,
    the interpreter's teardown is skipped."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)


class PipeSafe:
    """A text stream that stops writing, instead of raising, once its reader has gone away.

    ``unet3d predict … | head`` closes the pipe after a few lines; Python then raises ``BrokenPipeError`` at the
    next message (from Lightning, the progress bar, anywhere), which would abort the run and lose its outputs. Through
    this wrapper the run goes on and finishes its files; what it would have printed is dropped."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self.broken = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def run() -> None:
    """``unet3d``: see the module docstring. Exceptions other than ``SystemExit`` end as Python would end them
    (traceback, status 1, full teardown)."""
    try:
        configure_allocator()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout = PipeSafe(sys.stdout)
    sys.stderr = PipeSafe(sys.stderr)
    from .cli import main

    try:
        main()
    except SystemExit as done:
        quick_exit(exit_status(done.code))
    quick_exit(0)


if __name__ == "__main__":
    run()
