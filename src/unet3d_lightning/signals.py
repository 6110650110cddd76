"""Stopping on a signal: a resumable ``last.ckpt`` from ``fit``, no temporary files from ``predict``.

The signals: SIGTERM, what ``timeout``, ``docker stop``, Kubernetes and SLURM send before SIGKILL; SIGINT, Ctrl+C;
SIGHUP, a closed terminal or a dropped SSH session; SIGUSR1, which job scripts and schedulers send as a warning
(under SLURM with Lightning's auto-requeue it stays Lightning's requeue signal, see below). Each ends the command with
a non-zero status, ``128 + signal`` as a shell reports a killed process (143 for SIGTERM, 130 for SIGINT, 129 for
SIGHUP, 138 for SIGUSR1), so that a job script never mistakes a stopped run for a finished one. A signal that the
process was started with ignored (``nohup`` ignores SIGHUP, a shell script's background job SIGINT) stays ignored.

- ``fit``, while training: the signal sets Lightning's own stop flag (``trainer.received_sigterm``, see
  ``lightning.pytorch.trainer.connectors.signal_connector``); Lightning raises ``SIGTERMException`` after the
  current training step (or validation batch), when the model, optimizer and loop counters agree. If a step has
  completed since ``last.ckpt`` was written, :class:`GracefulShutdown` writes it again there (atomically, as every
  checkpoint), and the command prints the path and the command that resumes from it. Under DDP the launcher sends
  the signal to every rank and Lightning broadcasts rank 0's flag before every step, so the ranks stop at the same
  step; rank 0 writes the checkpoint without a collective (a rank that had not stopped yet would otherwise wait in
  another collective and both would hang). Best effort: a rank blocked in a collective sees the signal only when
  it returns.
- Anywhere else (setup, sanity check, validate/test/predict): nothing is worth saving, so the signal raises
  :class:`Interrupted` at once in the main thread; Lightning's exception path runs every callback's
  ``on_exception``, where the prediction writer deletes its temporary file.
- A second signal while ``fit`` waits for its step to end stops at once, without saving: the step may be half done.
  Further signals during the clean-up are ignored (SIGKILL remains the last word).
- Under SLURM, when Lightning's ``SLURMEnvironment`` requeues (``auto_requeue``, the default for batch jobs), its
  requeue signal (SIGUSR1 unless configured otherwise) is left to Lightning, which installs its handler only where
  none is set: it saves ``hpc_ckpt_N.ckpt`` and requeues the job.

The messages go to standard error while it is open; after a hang-up, writing to the vanished terminal fails, and a
signal handler must not raise for that.

DataLoader worker processes inherit the handlers; there they leave stopping to the main process: a hang-up or
SIGUSR1 sent to the whole process group (as a terminal's hang-up is) is ignored by the workers, which the main
process ends when it stops; the other signals keep their default behaviour.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoints import load_file

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1")
                     if hasattr(signal, name))
# Signals a worker process leaves to the main process (a hang-up reaches the whole process group at once).
_MAIN_PROCESS_ONLY = tuple(getattr(signal, name) for name in ("SIGHUP", "SIGUSR1") if hasattr(signal, name))


def exit_status(signum: int) -> int:
    """The shell's status for a process ended by ``signum``: 128 + the signal number (SIGTERM 143, SIGINT 130,
    SIGHUP 129, SIGUSR1 138)."""
    return 128 + int(signum)


class Interrupted(BaseException):
    """A stop signal arrived where nothing is to be saved; derived from BaseException (like KeyboardInterrupt) so
    that no ``except Exception`` swallows it, but not from KeyboardInterrupt, whose Lightning handler exits 1."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def ignore_stop_signals_in_worker(worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM, SIGHUP and SIGUSR1, which a terminal's hang-up,
    SLURM's time limit or ``kill -- -PGID`` send to every process of the group or job at once. A worker killed by
    one makes PyTorch raise in the main process at once ("DataLoader worker ... is killed by signal"), before it can
    save; the main process stops the run and ends its workers, and a worker whose main process died ends itself."""
    for signum in (signal.SIGTERM, *_MAIN_PROCESS_ONLY):
        signal.signal(signum, signal.SIG_IGN)


def tell(text: str) -> None:
    """Print ``text`` on standard error if that is still open; never raises (after a hang-up the terminal is gone,
    and inside a signal handler a write interrupted mid-way raises RuntimeError)."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError, RuntimeError):
        pass


