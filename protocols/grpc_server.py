"""gRPC beside HTTP: one server per worker (``protocols/grpc_h2.py``), all workers on one port.

BentoML 1.4 services serve no gRPC of their own, so each worker starts a server here from the
service's startup hook, on the worker's own event loop: a handler awaits ``DataPlane.infer`` exactly as
a REST route does, sharing its batch queues, router, prediction log and metrics, with no thread hop
and no second process. The workers' servers share ``grpc.port`` with ``SO_REUSEPORT`` (their parent
makes each worker's listener before forking it: :func:`listen`), and the kernel spreads connections over
them; ``grpc.max_connection_age_s`` makes
clients reconnect now and then, so that a long-lived channel does not stay on one worker for good.

Three services (``docs/grpc.md``): the Open Inference Protocol (``protocols/grpc_oip.py``), TF
Serving's ``PredictionService`` (``protocols/grpc_tfserving.py``) and ``grpc.health.v1``, which answers
the worker's readiness (``DataPlane.health``). Every RPC passes ``protocols/grpc_guard.py`` (keys,
limits, shedding, the error codes).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.config import Config, Grpc
from common.logs import get_logger
from protocols import grpc_h2
from protocols.grpc_h2 import Context
from protocols.access import Access
from protocols.grpc_guard import Guard
from serving.dataplane import DataPlane

log = get_logger("grpc")


class Health(health.aio.HealthServicer):
    """``grpc.health.v1``: SERVING while the worker is ready (``/readyz``'s verdict), else NOT_SERVING,
    for the server (``""``) and each service it serves; checked afresh on every call (a watch sees the
    changes that checks observe)."""

    def __init__(self, dataplane: DataPlane, services: tuple[str, ...]):
        super().__init__()
        self._dataplane = dataplane
        self._services = ("", *services)

    async def refresh(self) -> None:
        ready = self._dataplane.health()["ready"]
        serving = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self._services:
            await self.set(service, serving)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: Context) -> health_pb2.HealthCheckResponse:
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        await self.refresh()
        await super().Watch(request, context)


class GrpcServer:
    """This worker's gRPC server; :meth:`start` on the worker's event loop, :meth:`stop` when it stops."""

    def __init__(self, config: Config, dataplane: DataPlane, access: Access,
                 sockets: Sequence[socket.socket] = ()):
        """``sockets``: this worker's listeners (:func:`listen`), made by its parent before it forked;
        without them :meth:`start` makes its own."""
        from protocols import grpc_oip, grpc_tfserving  # their stubs load only where gRPC is served

        self._settings = config.grpc
        self._sockets = sockets
        self.address = address(self._settings)
        guard = Guard(access, config.service.in_flight_per_worker(), config.service.retry_after_s)
        registry = grpc_h2.Registry()
        oip = grpc_oip.InferenceServicer(dataplane, guard)
        tfserving = grpc_tfserving.PredictionServicer(dataplane, guard)
        oip.register(registry)
        tfserving.register(registry)
        self._health = Health(dataplane, (oip.SERVICE, tfserving.SERVICE))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, registry)
        # A message over limits.max_body_bytes is RESOURCE_EXHAUSTED, as REST's 413.
        self._server = grpc_h2.Server(registry, config.limits.max_body_bytes, self._settings.max_connection_age_s,
                                      self._settings.shutdown_grace_s)

    async def start(self) -> None:
        await self._server.start(self._sockets or listen(self._settings))
        log.info("gRPC listening", extra={"address": self.address})

    async def stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop()


def address(settings: Grpc) -> str:
    """``host:port`` of the gRPC listeners, as logs, errors and clients name it."""
    return f"{settings.host}:{settings.resolved_port()}"


def listen(settings: Grpc) -> list[socket.socket]:
    """A worker's listeners on ``grpc.port`` (``grpc_h2.listeners``), or the error that names the key."""
    try:
        return grpc_h2.listeners(settings.host, settings.resolved_port())
    except OSError as err:
        raise RuntimeError(f"grpc.port: cannot listen on {address(settings)}: {err}") from err
