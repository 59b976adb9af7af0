"""``mace serve --replicas N``: the same server as N Ray Serve replicas that train one adapter.

    HTTP client -> Ray Serve's proxy (--host, --port)
                -> Front (the ingress; no model): reads the body, picks the routing text
                -> Replica x N (a DeploymentHandle call, routed by PrefixAffinityRouter)
                     server.api.dispatch: the very routes `mace serve` runs, on this replica's engine
                     ReplicaSync: gradients to the coordinator, its versions back
                -> Coordinator (a Ray actor, restarted if it dies): feedback store, optimizer,
                   checkpoints (trainer/distributed.py)

The Front answers with the replica's status, headers and bytes as they come (SSE streams stay
streams). A client that disconnects cancels the Front's call, which cancels the replica's
generator, which closes the response and aborts its engine streams. A replica that dies
mid-request ends that request with a clean error: a 503 in the route family's shape before the
answer began, else an error event and the stream's end.

Routing. Requests that share a prefix go to the replica whose prefix cache holds it, unless that
replica's queue is ``imbalance`` requests longer than the shortest (then the shortest queue):
the router remembers, per 64-character block of each routed prompt's text, which replica
took it. Ray's own ``PrefixCacheAffinityRouter`` lives in ``ray.serve.llm``, which needs vLLM or
SGLang installed; this one is built on the same public ``RequestRouter`` API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

COORDINATOR = "mace-coordinator"
NAMESPACE = "mace"
APP = "mace"
BLOCK_CHARS = 64  # the router's prefix granularity
MAX_BLOCKS = 32  # the first 2048 characters decide


@dataclasses.dataclass(slots=True)
class RoutedRequest:
    """What the Front hands a replica: the HTTP request as read, and the text to route by."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    query: list[tuple[str, str]]
    body: bytes
    prefix: str | None = None


class _Fields(msgspec.Struct):
    messages: list | None = None
    prompt: object = None
    inputs: str | None = None


def routing_text(path: str, body: bytes) -> str | None:
    """The text whose prefix a request's prompt starts with: chat messages' contents, a
    completion's prompt, TGI's inputs (None: nothing to route by, or a body that does not parse;
    the replica answers that one's error)."""
    if not body or path not in ("/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream"):
        return None
    try:
        fields = msgspec.json.decode(body, type=_Fields)
    except msgspec.MsgspecError:
        return None
    if fields.messages is not None:
        parts = []
        for m in fields.messages:
            if isinstance(m, dict):
                content = m.get("content")
                parts.append(f"{m.get('role')}:{content if isinstance(content, str) else repr(content)}")
        return "\n".join(parts)
    if fields.prompt is not None:
        return fields.prompt if isinstance(fields.prompt, str) else repr(fields.prompt)
    return fields.inputs


