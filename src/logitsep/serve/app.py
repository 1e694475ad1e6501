"""The HTTP service: a FastAPI app over a :class:`~logitsep.serve.service.Service`.

Every error is a 4xx answer ``{"error": "<what is wrong>"}``; the OpenAPI schema is at ``/openapi.json``
(interactive docs at ``/docs``). Routes: ``/health``, ``/classes`` (``POST``: enroll a class from images,
``DELETE /classes/{id}``: remove an enrolled one), ``/search``, ``/query``, ``/ingest``, ``/stream`` (server-sent
events), ``/items/{id}.png``, ``/stats`` and the live page at ``/``.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.
import asyncio
import contextlib
import hmac
import json
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Annotated, Any

from ..core.extras import require

require("fastapi")  # without it: one line naming the [serve] extra, not a traceback

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..enrollment import MAX_NAME
from .idempotency import key_id
from .requests import BASE64_PATTERN, MAX_IMAGES, BadInput, decode_base64
from .service import Service

MAX_BODY = 8 << 20  # bytes per request body
STATIC = files("logitsep.serve") / "static"
# Content security policies: every answer forbids framing (clickjacking); API answers allow nothing else.
CSP_API = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
CSP = b"default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"  # the page
# /docs: Swagger UI from the CDN (pinned, with integrity hashes: static/docs.html), its start script from here;
# Swagger UI sets style attributes and draws data: images
CSP_DOCS = (b"default-src 'none'; script-src 'self' https://cdn.jsdelivr.net; style-src https://cdn.jsdelivr.net "
            b"'unsafe-inline'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
            b"frame-ancestors 'none'; form-action 'none'")


def _csp(path: str) -> bytes:
    if path == "/docs":
        return CSP_DOCS
    if path == "/" or path.startswith("/static/") or path == "/favicon.ico":
        return CSP
    return CSP_API


# ------------------------------------------------------------------------------------------------ schema
# One base64 PNG: the schema states the encoding (pattern, not empty); that the bytes are a PNG the model takes (its
# size, its mode) JSON Schema cannot say: such a string is refused with 400 (not a PNG) or 422 (another size/mode).
PNG_BASE64 = {"contentEncoding": "base64", "contentMediaType": "image/png"}
Image = Annotated[str, Field(min_length=1, pattern=BASE64_PATTERN, json_schema_extra=PNG_BASE64)]
# A class name: not blank, no control characters (the server also refuses a name in use or one that reads as a
# number, "12", with 409: they conflict with the existing names and ids).
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"


class Health(BaseModel):
    status: str = "ok"


class ClassInfo(BaseModel):
    id: int
    name: str
    threshold: float = Field(description="this class's calibrated threshold (the defaults use the global one)")
    enrolled: bool = Field(False, description="added after training (POST /classes); its threshold is the global one")


class EnrollRequest(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN,
                      description="the new class's name: not blank, no control characters; a name in use or one "
                                  "that reads as a number is refused with 409")
    images: list[Image] = Field(min_length=1, max_length=MAX_IMAGES, description="base64 PNGs of the new class")


class EnrollResult(BaseModel):
    id: int = Field(description="the new class's id (enrolled classes follow the trained ones)")
    name: str
    examples: int
    threshold: float = Field(description="the class's threshold: the run's global threshold")


class Removed(BaseModel):
    removed: int = Field(description="the id the class had; enrolled classes after it moved down one id")
    name: str


class Classes(BaseModel):
    classes: list[ClassInfo]
    threshold: float = Field(description="the calibrated global threshold: the default everywhere")
    score_range: list[float] = Field(description="a suggested [low, high] range for a threshold slider")
    total: int = Field(description="items in the index")


class Stats(BaseModel):
    items: int = Field(description="items in the index")
    ingested: int = Field(description="items this server process added")
    subscribers: int = Field(description="open /stream connections")
    dropped: int = Field(description="stream events lost to full subscriber queues")


class Item(BaseModel):
    id: int
    score: float = Field(description="the item's logit for the class")


class SearchResult(BaseModel):
    class_id: int
    threshold: float | None = Field(description="scores >= threshold are returned; null for a plain top-k")
    items: list[Item] = Field(description="sorted by score, descending")
    scanned: int = Field(description="items the index looked at")
    ms: float = Field(description="server time of the search, milliseconds")
    cached: bool = Field(description="the class's scores were kept from an earlier search (only new items scored)")
    total: int = Field(description="items in the index")


class QueryRequest(BaseModel):
    class_id: int = Field(strict=True, ge=0, description="the class to score, 0..k-1 (see /classes); an unknown "
                                                          "one: 404")
    image: Image = Field(description="base64 PNG of the model's image size")
    threshold: float | None = Field(None, strict=True, allow_inf_nan=False,
                                    description="default: the global threshold (a number; true/false are refused)")


class QueryResult(BaseModel):
    class_id: int
    score: float = Field(description="the single logit of the class: one dot product on the image's embedding")
    match: bool = Field(description="score >= threshold")
    threshold: float
    ms: float = Field(description="server time of embedding + scoring, milliseconds")


class IngestRequest(BaseModel):
    images: list[Image] = Field(min_length=1, max_length=MAX_IMAGES, description="base64 PNGs")


class IngestResult(BaseModel):
    added: int
    total: int = Field(description="items in the index after this request")
    ids: list[int] = Field(description="ids given to the new items, in request order")


class Error(BaseModel):
    error: str


ERROR_TEXT = {
    400: "malformed request: bad JSON, malformed base64, bytes that are not a readable PNG, a Host not served here",
    401: "missing or wrong bearer token (only when the server has one)",
    404: "no such class: class_id is not one of the current classes 0..k-1 (enrollment and removal change k at "
         "run time: see /classes)",
    409: "conflict: a class name in use or one that reads as a number; removing a trained class",
    413: "request body too large (the server's --max-body, 8 MiB by default)",
    422: "a request outside the schema, or an image of another size or mode than the model's",
    503: "too many stream subscribers",
    507: "insufficient storage: the disk is full, nothing was added",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Error, "description": ERROR_TEXT[code]} for code in codes}


ERRORS = _errors(400, 401, 404, 409, 413, 422, 503, 507)
CLASS_ERRORS = _errors(400, 404, 413, 422)  # reads that take a class_id


# ------------------------------------------------------------------------------------------------ middleware
class Guard:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 (by ``Content-Length``, or while the body
    streams in), and give every answer ``X-Content-Type-Options: nosniff`` and a content security policy that
    forbids framing (:func:`_csp`)."""

    def __init__(self, app: Callable, max_bytes: int, allowed_hosts: frozenset[str] | None = None) -> None:
        self.app, self.max_bytes, self.allowed_hosts = app, max_bytes, allowed_hosts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        outer, policy = send, _csp(scope.get("path", ""))

        async def send(message: dict) -> None:  # every answer, the guard's own refusals too
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", policy)]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await outer(message)

        if scope["method"] == "HEAD":  # HEAD is GET without the body (RFC 9110): the routes declare GET only
            scope = {**scope, "method": "GET"}
            inner, ended = send, False

            async def send(message: dict) -> None:  # headers as for GET, then an empty body, once (a stream too)
                nonlocal ended
                if message["type"] == "http.response.body":
                    if ended:
                        return
                    ended, message = True, {"type": "http.response.body", "body": b"", "more_body": False}
                await inner(message)
        if self.allowed_hosts is not None:  # DNS rebinding: a page elsewhere must not reach a loopback server
            host = _host_name(dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                response = JSONResponse({"error": f"host {host!r} is not served here (a server bound to this "
                                                  "machine answers only to its loopback names)"}, status_code=400)
                return await response(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse({"error": f"request body too large: {length.decode(errors='replace')} bytes, "
                                              f"the limit is {self.max_bytes}"}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, f"request body too large: over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port (``[::1]:8000`` → ``::1``), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _validation_message(err: RequestValidationError) -> tuple[int, str]:
    parts, status = [], 422
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ())]
        if e.get("type") == "json_invalid":
            status = 400
            parts.append(f"body: malformed JSON ({e.get('ctx', {}).get('error', 'cannot parse')})")
            continue
        raw = list(e.get("loc", ()))[1:]  # a list index as [i]: images[3], as the service's own errors say
        where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(raw))
        where = where or (loc[0] if loc else "request")
        source = f" ({loc[0]})" if loc and loc[0] in ("query", "path") else ""
        message = e.get("msg", "invalid")
        if e.get("type") == "string_pattern_mismatch":  # the schema's patterns, said in words
            if raw and raw[0] in ("image", "images"):
                status, message = 400, ("malformed base64 (padded standard base64, optionally after a "
                                        "'data:image/png;base64,' prefix)")
            else:
                message = "must not be blank nor contain control characters"
        parts.append(f"{where}{source}: {message}")
    return status, "; ".join(parts) or "invalid request"


