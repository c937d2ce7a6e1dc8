"""OpenAI's error body, one shape for the engine and the gateway: clients parse one."""


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
