"""Test-only start-up hook for subprocess runs of ``unet3d`` (tests put this directory on the subprocess's
PYTHONPATH; the product never loads it).

``UNET3D_TEST_KILL_AFTER_ROWS=N``: the process SIGKILLs itself right after its N-th finished-rows marker of a resumable
prediction (:class:`unet3d_lightning.prediction.resume.Progress`), a deterministic stand-in for ``kill -9`` or a node
failure in the middle of a prediction.
"""

import os
import sys

_AFTER = os.environ.get("UNET3D_TEST_KILL_AFTER_ROWS")

if _AFTER:
    import importlib.abc
    import importlib.machinery
    import signal

    class _KillAfterRows(importlib.abc.MetaPathFinder):
        target = "unet3d_lightning.prediction.resume"

        def find_spec(self, name, path, target=None):
            if name != self.target:
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                mark = module.Progress.mark
                count = [0]

                def mark_then_maybe_die(progress, z0, z1):
                    mark(progress, z0, z1)
                    count[0] += 1
                    if count[0] >= int(_AFTER):
                        os.kill(os.getpid(), signal.SIGKILL)

                module.Progress.mark = mark_then_maybe_die

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _KillAfterRows())