# ------------------------------------------------------------------------------------------------ app
def create_app(service: Service, *, token: str | None = None, max_body: int = MAX_BODY, heartbeat: float = 15.0,
               tasks: list[Callable[[Service], Awaitable[None]]] | None = None,
               allowed_hosts: frozenset[str] | None = None) -> FastAPI:
    """The FastAPI app. ``token``: a bearer token /ingest requires; ``tasks``: coroutines run while the app
    lives (the demo feed), cancelled at shutdown; ``heartbeat``: seconds between SSE keep-alive comments;
    ``allowed_hosts``: the ``Host`` names answered (others: 400), e.g. :data:`LOOPBACK_HOSTS` for a server bound
    to this machine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        running = [asyncio.create_task(task(service)) for task in tasks or []]
        yield
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    app = FastAPI(title="logitsep", summary="single-logit class search over a live stream of images",
                  description=__doc__, version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    _add_error_handlers(app)
    app.add_middleware(Guard, max_bytes=max_body, allowed_hosts=allowed_hosts)
    _add_read_routes(app, service)
    _add_write_routes(app, service, _authorizer(token), token)
    _add_stream_route(app, service, heartbeat)
    _add_page_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is ``{"error": "..."}`` with its 4xx status."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405:  # every method of the path, not only those of the first route that matched it
            headers = {**(headers or {}), "Allow": ", ".join(_methods(app, request.scope))}
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)


def _methods(app: FastAPI, scope: dict) -> list[str]:
    """The methods the routes of a request's path answer (HEAD with GET)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "GET"} if scope.get("type") == "http" else scope)
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _authorizer(token: str | None) -> Callable[..., None] | None:
    """The dependency that checks ``Authorization: Bearer <token>``; None when the server has no token."""
    if token is None:
        return None
    bearer = HTTPBearer(auto_error=False, description="required on /ingest and on changes to /classes")

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    return authorize


