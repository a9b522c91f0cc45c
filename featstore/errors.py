"""One exception type for every mistake a user can make.

Library code raises :class:`UserError` with a one-line message that names the problem and, where there is one,
the fix. The command-line entry points turn it into that line on stderr and exit code 2 (see
:func:`featstore.cli_support.run_cli`); anything else is a bug and keeps its traceback behind ``--debug``.
"""


class UserError(Exception):
    """Bad input: a wrong path, an unknown name, a store that does not fit the request."""

    exit_code = 2
