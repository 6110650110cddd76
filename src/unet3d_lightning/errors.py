"""The project's user-facing error type."""


class ConfigurationError(ValueError):
    """A mistake in the user's configuration or input data, with a one-sentence message saying what to change.

    The ``unet3d`` command prints these as a single ``error:`` line (no traceback) and exits with status 2.
    """
