"""The one exception type kompakt raises for bad input.

Its message is one line that names the file, layer, op or field at fault and what to do; the
CLI prints it without a traceback (unless ``--debug``).
"""


class KompaktError(Exception):
    """Bad input or a failed check, explained in one line for the user."""
