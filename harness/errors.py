"""The one exception type that reaches users as a one-line message.

Anything raised as `HarnessError` is bad input or a clear operational problem: the CLI prints
its message (which names the problem and the fix) and exits with code 2, without a traceback.
Every other exception is a bug and keeps its traceback.
"""


class HarnessError(Exception):
    """A user-facing error: bad input, missing file, unsupported combination."""
