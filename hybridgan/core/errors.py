"""The training core's one error."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, mismatched run folder); one line names the cause."""
