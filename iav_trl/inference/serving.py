"""
An OpenAI-compatible server with the alignment knob per request, on transformers' own server and continuous batching.

`build_app(model, tokenizer)` is `transformers serve`'s FastAPI app (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health`; streaming with server-sent events) serving one `IAVModel` through transformers' continuous
batching engine. A request may carry, next to the OpenAI fields (an `openai` client sends them through
`extra_body`):

    alpha            a number: every head at `alpha * w_i`, `w_i` the head's mixing weight
    adapter_weights  {head: weight}: the heads to apply and their weights (the others off)

so head `i` decodes at strength

    alpha_i = alpha * w_i                 (`alpha` given)
    alpha_i = default_alpha_i * w_i       (`alpha` left out: each head's own `default_alpha`)

with `w` = `adapter_weights`, or the model's active adapters and weights (`IAVModel.set_adapter`) when the request
names none: the same rule as `IAVModel.generate(alpha=...)` (`iav_trl.tuners.iav.alpha`). Requests with different
strengths share batches.

How the strengths reach the model: the engine packs the scheduled requests into one forward and gives its logits
processors a per-request tensor each (`ContinuousBatchingLogitsProcessor.prepare_tensor_args`). One such processor
per head (`StrengthCarrier`, the identity on the scores) puts each request's strength in that tensor; a forward
pre-hook on the base model reads it and hands it to `IAVModel.set_engine_strengths` as a `(1, rows, 1)` tensor, one
row per request whose next token the LM head scores (the engine applies the LM head to those rows only). The
strengths are views of the engine's own per-request buffer, never Python floats, so that a compiled engine would not
specialize on their values.

Bad strengths get an HTTP 400 with an OpenAI-style error naming the field; a client can reach only the model the
server was started with (no `/load_model`, no `/reset`, any other model name is refused).

The sampling settings (temperature, top_p) are the engine's and fixed by the first request, as in
`transformers serve --continuous-batching`; `max_tokens` is per request.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from transformers import ContinuousBatchingConfig, PreTrainedTokenizerBase
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.server import build_server
from transformers.cli.serving.utils import CBGenerateManager, GenerationState
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from iav_trl.tuners.iav.alpha import ALPHA_GUIDE, resolve_alpha
from iav_trl.tuners.iav.model import IAVModel

STRENGTHS_KWARG = "iav_strengths"  # the per-request value the engine's logits processors receive
# The routes of transformers' server an IAV server does not offer: other modalities, and loading or unloading
# models, which would let a client choose what the server reads.
REMOVED_ROUTES = ("/v1/responses", "/v1/systemone", "/v1/audio/transcriptions", "/load_model", "/reset")

# The strengths of the request being handled, read when the handler hands it to the engine (`add_request` runs in
# the request's own task, before its first `await`).
_REQUEST_STRENGTHS: contextvars.ContextVar[dict[str, float]] = contextvars.ContextVar("iav_request_strengths")


class RequestError(ValueError):
    """A bad field in a request body: `field` names it, the message says what is wrong and what is accepted."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(field, f"`{field}` must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(field, f"`{field}` must be finite, got {value}. Use a value such as {ALPHA_GUIDE}.")
    return value


def request_strengths(body: dict[str, Any], model: IAVModel) -> dict[str, float]:
    """
    Remove `alpha` and `adapter_weights` from a request `body` and return every loaded head's strength (module
    docstring); `RequestError` names the field of a bad value.
    """
    alpha, weights = body.pop("alpha", None), body.pop("adapter_weights", None)
    if alpha is not None:
        alpha = _number(alpha, "alpha")
    if weights is None:
        weights = model.adapter_weights
    elif not isinstance(weights, Mapping):
        raise RequestError(
            "adapter_weights", f"`adapter_weights` must be an object {{head: weight}}, got {type(weights).__name__}."
        )
    else:
        unknown = sorted(str(name) for name in weights if name not in model.adapter_names)
        if unknown:
            raise RequestError(
                "adapter_weights",
                f"`adapter_weights` names unknown head(s) {unknown}; this server's heads are {model.adapter_names}.",
            )
        weights = {name: _number(weight, f"adapter_weights.{name}") for name, weight in weights.items()}
    defaults = {name: config.default_alpha for name, config in model.iav_config.items()}
    try:
        strengths = resolve_alpha(alpha, weights, defaults, batch_size=None)
    except ValueError as err:  # beyond the supported range
        raise RequestError("alpha" if alpha is not None else "adapter_weights", str(err)) from err
    return {name: float(strengths.get(name, 0.0)) for name in model.adapter_names}


