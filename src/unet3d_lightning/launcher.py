"""The ``unet3d`` command's entry point: standard streams, the CPU memory allocator's settings, then :func:`cli.main`,
then a quick exit.

This module imports nothing heavy, so that it can act before torch is loaded.

**Allocator** (``UNET3D_CPU_ALLOCATOR``). A 3D U-Net on the CPU allocates and frees tensors of tens to hundreds of
MiB in every forward pass. glibc's malloc serves each of them with a fresh ``mmap`` and returns it on ``free``, so
every batch page-faults all of its activations in again, 4 KiB at a time, and the kernel zeroes each page: on the
benchmark machine that system time was a third of the network's time. Tools commonly preload jemalloc or tcmalloc
(``LD_PRELOAD``) against it; ``unet3d`` uses PyTorch's own switch instead:

* ``hugepages`` (default): ``THP_MEM_ALLOC_ENABLE=1``, which PyTorch's CPU allocator reads once, at its first
  allocation: every tensor buffer of 2 MiB or more is then page-aligned and given ``madvise(MADV_HUGEPAGE)``, so the
  kernel maps it in 2 MiB pages instead of 4 KiB ones (on the benchmark machine 25 to 50 times fewer page faults);
  memory is still returned when freed (no growth of the peak). The variable is set in this process's environment
  before torch is imported; reader processes and DDP ranks inherit it. Used where the kernel's transparent huge
  pages are ``always`` or ``madvise``; elsewhere this is ``system``. (glibc's ``glibc.malloc.hugetlb=1`` tunable
  does the same for all of malloc's memory, but glibc reads it only at process start, so the process would have to
  re-execute itself; measured, it is no faster: ``benchmarks/bench_allocator.py``.)
* ``reuse``: ``mallopt`` keeps freed memory in the heap (no ``mmap`` per allocation, no trimming) and reuses it:
  faster still on some CPUs, but heap fragmentation raises the process's peak memory (by about the size of one
  forward pass's activations);
* ``system``: leave the allocator as it is.

Nothing is changed when the user set allocator variables of their own (``THP_MEM_ALLOC_ENABLE``, glibc's
``GLIBC_TUNABLES`` or ``MALLOC_*``) or preloads another allocator. ``unet3d_lightning.cli.main`` (the in-process API
used by scripts and tests) never changes the allocator.

**Output** (:func:`standard_streams`). A standard stream closed at start (``unet3d predict … >&-``, as daemons and
some schedulers start jobs) is given ``/dev/null``: the run completes, and no file the run opens can take the
descriptor of its standard output. A reader that goes away later (``unet3d predict … | head``, a closed terminal)
does not abort the run either: at the first failed write, ``/dev/null`` is put on the stream's descriptor, as the
Python documentation advises for SIGPIPE, so every later write goes there, from any stream object, from C code,
from the interpreter's last flush at exit (:class:`PipeSafe`); the run finishes its files.

**Exit.** Once a run has finished and its outputs are closed, tearing down the interpreter (thousands of modules
imported by torch and Lightning, and the garbage collector's passes over their objects) takes another second or so,
a quarter of a small prediction. ``unet3d`` ends the process without that teardown, after what the interpreter does
first: non-daemon threads are joined, exit handlers run, output is flushed.

**Wrapping tools.** Under a profiler, debugger or coverage tool (``python -m cProfile -m unet3d_lightning …``,
``coverage run``, ``pdb``), the quick exit would skip the tool's own work after the run (writing the profile or the
coverage data): it is done only when the process is the command itself (:func:`invoked_directly`); otherwise the
run returns and exits as any Python program. The allocator setting applies in both cases.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import platform
import sys
from typing import Any

ENV_VAR = "UNET3D_CPU_ALLOCATOR"
CHOICES = ("hugepages", "reuse", "system")
# PyTorch's CPU allocator (c10/core/impl/alloc_cpu.cpp) reads this once, at its first allocation; "1" or "0".
TORCH_HUGEPAGES_VAR = "THP_MEM_ALLOC_ENABLE"

_USER_SETTINGS = (TORCH_HUGEPAGES_VAR, "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                  "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def allocator_choice(environ: dict[str, str] | None = None) -> str:
    """The requested mode, one of :data:`CHOICES` (default ``"hugepages"``), from ``environ`` (default
    ``os.environ``). Raises ``ValueError`` for anything else."""
    env = os.environ if environ is None else environ
    choice = env.get(ENV_VAR, "").strip().lower() or "hugepages"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={env[ENV_VAR]!r} is not one of {', '.join(CHOICES)}")
    return choice


def user_controls_allocator(environ: dict[str, str] | None = None) -> bool:
    """Whether ``environ`` (default ``os.environ``) holds allocator settings of the user's own (PyTorch's huge-page
    switch, glibc variables or a preloaded allocator). A process started by ``unet3d`` (a reader process, a DDP
    rank) inherits the launcher's ``THP_MEM_ALLOC_ENABLE=1`` and counts it as set: it is kept as it is."""
    env = os.environ if environ is None else environ
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
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``) read from ``path`` (default:
    the kernel's setting), or None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def hugepages_supported() -> bool:
    """Whether ``madvise(MADV_HUGEPAGE)`` takes effect here: Linux with transparent huge pages ``always`` or
    ``madvise`` (with ``never`` the advice is ignored)."""
    return sys.platform.startswith("linux") and transparent_hugepages() in ("always", "madvise")


def configure_allocator() -> str:
    """Apply ``UNET3D_CPU_ALLOCATOR`` to this process; return the mode in effect: ``"hugepages"``, ``"reuse"``,
    ``"system"``, or ``"user"`` when the user's own settings win.

    Call it before torch is imported: PyTorch reads its huge-page switch at its first allocation, so once torch is
    loaded ``hugepages`` can no longer be known to apply and is ``"system"`` (nothing set)."""
    choice = allocator_choice()
    if choice == "system":
        return "system"
    if user_controls_allocator():
        return "user"
    if choice == "hugepages":
        if not hugepages_supported() or "torch" in sys.modules:
            return "system"
        os.environ[TORCH_HUGEPAGES_VAR] = "1"
        return "hugepages"
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
    """End the process now, after what the interpreter's own exit does first: non-daemon threads are joined
    (``threading``'s shutdown, which also stops ``concurrent.futures`` pools), exit handlers run (joining reader
    processes, closing loggers), streams are flushed, Python's and the C library's (what C code, such as oneDNN's
    verbose log, printed into a pipe or file); the interpreter's teardown is skipped.

    Args:
        status: the process's exit status.
    """
    try:
        _join_threads()
        atexit._run_exitfuncs()
    finally:
        _flush_standard_streams()
        _flush_c_streams()
        os._exit(status)


def _join_threads() -> None:
    threading = sys.modules.get("threading")
    if threading is None or threading.current_thread() is not threading.main_thread():
        return
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()  # what the interpreter calls at exit before the exit handlers
        return
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()


def _flush_c_streams() -> None:
    # The C library flushes its stdio buffers in exit(), which os._exit skips.
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def invoked_directly(caller: Any) -> bool:
    """Whether ``caller``, the frame that called :func:`run`, is the program itself: the console script, or
    ``python -m unet3d_lightning`` (only ``runpy`` around it), with no tracer, profiler or interactive prompt to
    come back to. Under ``cProfile``, ``pdb`` or ``coverage`` their frames are outside it, or their hooks set."""
    if sys.gettrace() is not None or sys.getprofile() is not None or sys.flags.inspect:
        return False
    monitoring = getattr(sys, "monitoring", None)  # Python >= 3.12: coverage's and profilers' newer hooks
    if monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6)):
        return False
    if caller is None or caller.f_code.co_name != "<module>" or caller.f_globals.get("__name__") != "__main__":
        return False
    outer = caller.f_back
    while outer is not None:
        if outer.f_globals.get("__name__") != "runpy":
            return False
        outer = outer.f_back
    return True