ClassId = Annotated[int, Query(ge=0, description="class id, 0..k-1 (see /classes); an unknown one: 404")]
Threshold = Annotated[float | None, Query(allow_inf_nan=False, description="default: the global threshold")]


def _add_read_routes(app: FastAPI, service: Service) -> None:
    """``/health``, ``/stats``, ``/classes``, ``/search``, ``/query``."""

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats", response_model=Stats)
    async def stats() -> dict[str, int]:
        return service.stats()

    @app.get("/classes", response_model=Classes)
    async def classes() -> dict[str, Any]:
        return service.classes()

    @app.get("/search", response_model=SearchResult, responses=CLASS_ERRORS)
    async def search(class_id: ClassId, threshold: Threshold = None,
                     top_k: Annotated[int | None, Query(ge=1, le=1_000_000, description="the k best")] = None) -> Any:
        """Items of a class: scores ``>= threshold`` (default: the calibrated global threshold), or the ``top_k``
        best, or the ``top_k`` best above ``threshold``."""
        result = await run_in_threadpool(service.search, class_id, threshold, top_k)
        return JSONResponse(result)

    @app.post("/query", response_model=QueryResult, responses=CLASS_ERRORS)
    async def query(body: QueryRequest) -> Any:
        """Score one image for one class: embed it and compute **one** logit."""
        service.check_class(body.class_id)
        png = decode_base64(body.image, "image")
        # About a millisecond of work (decode, one small forward pass, one dot product): done on the event loop.
        # Handing it to a worker thread costs a thread wake-up, which on a loaded 2-core machine is the tail.
        return service.query(body.class_id, png, body.threshold)


INGEST_OK = {"description": "the items added; with a known Idempotency-Key the first answer again, and an "
                            "`Idempotent-Replayed: true` header",
             "headers": {"Idempotent-Replayed": {"description": "true: this key's first answer, nothing was stored",
                                                 "schema": {"type": "string"}}}}
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[!-~]+$",
    description="any key of 1 to 200 visible ASCII characters, new for each new request: a retry with the same key "
                "and images gets the first answer and stores nothing (keys are kept per token, the last 4,096)")]


