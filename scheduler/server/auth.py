"""Bearer-token authentication: `authorization: Bearer <token>` metadata on every call.

The health service stays open so load balancers and Kubernetes probes need no secret.
"""

import hmac
import ipaddress
import socket

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; a name is resolved."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES) or self._authorized(details):
            return handler
        return _deny(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(given, self._expected)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED."""

    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")

    serde = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **serde)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **serde)
    return grpc.stream_stream_rpc_method_handler(abort, **serde)
