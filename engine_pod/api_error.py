"""APIError: a request the server refuses, with its status and OpenAI's error body."""

from nanoserve.common.api_errors import error_body
from nanoserve.engine_pod.errors import InvalidRequestError


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    @classmethod
    def invalid(cls, e: InvalidRequestError) -> "APIError":
        """The 400 of a request the engine's checks refused."""
        return cls(400, str(e), e.param, e.code)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)
