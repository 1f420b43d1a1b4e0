"""One error type for bad user input.

The CLI turns a `UserError` into a one-line message and exit code 2, before any output
directory is written. Messages name the offending input and say what to do about it.
"""


class UserError(Exception):
    """Bad input from the user (config, data, model path). Exit code 2 at the CLI."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
