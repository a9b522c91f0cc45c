"""One exception type for every mistake a user can make, with a subclass where a caller needs to tell one apart.

Library code raises :class:`UserError` with a one-line message that names the problem and, where there is one,
the fix. The command-line entry points turn it into that line on stderr and exit code 2 (see
:func:`featstore.cli_support.run_cli`); anything else is a bug and keeps its traceback behind ``--debug``.

A caller that must react to one kind of error (wait for a busy store, fall back when a checkpoint is unreadable)
catches its subclass rather than matching the message text:

- :class:`StoreLockedError` -- another process holds a store's writer lock;
- :class:`ReadOnlyStoreError` -- the store cannot be written here (read-only mount or permissions);
- :class:`CorruptStoreError` -- a store file is missing, truncated, fails its checksum or does not parse;
- :class:`IncompleteStoreError` -- rows asked for lie in chunks that are not done yet;
- :class:`MissingArrayError` -- a store lacks an optional array (maps, views) the request needs;
- :class:`UnknownFieldError` -- a selection rule names a per-sample field the data does not have;
- :class:`CheckpointError` -- a checkpoint file is missing or cannot be read with ``weights_only=True``.
"""


class UserError(Exception):
    """Bad input: a wrong path, an unknown name, a store that does not fit the request."""

    exit_code = 2


class StoreLockedError(UserError):
    """Another process is writing the store (it holds the advisory writer lock)."""


class ReadOnlyStoreError(UserError):
    """The store (or its folder) cannot be written by this process: a read-only mount, or no write permission."""


class CorruptStoreError(UserError):
    """A file of the store is damaged: a done chunk missing or truncated, a checksum mismatch, unparsable
    metadata. Reads refuse it rather than return fill values; ``featstore verify`` lists every such file."""


class IncompleteStoreError(UserError):
    """The request touches rows of chunks that are not done yet (the extraction has not finished)."""


class MissingArrayError(UserError):
    """The store was made without an optional array (``maps``, ``views``) that the request needs."""


class UnknownFieldError(UserError):
    """A selection rule names a per-sample field that the store or data source does not have."""


class CheckpointError(UserError):
    """A checkpoint file is missing, a folder, or not readable as plain weights (``torch.load(weights_only=True)``).

    ``reason`` is the first line of the underlying error (empty when there is none)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason
