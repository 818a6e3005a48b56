"""gRPC's HTTP/2 transport on the worker's own event loop, in place of ``grpc.aio``'s server.

Hand-written over h2 (python-hyper's HTTP/2: framing, HPACK, flow control, stream states) because
``grpc.aio`` was the cost of gRPC here (``docs/performance.md``, "gRPC on the worker's event loop"):
its calls reach the loop one at a time from a poller thread, each woken through an eventfd, so no two
calls ever shared a runtime call (1.15 rows a call against REST's ~3), and at 32 callers gRPC answered
half of what ``/predict`` did. Here a connection is a socket of the loop like an HTTP one: what arrives
together is decoded in one pass and batches as REST's requests do. What this module adds to h2 is
gRPC's mapping onto HTTP/2 (grpc's ``PROTOCOL-HTTP2.md``): length-prefixed messages, the status in
trailers, metadata as headers (``-bin`` ones base64), ``grpc-timeout``, and GOAWAY on a connection's
age.

The services are grpc's generated servicers, registered as on a grpc server
(``add_XServicer_to_server(servicer, registry)``); their method handlers are called with a
:class:`Context` that offers what the servicers use of ``grpc.aio.ServicerContext``. Unary and
server-streaming methods are served; client streaming is answered UNIMPLEMENTED. Requests may be
compressed (gzip, deflate); answers are not.
"""

from __future__ import annotations

import asyncio
import base64
import random
import socket
import struct
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from common.logs import get_logger

log = get_logger("grpc")

