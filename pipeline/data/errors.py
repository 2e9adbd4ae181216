"""Errors the CLI turns into exit codes: 2 for bad usage or bad input, 1 for a failed job."""


class PipelineError(Exception):
    """A failure the user can act on; the CLI prints its message as one line."""

    exit_code = 1


class UsageError(PipelineError):
    """Bad arguments or input that does not fit (wrong shards for a store, invalid manifest)."""

    exit_code = 2


class JobError(PipelineError):
    """A job that started and could not finish (workers failing, store not writable)."""

    exit_code = 1