class StrengthCarrier(ContinuousBatchingLogitsProcessor):
    """
    Carries one head's per-request strength into the engine's batch (its row of the logits-processor arguments,
    float32 viewed as int32, as the engine's temperature processor stores its values); the identity on the scores.
    """

    supported_kwargs = {STRENGTHS_KWARG: dict}
    ignored_kwargs = ()

    def __init__(self, head: str):
        self.head = head

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.zeros(int32_tensor.shape, dtype=torch.float32).view(torch.int32))

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        values = [
            request.state.logit_processor_kwargs.get(STRENGTHS_KWARG, {}).get(self.head, 0.0)
            for request in requests_with_new_token
        ]
        return torch.tensor(values, dtype=torch.float32).view(torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        return scores


class AlignedBatchingManager(CBGenerateManager):
    """transformers' continuous-batching manager, with each request's head strengths carried to the LM head."""

    def __init__(self, model: IAVModel, cb_config: ContinuousBatchingConfig | None = None):
        super().__init__(cb_config=cb_config)
        self.iav_model = model
        self._hooks: list = []  # on the base model while the engine runs; `stop` removes them

    def init_cb(self, model, gen_config) -> None:
        if self._cb is not None:
            return
        engine = model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=self._cb_config
        )
        processors = engine.logit_processor
        first_row = sum(isinstance(p, ContinuousBatchingLogitsProcessor) for p in processors.logits_processor)
        heads = list(self.iav_model.adapter_names)
        processors.logits_processor.extend(StrengthCarrier(head) for head in heads)
        processors.tensors_required += len(heads)
        processors.do_processing = True
        processors._retrieve_processors_kwargs()  # the engine's own registration of the processors' kwargs

        iav_model = self.iav_model

        def set_strengths(module, args, kwargs):
            if "logits_processor_args" in kwargs:  # the engine's forward (not a `generate` of the same model)
                rows = kwargs["logits_processor_args"][first_row : first_row + len(heads)].view(torch.float32)
                iav_model.set_engine_strengths({head: rows[i].view(1, -1, 1) for i, head in enumerate(heads)})

        def clear_strengths(module, args, kwargs, output):
            if "logits_processor_args" in kwargs:
                iav_model.set_engine_strengths(None)

        base = iav_model.get_base_model()
        self._hooks = [
            base.register_forward_pre_hook(set_strengths, with_kwargs=True),
            base.register_forward_hook(clear_strengths, with_kwargs=True),
        ]
        add_request = engine.add_request

        def add_request_with_strengths(*args, **kwargs):
            return add_request(*args, **kwargs, **{STRENGTHS_KWARG: _REQUEST_STRENGTHS.get()})

        engine.add_request = add_request_with_strengths
        self._cb = engine
        engine.start()

    def stop(self) -> None:
        super().stop()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class AlignedGenerationState(GenerationState):
    """Continuous batching always, through `AlignedBatchingManager`."""

    def __init__(self, model: IAVModel, cb_config: ContinuousBatchingConfig | None = None):
        super().__init__(continuous_batching=True, cb_config=cb_config)
        self.iav_model = model

    def get_manager(self, model_id: str, use_cb: bool = False):
        if not use_cb:
            raise RuntimeError("iav-trl serves through continuous batching only; the model does not support it.")
        if self._cb_manager is None:
            self._cb_manager = AlignedBatchingManager(self.iav_model, cb_config=self._cb_config)
            self._cb_model_id = model_id
        return self._cb_manager


