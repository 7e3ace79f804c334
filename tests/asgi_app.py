"""A FastAPI app shaped like seed 002's API, with the ASGI middleware added as a user would:
what the ASGI tests serve in-process and under uvicorn and gunicorn (``asgi_app:app``, settings
from ATE_* variables)."""
from __future__ import annotations

import asyncio
import json
import os

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from api_token_exporter import record_llm_usage
from api_token_exporter import current_token as current_token_id
from api_token_exporter.web.asgi import TokenAnalytics, current_token
from api_token_exporter.core.keystore import ApiKey

OPENAI_USAGE = {"prompt_tokens": 52, "completion_tokens": 17, "total_tokens": 69,
                "prompt_tokens_details": {"cached_tokens": 40},
                "completion_tokens_details": {"reasoning_tokens": 0}}
ANTHROPIC_USAGE = {"input_tokens": 12, "cache_read_input_tokens": 40, "output_tokens": 33}


def openai_stream(gate: asyncio.Event = None):
    """OpenAI's Chat Completions stream with stream_options={"include_usage": true}: content
    chunks, then one chunk with empty choices and the usage, then [DONE]."""
    async def body(gate=gate):
        for word in ("Hello", " there"):
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o",
                     "choices": [{"index": 0, "delta": {"content": word}}], "usage": None}
            yield f"data: {json.dumps(chunk)}\n\n"
            if gate is not None:              # the client must have the first chunk to go on
                await asyncio.wait_for(gate.wait(), 10)
                gate = None
        final = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [],
                 "usage": OPENAI_USAGE}
        yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"
    return body()


async def anthropic_stream():
    events = [("message_start", {"type": "message_start", "message": {
                  "model": "claude-3-5-sonnet-20241022", "usage": dict(ANTHROPIC_USAGE, output_tokens=1)}}),
              ("content_block_delta", {"type": "content_block_delta", "delta": {"text": "Hi"}}),
              ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 33}}),
              ("message_stop", {"type": "message_stop"})]
    for name, data in events:
        yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
        await asyncio.sleep(0)


def create_app(lifespan=None, **settings) -> FastAPI:
    app = FastAPI(lifespan=lifespan)
    app.state.gate = None                     # an asyncio.Event a test may set for /chat/stream

    @app.get("/api/v1/items")
    async def list_items():
        return {"items": [{"id": i} for i in range(1, 6)]}

    @app.get("/api/v1/items/{item_id}")
    async def get_item(item_id: int):
        if item_id > 100:
            raise HTTPException(404, "Not found")
        return {"id": item_id}

    @app.get("/api/v1/sync/{name}")
    def sync_handler(name: str):              # a sync handler: Starlette's thread pool
        return {"name": name, "token": current_token_id()}

    @app.get("/api/v1/me")
    async def me(key: ApiKey = Depends(current_token)):
        return {"id": key.id, "name": key.name, "tenant": key.tenant}

    @app.get("/api/v1/state")
    async def state(request: Request):
        key = request.state.api_key
        return {"id": key.id if key else None}

    @app.post("/api/v1/chat")
    async def chat(request: Request, tasks: BackgroundTasks):
        body = await request.json()
        record_llm_usage("openai", body.get("model", "gpt-4o"), 100, 20)
        if body.get("later"):                 # and more, after the answer went out
            tasks.add_task(record_llm_usage, "anthropic", "claude-3-5-sonnet-20241022", 7, 3)
        return {"ok": True, "token": current_token_id()}

    @app.get("/api/v1/chat/stream")
    async def chat_stream(request: Request, service: str = "openai"):
        source = anthropic_stream() if service == "anthropic" else openai_stream(request.app.state.gate)
        return StreamingResponse(source, media_type="text/event-stream")

    @app.get("/api/v1/completion")
    async def completion():
        return JSONResponse({"model": "gpt-4o-mini", "choices": [], "usage": OPENAI_USAGE})

    @app.get("/api/v1/boom")
    async def boom():
        raise RuntimeError("handler failed")

    @app.get("/api/v1/pid")
    async def pid():                          # which worker answered
        return {"pid": os.getpid()}

    @app.get("/healthz")
    async def health():
        return {"ok": True}

    @app.get("/upstream")
    async def upstream():
        return JSONResponse({"ok": True}, headers={"X-RateLimit-Minute-Limit": "50",
                                                   "X-RateLimit-Minute-Remaining": "7",
                                                   "X-RateLimit-Minute-Reset": "30"})

    async def hello(request):
        return PlainTextResponse("hello " + request.path_params["name"])

    app.mount("/v2", Starlette(routes=[Route("/hello/{name}", hello)]))
    settings.setdefault("metrics_public", True)   # the tests scrape the app
    app.add_middleware(TokenAnalytics, **settings)
    return app


def app_from_env() -> FastAPI:
    """Settings from ATE_* variables (as under uvicorn --workers and gunicorn)."""
    return create_app()


