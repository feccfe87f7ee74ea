"""One error type for bad user input: the CLI prints its message on one line and exits non-zero."""


class MobileLLMError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
