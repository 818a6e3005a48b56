"""gRPC's transport (``protocols/grpc_h2.py``) against the session's server, where grpc's own clients
cannot reach: a raw HTTP/2 client (h2) sends what they never send (an unknown compression, a deflated
message, a gzip bomb, a deadline of a nanosecond, a window of 16 bytes, a reset mid-call, odd headers),
and each answer is checked on the wire; grpc's clients check the rest (gzip, an unknown method, a call
not served, a garbled message, health's server stream).
"""

from __future__ import annotations

import gzip
import socket
import struct
import zlib
from dataclasses import dataclass, field

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as oip_pb2
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from common import config
from harness.server import ServerProcess
from tests.e2e.test_grpc import rows

CONFIG = config.load()
INFER = "/inference.GRPCInferenceService/ModelInfer"
TIMEOUT_S = 10


@dataclass
class Answer:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: bool = False

    @property
    def status(self) -> int:
        """grpc-status, from the trailers or a trailers-only answer."""
        return int((self.trailers or self.headers)[b"grpc-status"])

    def reply(self) -> oip_pb2.ModelInferResponse:
        flag, length = struct.unpack(">BI", self.data[:5])
        assert flag == 0 and len(self.data) == 5 + length, self.data
        return oip_pb2.ModelInferResponse.FromString(self.data[5:])


class RawClient:
    """One HTTP/2 connection speaking gRPC by hand."""

    def __init__(self, target: str, window: int | None = None):
        host, port = target.rsplit(":", 1)
        self.socket = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.target = target
        self.flush()

    def flush(self) -> None:
        self.socket.sendall(self.h2.data_to_send())

    def start(self, path: str, message: bytes, flag: int = 0,
              headers: tuple[tuple[str | bytes, str | bytes], ...] = ()) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                         (":authority", self.target), ("content-type", "application/grpc"),
                                         ("te", "trailers"), *headers])
        self.h2.send_data(stream_id, struct.pack(">BI", flag, len(message)) + message, end_stream=True)
        self.flush()
        return stream_id

    def answer(self, stream_id: int) -> Answer:
        answer = Answer()
        while True:
            data = self.socket.recv(65536)
            assert data, "the server closed the connection"
            for event in self.h2.receive_data(data):
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    answer.data += event.data
                    self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    answer.trailers = dict(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    answer.reset = True
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    self.flush()
                    return answer
            self.flush()

    def call(self, path: str, message: bytes, **kwargs: object) -> Answer:
        return self.answer(self.start(path, message, **kwargs))  # type: ignore[arg-type]

    def close(self) -> None:
        self.socket.close()


def infer_request(count: int = 1, version: str = "") -> bytes:
    data = rows("wine", count)
    request = oip_pb2.ModelInferRequest(model_name="wine", model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=data.shape)
    request.raw_input_contents.append(data.tobytes())
    return request.SerializeToString()


def test_an_answer_larger_than_the_clients_window_arrives_whole(server: ServerProcess) -> None:
    """A client that lets the server send 16 bytes at a time still gets every byte, in order, and the
    same answer as a client with a normal window."""
    small, normal = RawClient(server.grpc_target, window=16), RawClient(server.grpc_target)
    try:
        request = infer_request(40, version="onnx-v2")
        answer = small.call(INFER, request)
        assert answer.status == grpc.StatusCode.OK.value[0], answer
        assert len(answer.data) > 16 * 10
        reply, expected = answer.reply(), normal.call(INFER, request).reply()
        assert reply.model_version == "onnx-v2" and list(reply.outputs[0].shape) == [40, 3]
        assert reply.raw_output_contents == expected.raw_output_contents
        probabilities = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(40, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    finally:
        small.close()
        normal.close()


def test_gzip_and_deflate_requests_are_answered_other_encodings_are_unimplemented(server: ServerProcess) -> None:
    request = infer_request(3, version="onnx-v2")
    with grpc.insecure_channel(server.grpc_target, compression=grpc.Compression.Gzip) as channel:
        gzipped = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            oip_pb2.ModelInferRequest.FromString(request), timeout=TIMEOUT_S)
    client = RawClient(server.grpc_target)
    try:
        plain = client.call(INFER, request).reply()
        assert gzipped.raw_output_contents == plain.raw_output_contents
        deflated = client.call(INFER, zlib.compress(request), flag=1, headers=(("grpc-encoding", "deflate"),))
        assert deflated.reply().raw_output_contents == plain.raw_output_contents
        refused = client.call(INFER, request, flag=1, headers=(("grpc-encoding", "snappy"),))
        assert refused.status == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert b"snappy" in refused.headers[b"grpc-message"]
        assert refused.headers[b"grpc-accept-encoding"] == b"identity,gzip,deflate"
        bomb = client.call(INFER, gzip.compress(b"\0" * (CONFIG.limits.max_body_bytes + 1)), flag=1,
                           headers=(("grpc-encoding", "gzip"),))
        assert bomb.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "inflated past limits.max_body_bytes"
        assert client.call(INFER, request).status == grpc.StatusCode.OK.value[0], "the connection goes on"
    finally:
        client.close()


def test_a_deadline_already_past_is_deadline_exceeded(server: ServerProcess) -> None:
    client = RawClient(server.grpc_target)
    try:
        late = client.call(INFER, infer_request(), headers=(("grpc-timeout", "1n"),))
        assert late.status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], late
        on_time = client.call(INFER, infer_request(), headers=(("grpc-timeout", "10S"),))
        assert on_time.status == grpc.StatusCode.OK.value[0]
        assert on_time.reply().model_name == "wine"
    finally:
        client.close()