def prefix_keys(text: str) -> list[int]:
    """A running hash of each whole 64-character block of ``text`` (the first 32)."""
    keys, h = [], 0
    for i in range(min(len(text) // BLOCK_CHARS, MAX_BLOCKS)):
        h = zlib.crc32(text[i * BLOCK_CHARS : (i + 1) * BLOCK_CHARS].encode(), h)
        keys.append(h)
    return keys


class PrefixIndex:
    """Which replica took each prefix block last (LRU, bounded), and the longest match."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[int, str] = OrderedDict()

    def match(self, keys: list[int], replicas: set[str]) -> tuple[str | None, int]:
        """(the replica holding the longest prefix of ``keys`` among ``replicas``, its blocks)."""
        for depth in range(len(keys), 0, -1):
            owner = self._owner.get(keys[depth - 1])
            if owner in replicas:
                return owner, depth
        return None, 0

    def insert(self, keys: list[int], replica: str) -> None:
        for key in keys:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, replica: str) -> None:
        for key in [k for k, r in self._owner.items() if r == replica]:
            del self._owner[key]


# -- the replica ----------------------------------------------------------------------------------


class Cluster:
    """What a replica's routes ask the coordinator (``ServerState.cluster``)."""

    def __init__(self, coordinator, sync) -> None:
        self.coordinator = coordinator
        self.sync = sync

    async def status(self) -> dict:
        return await self.coordinator.status.remote()

    async def rollback(self, version: int) -> bool:
        return await self.coordinator.rollback.remote(version)

    async def set_training(self, enabled: bool) -> None:
        await self.coordinator.set_training.remote(enabled)

    async def metrics(self) -> bytes:
        """The coordinator's figures and which replica answered, in Prometheus' text format
        (appended to the replica's own /metrics)."""
        try:
            s = await self.coordinator.status.remote()
        except Exception:  # noqa: BLE001 - restarting: this scrape goes without them
            s = None
        me = self.sync.replica
        lines = ["# HELP mace_replica_info The replica that answered this scrape.", "# TYPE mace_replica_info gauge",
                 f'mace_replica_info{{replica="{me}"}} 1']
        if s is not None:
            def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
                lines.extend(f"{name}{labels} {value}" for labels, value in samples)

            family("mace_coordinator_steps_total", "counter", "Optimizer steps the coordinator took.",
                   [("", s["steps"])])
            family("mace_coordinator_stale_gradients_total", "counter",
                   "Gradients dropped as too stale (their pairs trained again).", [("", s["stale_gradients"])])
            family("mace_coordinator_version", "gauge", "The adapter version the coordinator serves.",
                   [("", s["version"])])
            family("mace_coordinator_pairs_total", "counter", "Pairs whose gradients each replica handed over.",
                   [(f'{{replica="{r}"}}', n) for r, n in sorted(s["pairs_by_replica"].items())])
            family("mace_replica_serving_version", "gauge", "The adapter version each replica serves.",
                   [(f'{{replica="{r["id"]}"}}', r["version"]) for r in s["replicas"]])
            family("mace_replica_prefix_cache_hits", "counter",
                   "Each replica's prefix-cache hit tokens (mace_prefix_cache_hits), as of its last poll.",
                   [(f'{{replica="{r["id"]}"}}', r["prefix_hit_tokens"]) for r in s["replicas"]
                    if "prefix_hit_tokens" in r])
            family("mace_replica_prefix_cache_queries", "counter",
                   "Each replica's prefix-cache query tokens (mace_prefix_cache_queries), as of its last poll.",
                   [(f'{{replica="{r["id"]}"}}', r["prefix_query_tokens"]) for r in s["replicas"]
                    if "prefix_query_tokens" in r])
            for key, name, help_ in (("broadcast_ms", "mace_coordinator_broadcast_seconds",
                                      "From a step to a replica serving it (recent, quantiles)."),
                                     ("step_ms", "mace_coordinator_step_seconds", "One optimizer step (recent).")):
                samples = [(f'{{quantile="{q}"}}', s[f"{key}_{p}"] / 1e3)
                           for q, p in (("0.5", "p50"), ("0.99", "p99")) if s.get(f"{key}_{p}") is not None]
                if samples:
                    family(name, "gauge", help_, samples)
        return ("\n".join(lines) + "\n").encode()


class Replica:
    """One engine and its routes; a Ray Serve deployment (``serve_replicas`` wraps it)."""

    async def __init__(self, args: argparse.Namespace, replica_id: str | None = None) -> None:
        from scheduler.builder import build_engine
        from server import service
        from server.app import _freeze_start_up_objects, _in_a_passing_thread
        from server.flags import apply_threads, engine_config, training_config

        if replica_id is None:
            from ray import serve

            replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica_id = replica_id
        self.sync = None
        self.state = None
        apply_threads(args)
        training = training_config(args, None)  # the coordinator checkpoints
        store = None
        coordinator = None
        if training is not None:
            import ray

            from trainer.distributed import CoordinatorStore

            coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
            store = CoordinatorStore(lambda name, *a: ray.get(getattr(coordinator, name).remote(*a)), replica_id)
        core, runner = await _in_a_passing_thread(lambda: build_engine(engine_config(args), training, store))
        api_key = args.api_key
        if args.api_key_file:
            api_key = Path(args.api_key_file).read_text().strip()
        self.state = service.build_state(
            core, runner, model_name=args.served_model_name, api_key=api_key or None,
            max_waiting_requests=args.max_waiting_requests, refuse_late_requests=args.refuse_late_requests,
            max_request_bytes=args.max_request_bytes, shutdown_grace_s=args.shutdown_grace, feedback_store=store,
        )
        await service.start(self.state)
        if coordinator is not None:
            from trainer.distributed import ReplicaSync

            queues = core.queues
            self.sync = ReplicaSync(
                self.state.engine.training, self.state.engine, replica_id,
                lambda *a: coordinator.poll.remote(*a), lambda *a: coordinator.submit.remote(*a),
                lambda *a: coordinator.register.remote(*a), poll_timeout_s=2.0,
                stats=lambda: {"prefix_query_tokens": queues.num_prefix_query_tokens,
                               "prefix_hit_tokens": queues.num_prefix_hit_tokens})
            await self.sync.start()
            self.state.cluster = Cluster(coordinator, self.sync)
        _freeze_start_up_objects()
        log.info("replica %s serving %s", replica_id, self.state.model_name)

    async def handle(self, routed: RoutedRequest):
        """The route's answer: first (status, headers, streamed), then the body's bytes."""
        from multidict import CIMultiDict

        from server.api import ApiRequest, dispatch

        async def read() -> bytes:
            return routed.body

        request = ApiRequest(self.state, routed.method, routed.path, CIMultiDict(routed.headers), read,
                             dict(routed.query))
        response = await dispatch(request)
        response.headers["x-mace-replica"] = self.replica_id
        try:
            yield response.status, response.headers, response.stream is not None
            if response.stream is None:
                yield response.body
                return
            async for data in response.stream:
                yield data
        finally:
            await response.close()

    async def check_health(self) -> None:
        task = self.state.engine._task
        if task is not None and task.done():
            raise RuntimeError("the engine loop stopped")

    async def __del__(self) -> None:
        from server import service

        if self.state is None:
            return
        if self.sync is not None:
            await self.sync.stop()
        await service.drain(self.state)
        await service.stop(self.state)


# -- the front door -------------------------------------------------------------------------------


class Front:
    """The ingress: an HTTP request in, the replica's answer out."""

    def __init__(self, replicas, max_request_bytes: int) -> None:
        self.replicas = replicas
        self.max_request_bytes = max_request_bytes

    async def __call__(self, request):
        from starlette.responses import Response, StreamingResponse

        from server.api import error_response
        from server.errors import ApiError

        path = request.url.path
        is_tgi = path.startswith("/generate")
        body = await request.body()
        if len(body) > self.max_request_bytes:
            error = error_response(ApiError(413, f"the body is over the limit of {self.max_request_bytes} bytes", None,
                                            "request_too_large"), is_tgi)
            return Response(error.body, error.status, error.headers)
        routed = RoutedRequest(request.method, path, list(request.headers.items()), list(request.query_params.items()),
                               body, routing_text(path, body))
        call = self.replicas.options(stream=True, method_name="handle").remote(routed)
        try:
            status, headers, streamed = await call.__anext__()
            headers.pop("x-request-id", None)  # the proxy adds its own, the same id
            if not streamed:
                return Response(await call.__anext__(), status, headers)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the replica died or could not be reached
            log.warning("request to %s failed on its replica: %r", path, exc)
            error = error_response(ApiError(503, "the replica serving this request stopped; retry", None,
                                            "replica_unavailable"), is_tgi)
            return Response(error.body, error.status, {**error.headers, "Retry-After": "1"})
        return StreamingResponse(_forward(call, is_tgi), status, headers)


async def _forward(call, is_tgi: bool):
    """The replica's streamed bytes; a replica lost mid-stream ends it with an error event."""
    from protocol import tgi
    from protocol.sse import DONE, encode_event
    from server.errors import error_body

    try:
        async for data in call:
            yield data
    except asyncio.CancelledError:
        call.cancel()
        raise
    except Exception as exc:  # noqa: BLE001
        log.warning("stream lost its replica: %r", exc)
        message = "the replica serving this stream stopped"
        if is_tgi:
            yield encode_event(msgspec.json.encode(tgi.ErrorResponse(message, "unavailable")), with_space=False)
        else:
            yield encode_event(error_body(503, message, None, "replica_unavailable", "unavailable", False))
            yield encode_event(DONE)


# -- mace serve --replicas N ----------------------------------------------------------------------


def build_application(args: argparse.Namespace):
    """The Ray Serve application of ``args``: the Front over ``--replicas`` Replicas."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    routing = ({"request_router_config": RequestRouterConfig(
        request_router_class="server.ray_router.PrefixAffinityRouter")} if args.replica_router == "prefix" else {})
    replica = serve.deployment(
        Replica, name="Replica", num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.replica_threads},
        max_ongoing_requests=args.max_waiting_requests + 64,
        health_check_period_s=2.0, graceful_shutdown_timeout_s=args.shutdown_grace,
        logging_config={"enable_access_log": False}, **routing,  # no log line per request, as without Ray
    )
    front = serve.deployment(Front, name="Front", num_replicas=1, ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=100_000, logging_config={"enable_access_log": False})
    replica_args = argparse.Namespace(**{**vars(args), "threads": args.replica_threads})
    replica_args.func = None
    return front.bind(replica.bind(replica_args), args.max_request_bytes)


def _shared_coordinator():
    import ray

    from trainer.distributed import Coordinator

    class SharedCoordinator(Coordinator):
        """The coordinator as a Ray actor: each step's weights go into the object store once."""

        def share(self, weights):
            return ray.put(weights)

    return SharedCoordinator


def start_coordinator(args: argparse.Namespace):
    """The coordinator actor (restarted by Ray if it dies), or None with training off."""
    import ray

    from server.flags import training_config

    config = training_config(args, str(args.state_dir))
    if config is None:
        return None
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on this node, where --state-dir is (a restart comes back to it)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(_shared_coordinator()).options(name=COORDINATOR, namespace=NAMESPACE, max_restarts=-1,
                                            max_task_retries=0, num_cpus=0, get_if_exists=True,
                                            scheduling_strategy=here)
    handle = actor.remote(str(args.state_dir), config)
    ray.get(handle.status.remote())  # constructed (the store opened, the checkpoint loaded)
    return handle


@dataclasses.dataclass
class Application:
    """A running ``--replicas`` application: what ``stop_application`` takes down."""

    coordinator: object | None  # held: an actor no handle refers to is collected
    joined: bool  # a cluster of someone else's (--ray-address): only what this started goes


def start_application(args: argparse.Namespace, stop: threading.Event | None = None) -> Application:
    """Ray (local, or ``--ray-address``), the coordinator, Serve's proxy on ``--host``/``--port``
    and the application, ready to answer. With ``stop``, SIGTERM and SIGINT set it from the
    moment Ray is up (``ray.init`` installs handlers of its own that kill the process)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    if getattr(args, "tenants", None):
        raise SystemExit("--tenants is not supported with --replicas")
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    ray.init(address=args.ray_address or "local", namespace=NAMESPACE, log_to_driver=True,
             include_dashboard=args.ray_dashboard, **({} if args.ray_address else {"num_cpus": os.cpu_count()}))
    if stop is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    app = Application(start_coordinator(args), bool(args.ray_address))
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_application(args), name=APP, route_prefix="/")
    except BaseException:
        stop_application(app)
        raise
    return app


def stop_application(app: Application) -> None:
    import ray
    from ray import serve

    try:
        if app.joined:
            serve.delete(APP)
            if app.coordinator is not None:
                ray.kill(app.coordinator)
        else:
            serve.shutdown()
    except Exception:  # noqa: BLE001 - Ray goes down below either way
        log.exception("stopping the Serve application failed")
    finally:
        ray.shutdown()


def serve_replicas(args: argparse.Namespace) -> None:
    """``mace serve --replicas N``: run the application until SIGTERM or SIGINT, then shut Serve
    and the local Ray down (exit 0)."""
    t0 = time.monotonic()
    stop = threading.Event()
    app = start_application(args, stop)
    log.info("serving %d replicas on http://%s:%d (started in %.1f s)", args.replicas, args.host, args.port,
             time.monotonic() - t0)
    stop.wait()
    log.info("shutting down the Serve application")
    stop_application(app)
    log.info("stopped")
