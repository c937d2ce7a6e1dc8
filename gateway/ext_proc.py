"""Envoy's external processing protocol (envoy.service.ext_proc.v3) as an endpoint picker (EPP) speaks it.

One gRPC stream per HTTP request. Envoy sends the request headers, then the body: in FULL_DUPLEX_STREAMED
mode as chunks it does not wait on (the picker holds them, answers the headers once the last chunk is in,
and streams the body back unchanged), in BUFFERED mode as one message after the headers' answer. The pick
goes back as Gateway API Inference Extension's endpoint picker protocol (docs/proposals/004) says: the
`x-gateway-destination-endpoint` header (the chosen engine's ip:port, which an ORIGINAL_DST cluster dials)
and `envoy.lb` dynamic metadata with the whole ranking, comma-separated, for data planes that fall back down
the list. No engine: a 503 immediate response; a body that is not a JSON object: 400 (gateway/routing.py).
The response's status is the answering engine's verdict for its circuit breaker, as in the proxy.
"""

# The generated protobuf modules ship no type stubs: pyright cannot see their message classes.
# pyright: reportAttributeAccessIssue=false

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2

from nanoserve.common.api_errors import error_body
from nanoserve.gateway.endpoints import Endpoint
from nanoserve.gateway.middleware import bearer_ok, needs_key
from nanoserve.gateway.routing import Refusal, Routing, decide, routable_or_wake, route_by_load

if TYPE_CHECKING:
    from nanoserve.gateway.app import Gateway

log = logging.getLogger(__name__)

DESTINATION = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SERVED = "x-gateway-destination-endpoint-served"  # in envoy.lb: the endpoint that answered, as the data plane says
SUBSET_NAMESPACE, SUBSET_KEY = "envoy.lb.subset_hint", "x-gateway-destination-endpoint-subset"
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
NO_KEY = Refusal(
    401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "invalid_request_error", "invalid_api_key"
)
BODY_CHUNK = 62_000  # bytes per streamed body message back to Envoy (GAIE's EPP chunks alike)
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


def address(url: str) -> str:
    """An engine's base URL as the ip:port Envoy dials."""
    return urlsplit(url).netloc


@dataclass
class Exchange:
    """One HTTP request's state on its stream."""

    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    request_duplex: bool = False  # FULL_DUPLEX_STREAMED: body chunks come without waiting for our answers
    response_duplex: bool = False
    subset: set[str] | None = None  # ip:port the data plane allows (envoy.lb.subset_hint), None: all
    engine: Endpoint | None = None  # the chosen engine, counted in flight until the stream ends
    trial: bool = False  # the request is its breaker's half-open trial
    judged: bool = False  # its breaker has learnt the outcome (from the response's status)
    finished: bool = False  # an immediate response went back: Envoy ends the stream


def _headers(msg: pb.HttpHeaders) -> dict[str, str]:
    return {
        h.key.lower(): h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value for h in msg.headers.headers
    }


def _metadata(req: pb.ProcessingRequest, namespace: str, key: str):
    """A value of the request's metadata from the data plane (filter_metadata[namespace][key]), or None."""
    meta = req.metadata_context.filter_metadata
    if namespace not in meta:
        return None
    values = json_format.MessageToDict(meta[namespace])
    return values.get(key) if isinstance(values, dict) else None


def _subset(req: pb.ProcessingRequest) -> set[str] | None:
    value = _metadata(req, SUBSET_NAMESPACE, SUBSET_KEY)
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    return {a.strip() for item in items if isinstance(item, str) for a in item.split(",") if a.strip()}


def immediate(refusal: Refusal) -> pb.ProcessingResponse:
    body = json.dumps(error_body(refusal.message, refusal.type, code=refusal.code)).encode()
    pairs = {"content-type": "application/json", **({"www-authenticate": "Bearer"} if refusal.status == 401 else {})}
    options = [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode())) for k, v in pairs.items()
    ]
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=refusal.status),
            headers=pb.HeaderMutation(set_headers=options),
            body=body,
            details=refusal.code or refusal.type,
        )
    )


def _pick(addresses: list[str]) -> tuple[pb.CommonResponse, struct_pb2.Struct]:
    """The header mutation naming the chosen engine, and the metadata with the ranking."""
    header = base_pb2.HeaderValue(key=DESTINATION, raw_value=addresses[0].encode())
    # Replaced, never appended to: a client's own header must not steer the data plane anywhere.
    option = base_pb2.HeaderValueOption(
        header=header, append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    )
    common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[option]), clear_route_cache=True)
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION: ",".join(addresses)}})
    return common, metadata


def _streamed(body: bytes, end: bool, response: bool = False) -> list[pb.ProcessingResponse]:
    """`body` sent on as FULL_DUPLEX_STREAMED body messages, the last one ending the stream if `end`."""
    chunks = [body[i : i + BODY_CHUNK] for i in range(0, len(body), BODY_CHUNK)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        streamed = pb.StreamedBodyResponse(body=chunk, end_of_stream=end and i == len(chunks) - 1)
        reply = pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=streamed)))
        out.append(
            pb.ProcessingResponse(response_body=reply) if response else pb.ProcessingResponse(request_body=reply)
        )
    return out


