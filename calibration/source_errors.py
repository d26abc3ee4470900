"""The one exception the calibration package raises for a bad source.

Its message is a single line that tells the user what to change (a path, a flag,
a package to install, an offline source to use instead), so the CLI can print it
as-is before any model is loaded.
"""

from oneshot.errors import UsageError

OFFLINE_ALTERNATIVES = "wiki-offline, file:PATH or tokens:PATH"


class SourceError(UsageError):
    """A calibration/evaluation source that cannot be used, with a one-line fix."""

    def __init__(self, message: str):
        # Nested library errors can carry newlines; keep the promise of one line.
        super().__init__(" ".join(str(message).split()))
