"""User-facing errors: one clear line, exit code 2, never a library traceback."""


class QstarError(Exception):
    """Bad input or a refused action. The CLI prints `error: <message>` and exits with code 2."""


class ConfigError(QstarError):
    """An invalid config value; the message names the key and what is allowed."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type when the message is empty)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def last_line(exc: BaseException) -> str:
    """The last non-empty line: Ray wraps a worker's traceback, whose last line says what failed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
