"""Errors a user can act on. Each message names the file, tensor or field at fault."""


class MoetierError(Exception):
    """Base class for errors raised by moetier."""


class ConfigError(MoetierError, ValueError):
    """A model folder's config.json is missing, malformed or unsupported."""


class CheckpointError(MoetierError, ValueError):
    """A weight file is missing, truncated or holds a tensor of the wrong shape."""


class RequestError(MoetierError, ValueError):
    """A request cannot be served as given (e.g. the prompt is longer than the context)."""


class TaskError(MoetierError, ValueError):
    """An evaluation task file is missing or has a malformed line."""


class BenchError(MoetierError, ValueError):
    """A benchmark cannot run as asked: a bad workload file, an unknown hardware name, a bad option."""


class DiskFullError(MoetierError, OSError):
    """A write ran out of disk space; the message says how much was needed and how much is free."""