Metadata = tuple[tuple[str, str | bytes], ...]
H2_CONFIG = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                                      validate_outbound_headers=False, normalize_outbound_headers=False)
"""Headers stay bytes, and h2 does not check them: ~18 of its ~100 us a call (in process, 2026-12-03).
What is read of a request's headers is read defensively instead: a method no service has, a timeout
that does not parse, metadata decoded as Latin-1 (gRPC's ASCII, and never an error). Outbound headers
are this module's own."""
RECEIVE_WINDOW = 1 << 20
"""Bytes a client may send ahead of our acknowledgement, per stream and per connection: a large
request (up to ``limits.max_body_bytes``) arrives in a few round trips, not one per 64 KiB."""
MESSAGE_HEADER = struct.Struct(">BI")
"""gRPC's length prefix: a compressed flag, then the message's length."""
AGE_JITTER = 0.1
"""A connection's age varies +-10% (as grpc's own ``max_connection_age``): connections opened together
do not all close in the same instant."""
LISTEN_BACKLOG = 100
"""Connections the kernel holds for a listener until its worker accepts them: asyncio's default."""
TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
RESERVED = frozenset({b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"})
ENCODINGS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
"""The compressed requests served (``grpc-encoding``), as zlib's window bits: gzip, and deflate in
zlib's format (grpc's own "deflate"). Answers go uncompressed, which every client accepts."""
ACCEPTED = (("grpc-accept-encoding", ",".join(["identity", *(e.decode() for e in ENCODINGS)])),)
"""What a refusal of an unknown encoding names (gRPC's compression spec)."""
"""Request headers of the transport, not the call's metadata."""
MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
"""What ``grpc-message`` carries as is; anything else is percent-encoded."""
RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
STATUS = {code: (b"grpc-status", str(code.value[0]).encode()) for code in grpc.StatusCode}
"""Each code's ``grpc-status`` trailer, built once."""


@dataclass(frozen=True)
class CallDetails:
    """What a generic handler is asked about (``grpc.HandlerCallDetails``)."""

    method: str
    invocation_metadata: Metadata = ()


class Registry:
    """Where generated ``add_XServicer_to_server`` functions put their method handlers: newer stubs
    register them by name (and generically too), older ones (TF Serving's) only generically."""

    def __init__(self) -> None:
        self._methods: dict[bytes, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}".encode()] = handler

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def handler(self, path: bytes) -> grpc.RpcMethodHandler | None:
        """The method's handler, None for a method no service has (a generic lookup is kept once it
        finds one: unknown paths are not, or a client could fill the table)."""
        handler = self._methods.get(path)
        if handler is None:
            details = CallDetails(path.decode(errors="replace"))
            handler = next((h for g in self._generic if (h := g.service(details)) is not None), None)
            if handler is not None:
                self._methods[path] = handler
        return handler


class Refused(Exception):
    """A call answered with a status other than OK before its handler ran (unknown method, bad
    message, a size over the limit)."""

    def __init__(self, code: grpc.StatusCode, message: str, metadata: Metadata = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.metadata = metadata


class Context:
    """What a servicer reads of its call and how it ends it: ``grpc.aio.ServicerContext``'s methods
    that the services here use."""

    def __init__(self, stream: _Stream):
        self._stream = stream
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._stream.metadata

    def peer(self) -> str:
        return self._stream.connection.peer

    def set_code(self, code: grpc.StatusCode) -> None:
        """Set by a generated servicer's method that is not served (UNIMPLEMENTED), before it raises."""
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        self.code, self.details = code, details
        if trailing_metadata:
            self.trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError(details)

    async def write(self, message: Any) -> None:
        """One message of a server-streaming answer."""
        self._stream.send_message(message)


@dataclass(slots=True, eq=False)
class _Stream:
    """One call: its request as it arrives, its handler's task, its answer."""

    connection: Connection
    id: int
    path: bytes
    metadata: Metadata
    deadline: float | None
    encoding: bytes
    body: bytearray = field(default_factory=bytearray)
    task: asyncio.Task[None] | None = None
    headers_sent: bool = False
    serializer: Any = None

    def send_message(self, message: Any, flush: bool = True) -> None:
        """One answer message; ``flush=False`` leaves it for the trailers' write (a unary answer and its
        status leave in one write to the socket, not two)."""
        payload = self.serializer(message) if self.serializer else message
        self.connection.send(self, MESSAGE_HEADER.pack(0, len(payload)) + payload, flush)

    def finish(self, code: grpc.StatusCode, message: str, metadata: Metadata) -> None:
        status = [STATUS[code]]
        if message:
            status.append((b"grpc-message", urllib.parse.quote(message, safe=MESSAGE_SAFE).encode()))
        self.connection.end(self, status + _headers(metadata))


class Connection(asyncio.Protocol):
    """One client connection: h2's state machine fed from the socket, a task per call."""

    def __init__(self, server: Server):
        self._server = server
        self._h2 = h2.connection.H2Connection(H2_CONFIG)
        self._streams: dict[int, _Stream] = {}
        self._outbox: dict[int, tuple[bytearray, list[tuple[bytes, bytes]] | None]] = {}
        self._transport: asyncio.Transport | None = None
        self._last_stream: int | None = None  # set by GOAWAY: later streams are refused
        self._timers: list[asyncio.TimerHandle] = []  # the age and the grace: cancelled once closed
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):  # grpc's peer strings, which the Guard reads the address from
            host, port = peer[:2]
            self.peer = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
        else:
            self.peer = f"unix:{peer or ''}"
        self._h2.initiate_connection()
        self._h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW})
        self._h2.increment_flow_control_window(RECEIVE_WINDOW - self._h2.inbound_flow_control_window)
        self._flush()
        self._server.connections.add(self)
        age = self._server.max_age_s
        if age is not None:
            self._timers.append(asyncio.get_running_loop().call_later(
                age * random.uniform(1 - AGE_JITTER, 1 + AGE_JITTER), self.go_away))

    def connection_lost(self, exc: Exception | None) -> None:
        """The calls in flight are cancelled, and the timers let go of the connection (a client that
        opens a connection a call would otherwise leave each one alive for its whole age)."""
        self._server.connections.discard(self)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for stream in self._streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()  # h2 has queued its GOAWAY
            self._close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                stream = self._streams.get(event.stream_id)
                if stream is not None and stream.task is None:
                    stream.body += event.data
                    if len(stream.body) > self._server.max_message_bytes + MESSAGE_HEADER.size:
                        self._refuse(stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"received message larger than max ({len(stream.body)} vs. "
                                     f"{self._server.max_message_bytes} bytes)")
            elif isinstance(event, h2.events.RequestReceived):
                self._request(event.stream_id, event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None and stream.task is None:
                    self._start(stream)
            elif isinstance(event, h2.events.StreamReset):
                self._outbox.pop(event.stream_id, None)
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None and stream.task is not None:
                    stream.task.cancel()
            elif isinstance(event, h2.events.WindowUpdated):
                for stream_id in [event.stream_id] if event.stream_id else list(self._outbox):
                    self._drain(stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._close()
        self._flush()

    def go_away(self) -> None:
        """Tell the client to open a new connection (GOAWAY, no error): the calls it has sent finish
        here, later ones are refused and retried by grpc's clients on the new connection. Written by
        hand: h2's own GOAWAY closes its state machine, and the calls in flight could not answer."""
        if self._transport is None or self._last_stream is not None:
            return
        self._last_stream = self._h2.highest_inbound_stream_id
        self._transport.write(GoAwayFrame(stream_id=0, last_stream_id=self._last_stream, error_code=0).serialize())
        self._close_when_idle()
        self._timers.append(asyncio.get_running_loop().call_later(self._server.grace_s, self._close))

    def send(self, stream: _Stream, data: bytes, flush: bool) -> None:
        if stream.id not in self._streams:
            return  # cancelled by the client
        if not stream.headers_sent:
            self._h2.send_headers(stream.id, RESPONSE_HEADERS)
            stream.headers_sent = True
        self._outbox.setdefault(stream.id, (bytearray(), None))[0].extend(data)
        self._drain(stream.id)
        if flush:
            self._flush()

    def end(self, stream: _Stream, trailers: list[tuple[bytes, bytes]]) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        if not stream.headers_sent:  # trailers-only: the status in the one HEADERS frame
            self._h2.send_headers(stream.id, [*RESPONSE_HEADERS, *trailers], end_stream=True)
        else:
            pending = self._outbox.pop(stream.id, (bytearray(), None))[0]
            self._outbox[stream.id] = (pending, trailers)
            self._drain(stream.id)
        self._flush()
        if self._last_stream is not None:
            self._close_when_idle()

    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self._last_stream is not None and stream_id > self._last_stream:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        path, timeout, encoding, metadata = b"", None, b"identity", []
        for key, value in headers:
            if key == b":path":
                path = value
            elif key == b"grpc-timeout":
                timeout = _timeout(value)
            elif key == b"grpc-encoding":
                encoding = value
            elif key[:1] != b":" and key not in RESERVED:
                name = key.decode("latin-1").lower()
                metadata.append((name, _b64decode(value) if name.endswith("-bin") else value.decode("latin-1")))
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self._streams[stream_id] = _Stream(self, stream_id, path, tuple(metadata), deadline, encoding)

    def _start(self, stream: _Stream) -> None:
        handler = self._server.registry.handler(stream.path)
        try:
            if handler is None:
                raise Refused(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {stream.path.decode('latin-1')}")
            if handler.request_streaming:
                raise Refused(grpc.StatusCode.UNIMPLEMENTED, "client-streaming calls are not served")
            request = handler.request_deserializer(
                _message(stream.body, stream.encoding, self._server.max_message_bytes))
        except Refused as refusal:
            self._refuse(stream, refusal.code, refusal.message, refusal.metadata)
            return
        except Exception:  # the message did not parse as the method's request
            self._refuse(stream, grpc.StatusCode.INTERNAL, "Failed to parse request")
            return
        stream.body = bytearray()
        stream.serializer = handler.response_serializer
        stream.task = asyncio.get_running_loop().create_task(_run(stream, handler, request))

    def _refuse(self, stream: _Stream, code: grpc.StatusCode, message: str, metadata: Metadata = ()) -> None:
        """Answer ``stream`` with an error status at once; what the client still sends of it is not
        read (a stream still open on its side is reset)."""
        stream.finish(code, message, metadata)
        try:
            self._h2.reset_stream(stream.id, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.StreamClosedError:  # the client had sent all of it
            pass

    def _drain(self, stream_id: int) -> None:
        """Send what the stream's flow-control window allows, then its trailers once all is sent."""
        entry = self._outbox.get(stream_id)
        if entry is None:
            return
        pending, trailers = entry
        while pending:
            size = min(len(pending), self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
            if size <= 0:
                return
            self._h2.send_data(stream_id, bytes(pending[:size]))
            del pending[:size]
        if trailers is not None:
            del self._outbox[stream_id]
            self._h2.send_headers(stream_id, trailers, end_stream=True)

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    def _close_when_idle(self) -> None:
        if not self._streams and not self._outbox:
            self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _run(stream: _Stream, handler: grpc.RpcMethodHandler, request: Any) -> None:
    context = Context(stream)
    deadline = asyncio.timeout_at(stream.deadline)
    try:
        async with deadline:
            if handler.response_streaming:
                replies = handler.unary_stream(request, context)
                if isinstance(replies, AsyncIterator):
                    async for reply in replies:
                        stream.send_message(reply)
                else:
                    await replies
            else:
                stream.send_message(await handler.unary_unary(request, context), flush=False)
    except grpc.aio.AbortError:
        pass
    except TimeoutError as err:
        if deadline.expired():
            context.code, context.details = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        else:
            _failed(stream, context, err)
    except Exception as err:  # a handler's own failure (those behind the Guard have answered already)
        _failed(stream, context, err)
    stream.finish(context.code, context.details, context.trailing)


def _failed(stream: _Stream, context: Context, err: Exception) -> None:
    """A handler's own failure (the services behind the Guard answer theirs), as grpc answers it: the
    code it set before raising (a generated servicer's method that is not served sets UNIMPLEMENTED),
    else UNKNOWN with the details in the server log."""
    if context.code is not grpc.StatusCode.OK:
        return
    log.error("gRPC handler failed", extra={"method": stream.path.decode("latin-1")}, exc_info=err)
    context.code, context.details = grpc.StatusCode.UNKNOWN, f"Unexpected {type(err).__name__}: see the server log"


class Server:
    """This worker's gRPC listener: a :class:`Connection` per client, all on ``port`` with
    ``SO_REUSEPORT`` beside the other workers'."""

    def __init__(self, registry: Registry, max_message_bytes: int, max_age_s: float | None, grace_s: float):
        self.registry = registry
        self.max_message_bytes = max_message_bytes
        self.max_age_s = max_age_s
        self.grace_s = grace_s
        self.connections: set[Connection] = set()
        self._servers: list[asyncio.Server] = []

    async def start(self, sockets: Sequence[socket.socket]) -> None:
        """Accept on ``sockets`` (:func:`listeners`)."""
        loop = asyncio.get_running_loop()
        self._servers = [await loop.create_server(lambda: Connection(self), sock=sock) for sock in sockets]

    async def stop(self) -> None:
        """No new connection; every open one is told to go away, and closed once its calls are answered
        or ``grace_s`` has passed."""
        if not self._servers:
            return
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.go_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)


def listeners(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (all of them when empty), as asyncio's
    ``create_server`` binds them, each with ``SO_REUSEPORT`` so that every worker's join one group: the
    kernel hashes each new connection to one socket of the group. Made by the workers' parent before
    each fork (``serving/prefork.py``), every worker's are in the group before any worker starts, so
    the channels of a client that connects while they start are spread over all of them, not left on
    the first one up until aging moves them."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as asyncio: the IPv4 address has a socket of its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _message(body: bytearray, encoding: bytes, limit: int) -> bytes:
    """The one message of a unary request, without its length prefix, decompressed (to at most
    ``limit`` bytes: a small message may inflate to any size)."""
    if len(body) < MESSAGE_HEADER.size:
        raise Refused(grpc.StatusCode.INTERNAL, "the request has no message")
    compressed, length = MESSAGE_HEADER.unpack_from(body)
    if len(body) != MESSAGE_HEADER.size + length:
        raise Refused(grpc.StatusCode.INTERNAL, "a unary request holds exactly one message")
    message = bytes(memoryview(body)[MESSAGE_HEADER.size:])
    if not compressed:
        return message
    wbits = ENCODINGS.get(encoding)
    if wbits is None:
        raise Refused(grpc.StatusCode.UNIMPLEMENTED, f"grpc-encoding {encoding.decode('latin-1')!r} is not "
                      f"accepted: {ACCEPTED[0][1]}", ACCEPTED)
    inflater = zlib.decompressobj(wbits)
    try:
        inflated = inflater.decompress(message, limit + 1)
    except zlib.error as err:
        raise Refused(grpc.StatusCode.INTERNAL, f"the message did not decompress as {encoding.decode()}: {err}") from None
    if len(inflated) > limit:
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"received message larger than max once decompressed "
                      f"(over {limit} bytes)")
    return inflated


def _timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (``100m``, ``5S``...) in seconds; None when it does not parse."""
    unit = TIMEOUT_UNITS.get(value[-1:])
    return float(value[:-1]) * unit if unit is not None and value[:-1].isdigit() else None


def _b64decode(value: bytes) -> bytes:
    """A ``-bin`` value, padded or not; one that is not base64 is kept as it came."""
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    except ValueError:
        return value


def _headers(metadata: Metadata) -> list[tuple[bytes, bytes]]:
    out = []
    for key, value in metadata:
        if key.endswith("-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            out.append((key.encode(), base64.b64encode(raw).rstrip(b"=")))
        else:
            out.append((key.encode(), value.encode() if isinstance(value, str) else value))
    return out
