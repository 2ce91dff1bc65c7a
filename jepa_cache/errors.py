"""The one exception type the CLI turns into a clean, single-line message."""


class UserError(Exception):
    """A problem the user can fix (bad input, wrong option, missing file).

    The message must say which file/option is at fault and what to do; the CLI prints it
    as one line and exits non-zero, without a traceback unless `--debug`.
    """
