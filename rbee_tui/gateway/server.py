"""The gateway's HTTP side: the OpenAI routes, /health and /state, the API key and the body limit.

Every request is checked as a worker checks it (openai_check.py, params.py's table) before anything is
routed, so a bad request never starts a worker; the worker then checks it again against its own engine and
context, and its refusal comes back as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from rbee_tui.catalog import human_size
from rbee_tui.errors import RbeeError
from rbee_tui.gateway import forward
from rbee_tui.gateway.auth import authorized
from rbee_tui.gateway.events import WorkerLost
from rbee_tui.gateway.ondemand import NoWorker
from rbee_tui.gateway.routes import Key
from rbee_tui.worker.openai_api import openai_error
from rbee_tui.worker.openai_check import check_chat, check_completion
from rbee_tui.worker.params import CHAT, COMPLETIONS, ROUTES, SERVER
from rbee_tui.worker.requests import BadRequest, parse_json
from rbee_tui.worker.sse import last_resort

if TYPE_CHECKING:
    from rbee_tui.gateway.service import Gateway

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
# The worker checks max_tokens against its own context; here only the shape of the request is checked.
CHECK_CTX = 1 << 30


def _refusal(message: str, status: int, code: str, param: str | None = None) -> web.Response:
    """An OpenAI error with a `code` (model_not_found, invalid_api_key, ...), as OpenAI's own API sends them."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)


def _auth(key: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every route needs the key: a caller without it learns nothing, not even which models there are."""
        if not authorized(request.headers.get("Authorization"), key):
            response = _refusal("missing or wrong API key (Authorization: Bearer KEY)", 401, "invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await handler(request)

    return check


async def _read(request: web.Request, limit: int) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(
            f"the body is larger than {limit} bytes ({human_size(limit)}, gateway.max_body)", status=413
        ) from None


def _check(kind: str, raw: bytes) -> tuple[str, bool]:
    """The model a request names and whether it streams; BadRequest as a worker would refuse it."""
    body = parse_json(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model is required: a catalog model id (GET /v1/models lists them)", "model")
    # The llama-server column: the one that lets more through; a worker of the other engine refuses the rest.
    if kind == CHAT:
        checked = check_chat(body, CHECK_CTX, True, engine=SERVER)
    else:
        checked = check_completion(body, CHECK_CTX, engine=SERVER)
    return model, checked.stream


async def _complete(request: web.Request, kind: str) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    gw.count_request()
    try:
        raw = await _read(request, gw.config.max_body)
        model, streamed = _check(kind, raw)
    except BadRequest as exc:
        return openai_error(exc)
    if not await gw.known(model):
        known = ", ".join(sorted(gw.model_ids())) or "none"
        return _refusal(
            f"model {model!r} is in no connected pool's catalog (known: {known})", 404, "model_not_found", "model"
        )
    tried: set[Key] = set()
    last = ""
    for attempt in range(2):
        try:
            route = await gw.ondemand.route(model, tried)
        except NoWorker as exc:
            text = f"{exc.message}; an earlier worker failed: {last}" if last else exc.message
            return _refusal(text, 503, "no_worker")
        tried.add(route.key)
        extra = {"X-Rbee-Pool": route.pool, "X-Rbee-Worker": route.worker_id}
        try:
            url = await gw.table.url(route)
            if streamed:
                return await forward.stream(
                    request,
                    gw.session,
                    url,
                    ROUTES[kind],
                    raw,
                    extra,
                    functools.partial(gw.explain, route),
                    gw.background,
                )
            return await forward.whole(request, gw.session, url, ROUTES[kind], raw, extra)
        except (forward.Lost, RbeeError) as exc:
            cause = exc.cause if isinstance(exc, forward.Lost) else str(exc)
            gw.table.mark_broken(route, cause)
            last = await gw.explain(route, cause)
            gw.notify(WorkerLost(model, f"{route.worker_id} on {route.pool}", last, retried=attempt == 0))
        finally:
            gw.table.release(route)
    return _refusal(f"{model}: the worker failed twice; last: {last}", 502, "worker_lost")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, routed to a worker of the model."""
    return await _complete(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions, routed to a worker of the model."""
    return await _complete(request, COMPLETIONS)


def _model(model_id: str, info: dict[str, Any]) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(info["created"]), "owned_by": "rbee", "rbee": info}


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: every model a request may name (a worker is up, or one can be started)."""
    gw = request.app[GATEWAY]
    found = await gw.model_list()
    return web.json_response({"object": "list", "data": [_model(m, info) for m, info in sorted(found.items())]})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}."""
    gw = request.app[GATEWAY]
    name = request.match_info["model"]
    info = (await gw.model_list()).get(name)
    if info is None:
        return _refusal(f"model {name!r} is in no connected pool's catalog", 404, "model_not_found", "model")
    return web.json_response(_model(name, info))


async def health(request: web.Request) -> web.Response:
    """GET /health: the gateway answers; how many pools and workers it reaches."""
    gw = request.app[GATEWAY]
    pools = {n: c.view.state for n, c in gw.clients().items()}
    routable = sum(r.routable for r in gw.table.routes.values())
    return web.json_response({"status": "ok", "pools": pools, "workers": routable, "uptime_s": gw.uptime()})


async def state(request: web.Request) -> web.Response:
    """GET /state: pools, workers, cluster placements and queues."""
    return web.json_response(request.app[GATEWAY].state())


@web.middleware
async def _openai_shaped(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A path or method the gateway does not serve: an OpenAI error saying what it serves, not aiohttp's text."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return _refusal(f"{request.method} is not allowed on {request.path} (use {allowed})", 405, "method_not_allowed")
    except web.HTTPNotFound:
        served = "/v1/models, /v1/chat/completions, /v1/completions, /health and /state"
        return _refusal(f"no route {request.path}: the gateway serves {served}", 404, "unknown_route")


def build_app(gw: Gateway, key: str | None, max_body: int) -> web.Application:
    """The gateway's aiohttp application."""
    middlewares = [_openai_shaped, last_resort] if key is None else [_auth(key), _openai_shaped, last_resort]
    app = web.Application(client_max_size=max_body, middlewares=middlewares)
    app[GATEWAY] = gw
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/state", state)
    return app
