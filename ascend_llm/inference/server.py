"""OpenAI-compatible HTTP server (FastAPI): the app and its routes. The request logic is in serving.py, the bodies
in protocol.py, the metrics in metrics.py.

Routes: GET /health (JSON; 503 while shutting down), GET /metrics (Prometheus text), GET /v1/models,
GET /v1/models/{id} (404 for another id), POST /v1/completions, POST /v1/chat/completions (`"stream": true`:
server-sent events `data: {chunk}` ... `data: [DONE]`). Every error is OpenAI's JSON shape
{"error": {"message", "type", "param", "code"}}: 400 for a bad request (param names the field), 401 without the
API key, 404 for an unknown model or path, 503 when the queue is full or the server is shutting down.
With an API key (vLLM's --api-key), every /v1/* request needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ascend_llm.errors import UserInputError
from ascend_llm.inference.metrics import CONTENT_TYPE
from ascend_llm.inference.protocol import ApiError
from ascend_llm.inference.serving import OpenAIServing

logger = logging.getLogger("ascend_llm.server")
router = APIRouter()


def build_app(serving: OpenAIServing, *, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app over `serving`. At start-up the engine compiles every step shape it will run
    (OpenAIServing.warm_up), then the scheduler's thread starts; on shutdown the app stops taking requests (see
    OpenAIServing.begin_shutdown) and stops the scheduler."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.warm_up()  # before the socket opens: /health answers only once every step graph is compiled
        serving.scheduler.serve_forever()
        yield
        serving.begin_shutdown(0.0)
        serving.abort_all()
        await asyncio.get_running_loop().run_in_executor(None, serving.scheduler.stop, 0.0)
        serving.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ascend_llm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.add_exception_handler(ApiError, lambda _, exc: _error_response(exc))
    app.add_exception_handler(UserInputError, lambda _, exc: _error_response(ApiError.from_user_error(exc)))
    app.add_exception_handler(HTTPException, lambda _, exc: _error_response(
        ApiError(exc.status_code, str(exc.detail), None, "invalid_request_error" if exc.status_code < 500
                 else "server_error", exc.status_code)))
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _internal_error(_, exc: Exception) -> JSONResponse:
    logger.exception("request failed", exc_info=exc)
    return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", None, "server_error"))


def _serving(http: HttpRequest) -> OpenAIServing:
    return http.app.state.serving


@router.get("/health")
async def health(http: HttpRequest):
    serving = _serving(http)
    return JSONResponse(serving.health(), status_code=200 if serving.accepting else 503)


@router.get("/metrics")
async def metrics(http: HttpRequest):
    return Response(_serving(http).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(http: HttpRequest):
    return {"object": "list", "data": [_serving(http).model_card()]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, http: HttpRequest):
    serving = _serving(http)
    serving.check_model(model_id)
    return serving.model_card()


@router.post("/v1/completions")
async def completions(http: HttpRequest):
    return await _serving(http).completion(http)


@router.post("/v1/chat/completions")
async def chat_completions(http: HttpRequest):
    return await _serving(http).chat(http)


class ApiKeyMiddleware:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>` (constant-time compare), else 401."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope.get("method") != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", None,
                                 "invalid_request_error", "invalid_api_key")
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
