"""The two ways a run ends early, each reported as one line by whoever called it.

UsageError: bad input, found before work where possible (exit status 2 from the CLI).
RunError: a run that started but cannot finish: memory, numerics, a foreign checkpoint (exit status 1).

Each subsystem raises its own subclass of one of them (SourceError, ModelError, NumericsError, ...), so
no layer translates another's errors: the CLI and the sweep catch these two and nothing else.
"""


class UsageError(ValueError):
    """Bad input; the message is one line saying what to change."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # nested library messages can carry newlines


class RunError(RuntimeError):
    """A run that started but cannot finish; the message is one line saying what to change."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Terminated(KeyboardInterrupt):
    """SIGTERM (from `timeout`, `docker stop`, a batch scheduler), handled exactly as Ctrl-C is."""


class MissingPackage(UsageError):
    """An optional package a run needs is not installed; found before any work."""


def require(module: str, purpose: str, extra: str, package: str | None = None) -> None:
    """MissingPackage unless `module` can be imported: "PURPOSE needs the PACKAGE package: pip install ..."."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingPackage(f"{purpose} needs the {package or module} package: pip install 'oneshot[{extra}]'")