_STANDARD_STREAMS = ((0, "stdin", os.O_RDONLY, "r"), (1, "stdout", os.O_WRONLY, "w"), (2, "stderr", os.O_WRONLY, "w"))


def standard_streams() -> None:
    """Give each standard descriptor (0, 1, 2) that is closed ``/dev/null``, and a Python stream where there is
    none; then wrap standard output and error in :class:`PipeSafe`.

    With descriptor 1 closed, the next file the run opens (a checkpoint, an output volume) would get it, and whatever
    a library or a child process prints would land in that file."""
    for fd, name, flags, mode in _STANDARD_STREAMS:
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, flags)
            except OSError:
                continue
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            else:
                os.set_inheritable(fd, True)  # os.open's descriptors are closed on exec; child processes need it
        if getattr(sys, name) is None:
            buffering = 1 if fd == 2 else -1  # line-buffered standard error, as Python's own
            stream = open(fd, mode, buffering=buffering, errors="backslashreplace", closefd=False)  # noqa: SIM115
            setattr(sys, name, stream)
            if getattr(sys, f"__{name}__") is None:
                setattr(sys, f"__{name}__", stream)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, PipeSafe):
            setattr(sys, name, PipeSafe(stream))


# A write fails with these once the reader has gone: a closed pipe, a hung-up terminal (EIO).
_READER_GONE = (errno.EPIPE, errno.EIO)


