"""aiohttp logs a full traceback at ERROR for every malformed request and every client that hangs up
mid-answer: a hostile client could fill the logs at will. Those are the client's doing, not the server's."""

import logging

from aiohttp.http_exceptions import HttpProcessingError


class _ClientFaults(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (HttpProcessingError, ConnectionResetError))


def quiet_client_faults() -> None:
    """Drop aiohttp.server's records of malformed requests and vanished clients (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaults) for f in logger.filters):
        logger.addFilter(_ClientFaults())
