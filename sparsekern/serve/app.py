"""The OpenAI-compatible app behind ``sparsekern serve``: transformers' serving handlers, checked input.

Generation, streaming (server-sent events), continuous batching and client-disconnect
cancellation are transformers' (``transformers.cli.serving``: ``ModelManager``,
``GenerationState``, the chat and completion handlers); the model is loaded through
``from_pretrained``, so a pruned folder comes up with ``SparseLinear`` layers
(:mod:`sparsekern.hf.quantizer`). This module only decides which routes exist (``/v1/models``,
``/v1/completions``, ``/v1/chat/completions``, ``/health``; not transformers' ``/load_model``
or ``/reset``, which would let any local client swap or drop the model) and checks every body
first (:mod:`sparsekern.serve.requests`), so bad input is a 4xx in OpenAI's error shape.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at
# definition time, and they are imported inside build_app.
import json
import os
import uuid
from contextlib import asynccontextmanager

from sparsekern.checkpoint import check_safetensors, weight_files
from sparsekern.folder import read_json
from sparsekern.serve.requests import RequestError, Served, check

MAX_BODY = 1 << 20  # bytes; a chat request is text, so larger bodies are refused unread
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def preflight(folder: str) -> dict:
    """Check ``folder`` is a servable model folder before anything loads; returns its config.json.

    A ``ValueError`` names the file and the problem: not a folder, no ``config.json``, no or a
    truncated safetensors file, no tokenizer. (A ``quantization_config`` naming an unknown
    pattern is refused by the quantizer while loading, also naming ``config.json``.)
    """
    if not os.path.isdir(folder):
        raise ValueError(
            f"{folder}: not a folder (expected a model folder written by sparsekern.save or save_pretrained)"
        )
    cfg_file = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"{cfg_file}: missing: {folder} is not a Hugging Face model folder")
    config = read_json(cfg_file)
    try:
        files = weight_files(folder)
    except FileNotFoundError as exc:
        raise ValueError(str(exc).removeprefix("path: ")) from None
    for file in files:
        check_safetensors(file)
    if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        raise ValueError(
            f"{folder}: no tokenizer ({', '.join(_TOKENIZER_FILES)}); write it with "
            "sparsekern.save(model, dir, tokenizer=tok) or tok.save_pretrained(dir)"
        )
    return config


def build_app(
    folder: str,
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    concurrency: int = 8,
    dense_copies: bool = True,
):
    """A FastAPI app serving the model in ``folder`` under ``name`` (default: the folder's name).

    The paged KV cache holds ``concurrency`` full contexts; more concurrent requests queue.
    ``dense_copies=False`` sets every sparse layer's ``dense_fallback`` to False: no dense weight
    copies where dispatch would pick the dense kernel (prefill), so the server holds the
    compressed weights only, and prefill runs the sparse kernels.
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from transformers import ContinuousBatchingConfig
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import CBWorkerDeadError, GenerationState

    import sparsekern.hf

    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency: expected a positive int, got {concurrency!r}")
    if not isinstance(dense_copies, bool):
        raise TypeError(f"dense_copies: expected bool, got {type(dense_copies).__name__}")
    sparsekern.hf.register()
    preflight(folder)
    name = name or os.path.basename(os.path.normpath(folder))
    manager = ModelManager(device=device, dtype=dtype, continuous_batching=True, force_model=folder)
    model, tokenizer = manager.load_model_and_processor(manager.process_model_name(folder))
    if not dense_copies:
        from sparsekern.nn.linear import SparseLinear
        from sparsekern.nn.moe import SparseExperts

        for module in model.modules():
            if isinstance(module, (SparseLinear, SparseExperts)):
                module.dense_fallback = False
    text_config = model.config.get_text_config()
    served = Served(
        name=name,
        aliases=frozenset({name, folder, os.path.abspath(folder)}),
        pin=folder,
        context=int(getattr(text_config, "max_position_embeddings", 0) or 2048),
        tokenizer=getattr(tokenizer, "tokenizer", tokenizer),
    )
    # NOTE: left to itself, continuous batching sizes its KV cache from free memory: 14 GB of
    # RSS on a 128 GB CPU host for a 2-layer test model, allocated on the first request (29 s).
    page = ContinuousBatchingConfig.page_size
    cb = ContinuousBatchingConfig(
        num_blocks=-(-concurrency * served.context // page), max_batch_tokens=max(served.context, page)
    )
    state = GenerationState(continuous_batching=True, cb_config=cb)
    chat = ChatCompletionHandler(model_manager=manager, generation_state=state)
    completion = CompletionHandler(model_manager=manager, generation_state=state)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.shutdown()
        manager.shutdown()

    app = FastAPI(lifespan=lifespan, title="sparsekern serve")
    app.state.served, app.state.model = served, model

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):  # transformers' own checks (unexpected fields, ...)
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return error(400, f"body: {exc.errors()}")

    @app.exception_handler(CBWorkerDeadError)
    async def _dead(_request, exc: CBWorkerDeadError):
        return error(503, str(exc), "server_error")

    @app.exception_handler(Exception)
    async def _fault(_request, exc: Exception):
        return error(500, f"{type(exc).__name__}: {exc}", "server_error")

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise RequestError(413, f"body: {len(raw)} bytes, at most {MAX_BODY} accepted")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"body: not valid JSON ({exc})") from None

    @app.get("/v1/models")
    def models():
        entry = {"id": served.name, "object": "model", "created": 0, "owned_by": "sparsekern"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = check(await body_of(request), served, chat=False)
        return await completion.handle_request(body, uuid.uuid4().hex)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = check(await body_of(request), served, chat=True)
        return await chat.handle_request(body, uuid.uuid4().hex)

    @app.get("/health")
    def health():
        if not state.is_cb_alive():
            return error(503, "continuous batching worker died", "server_error")
        return {"status": "ok", "model": served.name}

    return app