class GracefulShutdown(Callback):
    """Turns the :data:`STOP_SIGNALS` into a clean stop: during training, after the current step with ``last.ckpt``
    saved; elsewhere at once. :meth:`install` sets the signal handlers (main thread of the main process only).

    After the run, :attr:`signum` is the signal received (None if none) and :attr:`report` the lines to print.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.report: list[str] = []
        self._trainer: pl.Trainer | None = None
        self._training = False
        self._stopping = False
        self._start_step = 0
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------ signal handling
    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            if current == signal.SIG_IGN:
                continue  # ignored on purpose by whoever started the process (nohup, a script's background job)
            self._previous[signum] = current
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            # A forked DataLoader worker: the main process decides.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            if signum in _MAIN_PROCESS_ONLY:
                return  # dying here would crash the main process's loader before it could save
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if self._stopping:
            return  # already stopping: let the clean-up finish
        if self.signum is None and self._training and self._trainer is not None:
            self.signum = signum
            # Lightning's own flag: its loops raise SIGTERMException at the next step boundary (and broadcast it
            # to the other ranks under DDP). For SIGTERM Lightning's handler has set it already.
            self._trainer._signal_connector.received_sigterm = True
            tell(f"\n{name} received: stopping after the current training step (send it again to stop at once, "
                 "without saving)")
            return
        if self.signum is None:
            self.signum = signum
        self._stopping = True
        raise Interrupted(signum)

    # ------------------------------------------------------------------------------------------ callback hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._leave_requeue_signal_to_lightning(trainer)

    def _leave_requeue_signal_to_lightning(self, trainer: pl.Trainer) -> None:
        """Under SLURM with auto-requeue, Lightning saves and requeues the job on its requeue signal, but installs
        that handler (right after the setup hooks) only where no other handler is set: restore what was there."""
        environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        signum = environment.requeue_signal
        if signum is None or signum in (signal.SIGTERM, signal.SIGINT) or signum not in self._previous:
            return
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signum) != self._handle:
            return
        previous = self._previous.pop(signum)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._start_step = trainer.global_step
        self._training = True
        if self.signum is not None:  # arrived during the sanity check or setup: stop before the first step
            raise Interrupted(self.signum)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._training = False
        if not isinstance(exception, (SIGTERMException, Interrupted)):
            return
        self._stopping = True
        if isinstance(exception, SIGTERMException) and self.signum is None:
            self.signum = signal.SIGTERM  # Lightning's handler saw it (e.g. a signal sent to another rank)
        name = signal.Signals(self.signum).name
        if trainer.state.fn != "fit":
            fn = getattr(trainer.state.fn, "value", trainer.state.fn)
            self.report = [f"{fn} stopped by {name}"]
            return
        checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        saved = None
        clean = isinstance(exception, SIGTERMException)  # raised by Lightning between steps
        stepped = trainer.global_step not in (self._start_step, getattr(checkpoint, "_last_global_step_saved", -1))
        if clean and stepped and checkpoint is not None and checkpoint.save_last and checkpoint.dirpath:
            saved = checkpoint.last_model_path or os.path.join(
                checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION
            )
            checkpoint.last_model_path = saved  # part of the saved state, as when ModelCheckpoint saves it
            # trainer.save_checkpoint without its closing barrier: under DDP a rank that has not stopped yet would
            # wait in another collective, and both would hang. Rank 0 writes (atomically, temporary file + rename).
            state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            if trainer.is_global_zero:
                trainer.strategy.checkpoint_io.save_checkpoint(state, saved)
        last = saved or (checkpoint.last_model_path if checkpoint is not None else None)
        lines = [f"fit stopped by {name} at step {trainer.global_step} (epoch {trainer.current_epoch})"]
        if last and Path(last).is_file():
            step = _saved_step(last)
            behind = f"; the {trainer.global_step - step} step(s) since were not saved" if step < trainer.global_step else ""
            lines.append(f"  resumable checkpoint: {last}  (step {step}{behind})")
            config = Path(last).parent.parent / "config.yaml"
            lines.append(f"  resume with: unet3d fit --config {config if config.is_file() else 'CONFIG.yaml'} "
                         f"--ckpt_path {last}")
        else:
            lines.append("  no checkpoint was written (no training step had completed)")
        self.report = lines if trainer.is_global_zero else []


def _saved_step(path: str | Path) -> int:
    try:
        return int(load_file(path).get("global_step", -1))
    except Exception:  # noqa: BLE001 - only for the message
        return -1