def test_headers_that_are_not_ascii_or_not_base64_are_read_without_failing(server: ServerProcess) -> None:
    """h2 does not validate headers here (protocols/grpc_h2.py, H2_CONFIG): what the transport reads of
    them must not fail on any bytes."""
    client = RawClient(server.grpc_target)
    try:
        odd = client.call(INFER, infer_request(), headers=((b"x-odd", b"\xff\xfe"), (b"x-trace-bin", b"%%not base64"),
                                                           (b"user-id", b"\xe9l\xe8ve")))
        assert odd.status == grpc.StatusCode.OK.value[0], odd
        assert odd.reply().model_name == "wine"
        nowhere = client.call(b"/inference.GRPCInferenceService/\xffInfer", infer_request())  # type: ignore[arg-type]
        assert nowhere.status == grpc.StatusCode.UNIMPLEMENTED.value[0], nowhere
    finally:
        client.close()


def test_a_call_reset_by_its_client_leaves_the_connection_answering(server: ServerProcess) -> None:
    client = RawClient(server.grpc_target)
    try:
        abandoned = client.start(INFER, infer_request(64))
        client.h2.reset_stream(abandoned)
        client.flush()
        answers = [client.call(INFER, infer_request()) for _ in range(3)]
        assert [a.status for a in answers] == [grpc.StatusCode.OK.value[0]] * 3
    finally:
        client.close()


def test_an_unknown_method_a_call_not_served_or_a_garbled_message_has_its_code(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        unknown = channel.unary_unary("/inference.GRPCInferenceService/NoSuchCall")
        try:
            unknown(b"", timeout=TIMEOUT_S)
            raise AssertionError("an unknown method was answered")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "NoSuchCall" in err.details()
        not_served = oip_grpc.GRPCInferenceServiceStub(channel).ModelConfig  # Triton's, not KServe's
        try:
            not_served(oip_pb2.ModelConfigRequest(name="wine"), timeout=TIMEOUT_S)
            raise AssertionError("Triton's ModelConfig was answered")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        garbled = channel.unary_unary(INFER)
        try:
            garbled(b"\xff\xff\xff", timeout=TIMEOUT_S)
            raise AssertionError("a garbled message was answered")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INTERNAL


def test_health_watch_streams_the_serving_status(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=TIMEOUT_S)
        first = next(watch)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
