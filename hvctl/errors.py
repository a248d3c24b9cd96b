"""The one exception type that reaches the user as a one-line message instead of a traceback."""


class HvctlError(Exception):
    """Bad input or an unusable environment: printed as `error: <message>`, exit status 1.

    The message names the culprit (a file, a key, a flag) and says what is wrong with it.
    """
