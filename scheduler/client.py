"""Python client of specserve's gRPC API, sync (`Client`) and asyncio (`AsyncClient`).

    with Client("localhost:50051") as client:
        for chunk in client.generate(prompt="def add(a, b):", max_tokens=64):
            print(chunk.text, end="", flush=True)

`generate` yields GenerateResponse messages; the last carries finish_reason, usage and spec.
Errors are grpc.RpcError with the server's status code and message.
"""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc


def build_request(
    prompt: str | None = None,
    *,
    messages: list[dict] | None = None,
    prompt_token_ids: list[int] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | tuple[str, ...] = (),
    spec_method: str = "",
    max_draft_tokens: int = 0,
    cache_salt: str = "",
    request_id: str = "",
    ignore_eos: bool = False,
    logprobs: int | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from keywords; exactly one of prompt, messages, prompt_token_ids."""
    if sum(x is not None for x in (prompt, messages, prompt_token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages, prompt_token_ids")
    request = pb.GenerateRequest(top_k=top_k, stop=list(stop), cache_salt=cache_salt, request_id=request_id,
                                 ignore_eos=ignore_eos,
                                 spec=pb.SpecOptions(method=spec_method, max_draft_tokens=max_draft_tokens))
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages]))
    else:
        request.prompt_token_ids.CopyFrom(pb.TokenIds(ids=prompt_token_ids))
    for field, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed),
                         ("logprobs", logprobs)):
        if value is not None:
            setattr(request, field, value)
    return request


def _credentials(root_certificates: Path | bytes | None) -> grpc.ChannelCredentials | None:
    if root_certificates is None:
        return None
    pem = root_certificates if isinstance(root_certificates, bytes) else Path(root_certificates).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=pem)


class _Base:
    """target: "host:port". token: bearer token. root_certificates: CA (PEM path or bytes) to
    speak TLS; tls_server_name overrides the name checked against the server's certificate."""

    def __init__(self, target: str, token: str | None = None, root_certificates: Path | bytes | None = None,
                 tls_server_name: str | None = None):
        self.target = target
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._creds = _credentials(root_certificates)
        self._options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []


class Client(_Base):
    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        if self._creds:
            self.channel = grpc.secure_channel(target, self._creds, options=self._options)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Iterator[pb.GenerateResponse]:
        """Streams one request's chunks; breaking out of the loop cancels the request."""
        call = self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    def stats(self, timeout: float | None = None) -> pb.Stats:
        return self.stub.GetStats(pb.GetStatsRequest(), timeout=timeout, metadata=self._metadata)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... of the server (or one of its services)."""
        status = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                 timeout=timeout).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        if self._creds:
            self.channel = grpc.aio.secure_channel(target, self._creds, options=self._options)
        else:
            self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **kwargs) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout, metadata=self._metadata)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def stats(self, timeout: float | None = None) -> pb.Stats:
        return await self.stub.GetStats(pb.GetStatsRequest(), timeout=timeout, metadata=self._metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
