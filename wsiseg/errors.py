"""Errors of the environment that the command line reports with their own exit codes (torch-free)."""


class DeviceUnavailableError(RuntimeError):
    """The requested accelerator is not present on this machine."""


class SchedulerUnreachableError(ConnectionError):
    """The Dask scheduler of a batch cannot be reached."""