class ServedModel(ModelManager):
    """
    transformers' model manager for one model loaded by the server itself: clients can name it, nothing else. Any
    causal LM (the base model alone, for a comparison) or an `IAVModel`, whose heads `/v1/models` lists.
    """

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, name: str):
        self.model, self.tokenizer, self.force_model = model, tokenizer, name

    @staticmethod
    def process_model_name(model_id: str) -> str:
        return model_id

    def load_model_and_processor(self, model_id_and_revision: str, *args: Any, **kwargs: Any):
        if model_id_and_revision != self.force_model:  # `_resolve_model` already refused other names
            raise RequestError("model", f"This server serves {self.force_model!r} only.")
        return self.model, self.tokenizer

    def list_models(self, cache_dir: str | None = None) -> list[dict]:
        entry = {"id": self.force_model, "object": "model", "created": 0, "owned_by": "iav-trl"}
        if isinstance(self.model, IAVModel):
            weights = self.model.adapter_weights
            entry["alignment_heads"] = {
                name: {"default_alpha": config.default_alpha, "weight": weights.get(name, 0.0)}
                for name, config in self.model.iav_config.items()
            }
        return [entry]

    def shutdown(self) -> None:
        pass  # the served model lives as long as the server


def error_response(err: RequestError) -> JSONResponse:
    """An OpenAI-style error body with status 400."""
    body = {"error": {"message": str(err), "type": "invalid_request_error", "param": err.field, "code": None}}
    return JSONResponse(body, status_code=400)


class _AlignedRequests:
    """Reads a request's strengths (400 on a bad one), then hands the request to transformers' handler."""

    async def handle_request(self, body: dict, request_id: str):
        try:
            strengths = request_strengths(body, self.model_manager.model)
        except RequestError as err:
            return error_response(err)
        token = _REQUEST_STRENGTHS.set(strengths)
        try:
            return await super().handle_request(body, request_id)
        finally:
            _REQUEST_STRENGTHS.reset(token)


class AlignedChatCompletionHandler(_AlignedRequests, ChatCompletionHandler):
    """`/v1/chat/completions` with `alpha` and `adapter_weights`."""


class AlignedCompletionHandler(_AlignedRequests, CompletionHandler):
    """`/v1/completions` with `alpha` and `adapter_weights`."""


def build_app(
    model: IAVModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str = "iav",
    cb_config: ContinuousBatchingConfig | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` (with its loaded heads) as `name`; run it with uvicorn (`serve`)."""
    if not isinstance(model, IAVModel):
        raise TypeError(f"`model` must be an IAVModel (a base model with its heads), got {type(model).__name__}.")
    base = model.get_base_model()
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise ValueError(
            f"{type(base).__name__}.forward has no `logits_to_keep`: the batching engine would apply the LM head to "
            "every packed token, not one row per request, and the per-request strengths could not be placed. Serve "
            "a model whose forward takes `logits_to_keep` (every causal LM of transformers >= 4.50 does)."
        )
    manager = ServedModel(model, tokenizer, name)
    state = AlignedGenerationState(model, cb_config)
    app = build_server(
        manager,
        AlignedChatCompletionHandler(manager, state),
        AlignedCompletionHandler(manager, state),
        None,
        None,
        None,
        state,
    )
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in REMOVED_ROUTES]

    @app.exception_handler(RequestError)
    async def _request_error(_request, err: RequestError):
        return error_response(err)

    app.state.generation_state = state  # `serve` stops its engine when the server stops
    return app


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", timeout: float = 60.0):
    """
    Start `app` with uvicorn on a free port of `host` in a daemon thread (a notebook, a test, a benchmark) and wait
    until it listens. Returns `(server, thread, url)`, `url` the OpenAI base URL `http://host:port/v1`; stop it with
    `server.should_exit = True; thread.join()`, then `app.state.generation_state.shutdown()`.
    """
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"The server did not start on {host}:{port} within {timeout:g} s.")
        time.sleep(0.05)
    return server, thread, f"http://{host}:{port}/v1"


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run `app` (from `build_app`) with uvicorn until interrupted, then stop its batching engine."""
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        app.state.generation_state.shutdown()
