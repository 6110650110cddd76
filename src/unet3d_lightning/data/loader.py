"""The DataLoader of the DataModule: :class:`PatchLoader` (resumable mid-epoch), its reader workers' set-up, and how
many reader workers a machine runs by default (:func:`default_num_workers`)."""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from ..signals import ignore_stop_signals_in_worker
from .sampling import ShardedSampler


def _lost_receiver(exc_type: type[BaseException], exc_traceback: Any) -> bool:
    """Whether an exception is a hand-over of shared memory to a main process that has stopped: a broken
    connection raised inside ``multiprocessing.resource_sharer``."""
    return issubclass(exc_type, (BrokenPipeError, ConnectionResetError, EOFError)) and any(
        frame.filename.endswith("resource_sharer.py") for frame in traceback.extract_tb(exc_traceback)
    )


def _quiet_lost_receiver(args: threading.ExceptHookArgs) -> None:
    """A worker hands its batches' shared memory to the main process from a background thread of
    ``multiprocessing.resource_sharer``; when the main process has stopped (a signal, an error elsewhere) that hand-
    over fails with a broken connection, which is no news to the user: only that case is dropped."""
    if _lost_receiver(args.exc_type, args.exc_traceback):
        return
    _default_thread_excepthook(args)


def _quiet_lost_receiver_sys(exc_type: type[BaseException], exc: BaseException, exc_traceback: Any) -> None:
    """The same for the errors ``resource_sharer``'s server loop catches itself and reports through
    ``sys.excepthook`` (a connection reset while it greets the stopped main process)."""
    if _lost_receiver(exc_type, exc_traceback):
        return
    _default_excepthook(exc_type, exc, exc_traceback)


_default_thread_excepthook = threading.excepthook
_default_excepthook = sys.excepthook


def _init_worker(worker_id: int) -> None:
    """Reader workers leave the stop signals to the main process (a signal sent to the whole process group would
    otherwise kill them first, and the run would die without its checkpoint); with ``seed_everything(workers=True)``
    they are seeded as Lightning's own worker init (which it adds only to loaders that have none) seeds them."""
    ignore_stop_signals_in_worker(worker_id)
    threading.excepthook = _quiet_lost_receiver
    sys.excepthook = _quiet_lost_receiver_sys
    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


class PatchLoader(DataLoader):
    """A DataLoader over a :class:`ShardedSampler` whose place in the epoch is saved in checkpoints.

    Lightning stores ``state_dict()`` in every checkpoint and, when a run resumes, calls ``load_state_dict()`` before
    it starts iterating. A run resumed from a checkpoint written in the middle of an epoch then trains on exactly the
    batches the interrupted run would have trained next (same order, same augmentations) instead of starting the
    epoch over; one written at the end of an epoch continues with the next epoch's order.

    Args:
        progress: returns ``(batches finished in the current epoch, batches per epoch)`` as the training loop
            counts them (batches the loader has produced may be more: workers and Lightning read ahead). Default
            None: the state records no progress and a resumed epoch starts over.
        Every other argument is :class:`torch.utils.data.DataLoader`'s. Only a loader whose ``sampler`` is a
        ShardedSampler has a state; Lightning rebuilds loaders with other samplers in some modes (prediction,
        ``overfit_batches``), and those save and restore nothing.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("worker_init_fn", _init_worker)
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, ShardedSampler):
            return {}
        done, per_epoch = self.progress() if self.progress is not None else (0, len(self))
        return {"epoch": self.sampler.epoch, "batches": int(done), "batches_per_epoch": int(per_epoch)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state or not isinstance(self.sampler, ShardedSampler):
            return
        epoch, done = int(state["epoch"]), int(state["batches"])
        if done >= state["batches_per_epoch"]:
            epoch, done = epoch + 1, 0  # saved at the end of an epoch: the next one starts from its beginning
        self.sampler.set_epoch(epoch)
        self.sampler.skip_next(done * (self.batch_size or 1))


def default_num_workers(local_processes: int = 1) -> int:
    """Reader processes per device that this machine can run beside the training or prediction processes:
    ``min(4, cores // local_processes - 1)``, never below 0.

    ``cores`` counts the cores this process may run on (``os.sched_getaffinity``: a SLURM job or container sees its
    own share, not the whole machine's), as PyTorch's and Lightning's DataLoader checks do, so the default never sets
    off their "too many workers" or "too few workers" warnings. One core per process is kept for the process
    itself; beyond 4 workers HDF5 reading rarely gains.

    Args:
        local_processes: processes on this node sharing the cores (devices under DDP). Default 1.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(0, min(4, cores // max(int(local_processes), 1) - 1))
