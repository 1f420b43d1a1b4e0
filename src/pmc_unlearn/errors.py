"""Error types the CLI turns into one-line messages (no traceback).

`UserError`: bad user input, exit code 2, raised before any output directory is written.
Messages name the offending input and say what to do about it. `TrainingDiverged` and
`OutputWriteError`: a run that could not go on, exit code 1.
"""


class UserError(Exception):
    """Bad input from the user (config, data, model path). Exit code 2 at the CLI."""


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite; the last good checkpoint is kept."""


class OutputWriteError(RuntimeError):
    """A write to the output failed (a full disk, a quota); what was written before is intact. Exit code 1."""
