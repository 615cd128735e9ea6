"""The one exception type for user mistakes.

The CLI turns a SlimkitError into one line on stderr and exit status 2. Anything else escaping is a
bug in slimkit and keeps its traceback.
"""


class SlimkitError(ValueError):
    """A user mistake or an input slimkit refuses to handle; the message says what and what to do."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line, for embedding in a SlimkitError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
