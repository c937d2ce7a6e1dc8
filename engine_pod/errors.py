"""Typed exceptions: bad input fails loudly, before it can take KV blocks or a queue slot."""


class NanoserveError(Exception):
    """Base class of every error nanoserve raises on purpose."""


class InvalidRequestError(NanoserveError, ValueError):
    """A request (prompt or sampling parameters) that can never be served as given."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code  # code: OpenAI's error code, e.g. context_length_exceeded

    def __reduce__(self):  # crosses from the engine core process to the server with its param and code
        return type(self), (str(self), self.param, self.code)


class ServerShutdown(NanoserveError):
    """The server stopped before the request finished (its drain timeout ran out)."""


class ModelLoadError(NanoserveError):
    """A model folder that is missing, incomplete, or of an architecture we do not support."""


class ConfigError(NanoserveError, ValueError):
    """Engine settings that do not fit together (or do not fit the model)."""


class EngineDeadError(NanoserveError):
    """The engine core process exited (killed, crashed) without saying why: nothing it held can finish."""


class GrammarProcessDied(NanoserveError, RuntimeError):
    """Structured output's grammar process exited: the step that needed it fails, and the engine with it."""
