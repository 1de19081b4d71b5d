"""User-facing errors: one clear line, exit code 2, never a library traceback."""


class QstarError(Exception):
    """Bad input or a refused action. The CLI prints `error: <message>` and exits with code 2."""


class ConfigError(QstarError):
    """An invalid config value; the message names the key and what is allowed."""