class EndpointPicker(pb_grpc.ExternalProcessorServicer):
    """The ExternalProcessor service over a started Gateway (its pool, probes, cache feeds, tokenizers)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest], context) -> AsyncIterator:  # noqa: N802 - the gRPC method's name
        ex = Exchange()
        try:
            async for req in request_iterator:
                for resp in await self.handle(ex, req):
                    yield resp
                if ex.finished:
                    return
        finally:
            self.release(ex)

    async def handle(self, ex: Exchange, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """The answers to one message of Envoy's (none while a duplex body is still coming in)."""
        if req.HasField("protocol_config"):  # sent with the stream's first message
            ex.request_duplex = req.protocol_config.request_body_mode == FULL_DUPLEX
            ex.response_duplex = req.protocol_config.response_body_mode == FULL_DUPLEX
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            ex.headers, ex.subset = _headers(req.request_headers), _subset(req)
            keys, path = self.gw.config.api_keys, ex.headers.get(":path", "").partition("?")[0]
            if keys and needs_key(path, self.gw.config) and not bearer_ok(ex.headers.get("authorization", ""), keys):
                ex.finished = True  # as the gateway's own port: neither routed nor recorded
                return [immediate(NO_KEY)]
            if req.request_headers.end_of_stream:  # no body (a GET): by load
                return self.answer_headers(ex, await self.route(ex))
            return [] if ex.request_duplex else [pb.ProcessingResponse(request_headers=pb.HeadersResponse())]
        if kind == "request_body":
            ex.body += req.request_body.body
            if len(ex.body) > self.gw.config.max_body_bytes:
                ex.finished = True
                return [immediate(Refusal(413, "request body too large", "invalid_request_error"))]
            if not req.request_body.end_of_stream:
                return [] if ex.request_duplex else [pb.ProcessingResponse(request_body=pb.BodyResponse())]
            return self.answer_body(ex, await self.route(ex), end=True)
        if kind == "request_trailers":  # a body that ended with trailers, not end_of_stream
            out = self.answer_body(ex, await self.route(ex), end=False) if ex.request_duplex else []
            return out if ex.finished else out + [pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
        if kind == "response_headers":
            served = _metadata(req, LB_NAMESPACE, SERVED)
            self.judge(ex, served if isinstance(served, str) else None, _headers(req.response_headers).get(":status"))
            return [pb.ProcessingResponse(response_headers=pb.HeadersResponse())]
        if kind == "response_body":
            if ex.response_duplex:
                return _streamed(req.response_body.body, req.response_body.end_of_stream, response=True)
            return [pb.ProcessingResponse(response_body=pb.BodyResponse())]
        if kind == "response_trailers":
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        return []

    async def route(self, ex: Exchange) -> Routing | Refusal:
        gw = self.gw
        endpoints = await routable_or_wake(gw)
        if isinstance(endpoints, Refusal):
            return endpoints
        if ex.subset is not None:
            endpoints = [ep for ep in endpoints if address(ep.url) in ex.subset]
        path = ex.headers.get(":path", "").partition("?")[0]
        if ex.headers.get(":method") == "POST" and path.endswith(GENERATE_PATHS):
            routed = await decide(gw, path, bytes(ex.body), ex.headers.get("authorization", ""), endpoints)
        else:
            routed = route_by_load(gw, endpoints)
        if isinstance(routed, Routing):
            ep = gw.pool.endpoints[routed.decision.ranked[0]]
            if routed.prompt is not None:
                ep.record(routed.prompt, routed.mode)  # the next turn finds it here before the feed says so
            ep.in_flight += 1
            ex.engine, ex.trial = ep, ep.breaker.begin()
        return routed

    def judge(self, ex: Exchange, served: str | None, status: str | None) -> None:
        """The response's headers: the engine that answered (another one than picked if the data plane fell back
        down the ranking) learns the outcome, as the proxy's breaker does: a 5xx failed, anything else served."""
        if served and (ex.engine is None or address(ex.engine.url) != served.strip()):
            other = next((ep for ep in self.gw.pool.endpoints.values() if address(ep.url) == served.strip()), None)
            if other is not None:
                self.release(ex)
                other.in_flight += 1
                ex.engine, ex.trial, ex.judged = other, False, False
        if ex.engine is None or ex.judged or not (status or "").isdigit():
            return
        ex.judged = True
        if int(status or 0) >= 500:
            ex.engine.breaker.failure()
        else:
            ex.engine.breaker.success()

    @staticmethod
    def release(ex: Exchange) -> None:
        """The request no longer counts on its engine; a trial without a verdict lets another request try."""
        if ex.engine is not None:
            ex.engine.in_flight -= 1
            if ex.trial and not ex.judged:
                ex.engine.breaker.release()
            ex.engine = None

    def answer_headers(self, ex: Exchange, routed: Routing | Refusal) -> list[pb.ProcessingResponse]:
        if isinstance(routed, Refusal):
            ex.finished = True
            return [immediate(routed)]
        common, metadata = _pick([address(url) for url in routed.decision.ranked])
        return [pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata)]

    def answer_body(self, ex: Exchange, routed: Routing | Refusal, end: bool) -> list[pb.ProcessingResponse]:
        if isinstance(routed, Refusal):
            ex.finished = True
            return [immediate(routed)]
        if ex.request_duplex:  # the headers were held back: they go first, with the pick, then the body
            return self.answer_headers(ex, routed) + _streamed(bytes(ex.body), end)
        # BUFFERED: the headers went on already, unchanged; the pick rides on the body's answer.
        common, metadata = _pick([address(url) for url in routed.decision.ranked])
        return [pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata)]
