"""The HTTP app (FastAPI): ``/v1/classify``, the Open Inference Protocol v2 endpoints and
``/metrics``, with the bearer token, the body and concurrency limits and one-line errors.

The same app runs under uvicorn (``cxr-serve``) and as a Ray Serve deployment (``cxr-serve
--ray``); only how a decoded image reaches a batch differs (:attr:`Service.score`).

Every answer that is not a result is ``{"error": "one line"}``: 400 a bad image (the message
``cxr-infer`` gives for it) or request, 401 no or a wrong token, 404 an unknown model, 413 a body
over the limit, 503 (with ``Retry-After``) too many requests at once, 500 anything unforeseen,
without a traceback. Logs carry the method, route, status and time, never a request's content.

Examples:
    >>> app = build_app(Service(ServeConfig(model="m.onnx")))     # doctest: +SKIP
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)   # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from cxr_infer.errors import InputError

from . import __version__, oip
from .service import Service, message_of, record

LOG = logging.getLogger("cxr_serve")
#: Routes that answer without the token: what a load balancer or an orchestrator probes.
OPEN_ROUTES = ("/v2/health/live", "/v2/health/ready")
RETRY_AFTER_S = 1


class Problem(Exception):
    """An answer other than a result: its status, one line, and extra headers."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _flag(value: Optional[str], name: str) -> bool:
    if value is None or value.lower() in ("0", "false", "no", ""):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise Problem(400, f"?{name}={value}: expected true or false")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    too_big = Problem(413, f"the body is larger than the limit of {limit} bytes (cxr-serve --max-body-mb)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks: List[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


@asynccontextmanager
async def _slot(service: Service) -> AsyncIterator[None]:
    if not service.try_enter():
        service.metrics.rejected.labels("concurrency").inc()
        raise Problem(503, f"busy: {service.config.max_concurrency} requests are being answered; retry shortly",
                      {"Retry-After": str(RETRY_AFTER_S)})
    try:
        yield
    finally:
        service.leave()


async def score_images(service: Service, bodies: List[bytes], heatmap: bool = False) -> List[Dict[str, Any]]:
    """Decode each body (in worker threads), score them in the service's batches and give the records."""
    if heatmap and not service.classifier.heatmap_available:
        raise Problem(400, "this model has no heatmap output (add it: python -m cxr_export.heatmap MODEL.onnx)")
    service.images_begin(len(bodies))
    try:
        decoded = await asyncio.gather(*(run_in_threadpool(service.decode, b) for b in bodies),
                                       return_exceptions=True)
        for i, d in enumerate(decoded):
            if isinstance(d, InputError):
                raise Problem(400, message_of(d) if len(bodies) == 1 else f"image {i}: {message_of(d)}")
            if isinstance(d, BaseException):
                raise d
        service.submitted(len(decoded))
        assert service.score is not None, "the host sets Service.score"
        predictions = await asyncio.gather(*(service.score(d, heatmap) for d in decoded))
        records = [record(p) for p in predictions]
        if heatmap:
            pngs = await asyncio.gather(*(run_in_threadpool(service.overlay_png, b, p)
                                          for b, p in zip(bodies, predictions)))
            for r, png in zip(records, pngs):
                r["overlay_png"] = base64.b64encode(png).decode()
        return records
    finally:
        service.images_end(len(bodies))


def _check_model(service: Service, name: str, version: Optional[str] = None) -> None:
    if name != service.config.model_name:
        raise Problem(404, f"unknown model {name!r} (this server has {service.config.model_name!r})")
    if version is not None and version != oip.VERSION:
        raise Problem(404, f"unknown version {version!r} of {name!r} (it has {oip.VERSION!r})")


def _output_names(service: Service) -> List[str]:
    return [o["name"] for o in oip.output_specs(service.classifier.spec.labels, service.classifier.domain_available)]


async def _infer(service: Service, request: Request, name: str, version: Optional[str]) -> Response:
    _check_model(service, name, version)
    async with _slot(service):
        body = await read_body(request, service.config.max_body_bytes)
        try:
            parsed = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH), _output_names(service))
        except oip.ProtocolError as exc:
            raise Problem(400, str(exc)) from None
        records = await score_images(service, parsed.images)
        content, headers = oip.build_response(name, parsed, records, service.classifier.spec.labels)
        return Response(content, headers=headers)


def _routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        heatmap = _flag(request.query_params.get("heatmap"), "heatmap")
        async with _slot(service):
            body = await read_body(request, service.config.max_body_bytes)
            (answer,) = await score_images(service, [body], heatmap)
            return JSONResponse(answer)

    @app.get("/v2")
    async def server_metadata() -> Dict[str, Any]:
        return {"name": "cxr", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> Dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Dict[str, Any]:
        return {"ready": True}

    @app.get("/v2/models/{name}")
    async def metadata(name: str) -> Dict[str, Any]:
        _check_model(service, name)
        return oip.model_metadata(name, service.classifier.spec.labels, service.classifier.domain_available)

    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata_version(name: str, version: str) -> Dict[str, Any]:
        _check_model(service, name, version)
        return oip.model_metadata(name, service.classifier.spec.labels, service.classifier.domain_available)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Dict[str, Any]:
        _check_model(service, name)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        return await _infer(service, request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await _infer(service, request, name, version)

    @app.get("/metrics")
    async def metrics() -> Response:
        content, media_type = service.metrics.render()
        return Response(content, media_type=media_type)


def _authorized(service: Service, request: Request) -> bool:
    token = service.config.token
    if token is None or request.url.path in OPEN_ROUTES:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _answer(problem: Problem) -> JSONResponse:
    return JSONResponse({"error": problem.message}, status_code=problem.status, headers=problem.headers)


def build_app(service: Service) -> FastAPI:
    """The FastAPI app serving ``service``."""
    app = FastAPI(title="cxr", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Problem)
    async def problem(_request: Request, exc: Problem) -> JSONResponse:
        return _answer(exc)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        if not _authorized(service, request):
            response: Response = _answer(Problem(401, "a valid bearer token is required (Authorization: Bearer "
                                                      "TOKEN)", {"WWW-Authenticate": "Bearer"}))
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # never a traceback to the client; the type only in the log
                LOG.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
                response = _answer(Problem(500, f"internal error ({type(exc).__name__}); see the server's log"))
        route = getattr(request.scope.get("route"), "path", None) or "other"
        elapsed = time.perf_counter() - t0
        service.metrics.observe_request(route, response.status_code, elapsed)
        LOG.info("%s %s %d %.1f ms", request.method, route, response.status_code, elapsed * 1000)
        return response

    _routes(app, service)
    return app
