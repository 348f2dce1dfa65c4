"""The one exception type for bad user input.

Every room raises :class:`LongtrainError` with a message that names the file, line, field or
option and says how to fix it; the CLI prints it as one line and exits non-zero.
"""


class LongtrainError(Exception):
    """Bad input or an unsupported request, with a message fit to show the user as-is."""