def _add_write_routes(app: FastAPI, service: Service, authorize: Callable[..., None] | None,
                      token: str | None = None) -> None:
    """``/ingest``, ``POST /classes``, ``DELETE /classes/{id}`` (bearer token when the server has one; without
    one the schema declares no ``Authorization`` header: a client built from it sends none)."""
    guard = [Depends(authorize)] if authorize is not None else []

    @app.post("/ingest", response_model=IngestResult, responses={**ERRORS, 200: INGEST_OK}, dependencies=guard)
    async def ingest(body: IngestRequest, response: Response, idempotency_key: IdempotencyKey = None) -> Any:
        """Embed the images once and append them to the index (all or nothing); ``/stream`` announces matches.
        With an ``Idempotency-Key``, a retry (same key, same images) gets the first answer and stores nothing,
        also after a restart; the same key with other images is a 422."""
        pngs = [decode_base64(text, f"images[{i}]") for i, text in enumerate(body.images)]
        if idempotency_key is None:
            return await service.ingest_async(pngs)
        answer, replayed = await service.ingest_once_async(pngs, key_id(token or "", idempotency_key))
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return answer

    @app.post("/classes", response_model=EnrollResult, responses=ERRORS, dependencies=guard)
    async def enroll(body: EnrollRequest) -> Any:
        """Add a class from a few images (all or nothing; persisted in the run folder before it answers): its row
        is placed against the global threshold, which becomes its threshold. 409: the name is in use."""
        pngs = [decode_base64(text, f"images[{i}]") for i, text in enumerate(body.images)]
        return await service.in_writer(service.enroll, body.name, pngs)

    @app.delete("/classes/{class_id}", response_model=Removed, responses=ERRORS, dependencies=guard)
    async def remove(class_id: Annotated[int, Path(ge=0, description="an enrolled class's id")]) -> Any:
        """Remove an enrolled class (409 for a trained one); the enrolled classes after it move down one id."""
        return await service.in_writer(service.remove, class_id)


def _add_stream_route(app: FastAPI, service: Service, heartbeat: float) -> None:
    """``/stream``: server-sent events."""

    @app.get("/stream", responses={**_errors(400, 404, 413, 422, 503), 200: {"content": {"text/event-stream": {}}}},
             response_class=StreamingResponse)
    async def stream(class_id: ClassId, threshold: Threshold = None) -> StreamingResponse:
        """Server-sent events: ``match`` ``{"id", "score", "class_id", "class", "time"}`` for each new item scoring
        ``>= threshold`` (default: the calibrated global threshold), ``ingest`` ``{"added", "total", "time"}``
        after each ingest, and a ``:`` comment every few seconds to keep the connection alive."""
        service.check_class(class_id)  # refuse bad parameters before the stream starts
        if threshold is not None:
            service.check_threshold(threshold)
        if service.stream.full():
            raise HTTPException(503, f"too many stream subscribers ({service.stats()['subscribers']}, the limit); "
                                     "try again later")

        async def events():
            sub = service.subscribe(class_id, threshold)
            try:
                yield f"retry: 2000\n: class {sub.class_id} threshold {sub.threshold}\n\n"
                while True:
                    if sub.closed:  # dropped for falling behind: say so and end
                        closed = json.dumps({"reason": "fell behind", "dropped": sub.dropped})
                        yield f"event: closed\ndata: {closed}\n\n"
                        return
                    try:
                        kind, data = await asyncio.wait_for(sub.queue.get(), timeout=heartbeat)
                    except asyncio.TimeoutError:
                        yield ": heartbeat\n\n"
                        continue
                    item_id = f"id: {data['id']}\n" if kind == "match" else ""
                    yield f"{item_id}event: {kind}\ndata: {json.dumps(data)}\n\n"
            finally:
                service.unsubscribe(sub)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _add_page_routes(app: FastAPI, service: Service) -> None:
    """Item images, the live page and its static files."""

    @app.get("/items/{item_id}.png", response_class=Response, responses={200: {"content": {"image/png": {}}},
                                                                          404: {"model": Error}})
    async def item_image(item_id: int) -> Response:
        """The image of an item: as ingested, or drawn from the dataset split the index was built from."""
        image = await run_in_threadpool(service.image, item_id)
        if image is None:
            raise HTTPException(404, f"no image for item {item_id}")
        cache = {"Cache-Control": "no-cache"}  # revalidate: a fresh index (a new demo) reuses the ids
        if isinstance(image, bytes):
            return Response(image, media_type="image/png", headers=cache)
        return FileResponse(image, media_type="image/png", headers=cache)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        """Swagger UI, pinned and integrity-checked (FastAPI's own /docs loads a floating version, no hashes)."""
        return FileResponse(str(STATIC / "docs.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