class PipeSafe:
    """A stream that stops writing, instead of raising, once its reader has gone away.

    ``unet3d predict … | head`` closes the pipe after a few lines, a dropped SSH session the terminal; Python then
    raises ``BrokenPipeError`` (or an ``OSError`` EIO) at the next message (from Lightning, the progress bar,
    anywhere), which would abort the run and lose its outputs. Through this wrapper the run goes on and finishes its
    files; what it would have printed is dropped. At the first such failure ``/dev/null`` is duplicated onto the
    stream's descriptor (the Python documentation's advice for SIGPIPE): what is still buffered, writes by other
    objects on the same descriptor and the interpreter's flush at exit then succeed instead of failing again.

    Every way of writing through it is guarded: ``write``, ``writelines``, ``flush``, ``close`` and the binary
    ``buffer`` beneath a text stream (itself wrapped); everything else is the wrapped stream's.

    Args:
        stream: the text or binary stream to wrap (``sys.stdout``, ``sys.stderr``, their ``buffer``).
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._buffer: PipeSafe | None = None
        self.broken = False

    def _guarded(self, method: str, *args: Any) -> Any:
        """``stream.method(*args)``; None, once the reader has gone (this call's failure, or an earlier one)."""
        if self.broken:
            return None
        try:
            return getattr(self._stream, method)(*args)
        except OSError as err:
            if err.errno not in _READER_GONE:
                raise
            self._reader_gone()
            return None

    def write(self, data: Any) -> int:
        written = self._guarded("write", data)
        if written is not None:
            return written
        return memoryview(data).nbytes if isinstance(data, (bytes, bytearray, memoryview)) else len(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:  # line by line, so that a failure part-way drops only the rest
            self.write(line)

    def flush(self) -> None:
        self._guarded("flush")

    def close(self) -> None:
        self._guarded("flush")  # what close would flush first, and fail on
        try:
            self._stream.close()
        except OSError as err:
            if err.errno not in _READER_GONE:
                raise

    @property
    def buffer(self) -> PipeSafe:
        """The binary stream beneath a text stream, guarded the same way (``AttributeError`` if there is none)."""
        if self._buffer is None:
            self._buffer = PipeSafe(self._stream.buffer)
        return self._buffer

    def _reader_gone(self) -> None:
        self.broken = True
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
        except (OSError, ValueError, AttributeError):
            return  # not a descriptor (or no /dev/null): dropping the writes here is all there is to do
        try:
            os.dup2(null, fd)
        except OSError:
            return
        finally:
            os.close(null)
        try:
            self._stream.flush()  # what the failed write left in the buffer goes to /dev/null now
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def run() -> None:
    """``unet3d``: see the module docstring. Exceptions other than ``SystemExit`` end as Python would end them
    (traceback, status 1, full teardown)."""
    standard_streams()
    direct = invoked_directly(sys._getframe(1))
    try:
        configure_allocator()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if sys.argv[1:2] == ["evaluate"]:
        # Reads files and computes metrics only: without torch and Lightning it starts in a fraction of the time.
        from .evaluate import main as evaluate_main

        def main() -> None:
            evaluate_main(sys.argv[2:])
    else:
        from .cli import main

    if not direct:
        main()  # the tool around the run (profiler, coverage, debugger) finishes its work after it returns
        return
    try:
        main()
    except SystemExit as done:
        quick_exit(exit_status(done.code))
    quick_exit(0)


if __name__ == "__main__":
    run()
