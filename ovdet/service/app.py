"""The FastAPI app: /v1/detect, /v1/vocabularies/{name}, /health, /metrics, and Label Studio's /setup and /predict,
all feeding one Batcher that owns the detector."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ovdet.errors import OVDetError
from ovdet.service.batcher import Batcher, Job
from ovdet.service.http import BodyLimit, error_body
from ovdet.service.inputs import decode_base64, decode_upload, fetch_image, parse_request_classes
from ovdet.service.labelstudio import MAX_TASKS, failed_task, parse_label_config, task_results
from ovdet.service.metrics import Metrics
from ovdet.service.page import page
from ovdet.service.settings import ServeSettings, ServiceError
from ovdet.service.vocab import VocabularyStore, check_name

__all__ = ["create_app"]

_DETECT_DOC = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "classes": {"type": "string", "example": "person,bus|coach,!reflection"},
        "vocabulary": {"type": "string"}, "conf": {"type": "number"}, "iou": {"type": "number"},
        "max_det": {"type": "integer"}, "tile": {"type": "integer"}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "description": "base64 image file"}},
        "urls": {"type": "array", "items": {"type": "string"}, "description": "only with --allow-urls"},
        "classes": {"description": "inline syntax string, list, or class document"},
        "vocabulary": {"type": "string"}, "conf": {"type": "number"}, "iou": {"type": "number"},
        "max_det": {"type": "integer"}, "tile": {"type": "integer"}}}}}}}


def create_app(detector: Any, settings: ServeSettings | None = None,
               vocabularies: VocabularyStore | None = None) -> Any:
    """The ASGI app serving `detector` (an OVDetector; the app's worker thread is the only one that uses it)."""
    settings = settings or ServeSettings()
    store = vocabularies or VocabularyStore.default(settings.persist_vocabularies)
    metrics = Metrics()
    state: dict[str, Any] = {"projects": {}}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(detector, settings.max_batch, settings.max_wait_ms, settings.max_queue, metrics.batch)
        metrics.queue_depth = batcher.depth
        state["batcher"] = batcher
        try:
            yield
        finally:  # uvicorn has finished the requests in flight; the queued ones finish before the worker stops
            await run_in_threadpool(batcher.close)

    app = FastAPI(title="ovdet", summary="Open-vocabulary detection over HTTP", lifespan=lifespan)

    @app.exception_handler(ServiceError)
    async def _refused(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.code, str(exc)), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(exc.status_code, code, f"{exc.detail}: {request.method} {request.url.path}"),
                            exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(OVDetError)
    async def _ovdet_error(request: Request, exc: OVDetError) -> JSONResponse:
        return JSONResponse(error_body(400, type(exc).__name__, str(exc)), 400)

    async def run(spec: Any, key: Any, images: list, options: dict) -> Any:
        if "batcher" not in state:
            raise ServiceError(503, "not_started", "the server is starting; retry", {"Retry-After": "1"})
        job = Job((key, tuple(sorted(options.items()))), spec, images, options)
        return await asyncio.wrap_future(state["batcher"].submit(job))

    def vocabulary(body: dict) -> tuple[Any, Any]:
        if body.get("vocabulary") is not None and body.get("classes") is not None:
            raise ServiceError(400, "classes_and_vocabulary", "send either classes or vocabulary, not both")
        if body.get("vocabulary") is not None:
            record = store.get(body["vocabulary"])
            return parse_request_classes(record["classes"], settings), ("vocabulary", body["vocabulary"],
                                                                         record["version"])
        if body.get("classes") is None:
            raise ServiceError(400, "no_classes", "name what to find: classes='person,bus' (inline syntax) or "
                               "vocabulary=NAME (stored with PUT /v1/vocabularies/NAME)")
        spec = parse_request_classes(body["classes"], settings)
        return spec, ("classes", json.dumps(body["classes"], sort_keys=True))

    @app.post("/v1/detect", openapi_extra=_DETECT_DOC)
    async def detect(request: Request) -> dict[str, Any]:
        """Detect the named classes in one or more images (multipart upload, or JSON with base64 images)."""
        started = time.perf_counter()
        body, blobs = await _read_detect_body(request)
        spec, key = vocabulary(body)  # before decoding: a bad class list costs no pixels
        images = []
        for name, blob in blobs:
            if isinstance(blob, bytes):
                images.append(await run_in_threadpool(decode_upload, blob, name, settings))
            elif name.startswith("urls"):
                images.append(await run_in_threadpool(fetch_image, blob, settings))
            else:
                images.append(await run_in_threadpool(decode_base64, blob, name, settings))
        outcome = await run(spec, key, images, _options(body))
        return {
            "images": [{"width": im.shape[1], "height": im.shape[0], "detections": _rows(d)}
                       for im, d in zip(images, outcome.detections)],
            "classes": spec.names, "backend": detector.backend, "precision": detector.precision,
            "model": detector.model_id, "batch": {"images": outcome.batch_images, "requests": outcome.batch_requests},
            "timings": {"queue_ms": round(1000 * outcome.queue_s, 2),
                        "inference_ms": round(1000 * outcome.inference_s, 2),
                        "total_ms": round(1000 * (time.perf_counter() - started), 2)}}

    async def _read_detect_body(request: Request) -> tuple[dict, list[tuple[str, Any]]]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await request.form(max_files=settings.max_images + 1, max_fields=64)
            body = {k: v for k, v in form.items() if isinstance(v, str)}
            blobs = [(f"image[{i}] {getattr(f, 'filename', '')}", await f.read())
                     for i, f in enumerate(v for k, v in form.multi_items() if not isinstance(v, str))]
        elif kind == "application/json":
            body = await _json_body(request)
            listed = body.get("images", [])
            urls = body.get("urls", [])
            if not isinstance(listed, list) or not isinstance(urls, list):
                raise ServiceError(400, "bad_images", "images and urls must be JSON lists")
            blobs = [(f"images[{i}]", b) for i, b in enumerate(listed)] + [(f"urls[{i}]", u)
                                                                            for i, u in enumerate(urls)]
        else:
            raise ServiceError(415, "unsupported_media_type", "send multipart/form-data (image files) or "
                               "application/json (base64 images)")
        if not blobs:
            raise ServiceError(400, "no_images", "the request has no image: add a file field 'image' (multipart) "
                               "or a list 'images' of base64 strings (JSON)")
        if len(blobs) > settings.max_images:
            raise ServiceError(413, "too_many_images", f"{len(blobs)} images in one request, more than this "
                               f"server's cap of {settings.max_images}; split the request")
        return body, blobs

    @app.put("/v1/vocabularies/{name}")
    async def put_vocabulary(name: str, request: Request) -> dict[str, Any]:
        """Store a vocabulary: {"classes": "person,bus" | [...] | class document}."""
        check_name(name)
        body = await _json_body(request)
        if "classes" not in body:
            raise ServiceError(400, "no_classes", "send {\"classes\": \"person,bus\"} (inline syntax, a list, or a "
                               "class document)")
        spec = parse_request_classes(body["classes"], settings)
        record = await run_in_threadpool(store.put, name, body["classes"])
        return {"name": name, "classes": spec.names, "version": record["version"]}

    @app.get("/v1/vocabularies/{name}")
    async def get_vocabulary(name: str) -> dict[str, Any]:
        """A stored vocabulary as it was sent."""
        record = store.get(name)
        return {"name": name, "classes": record["classes"], "version": record["version"]}

    @app.delete("/v1/vocabularies/{name}")
    async def delete_vocabulary(name: str) -> dict[str, Any]:
        await run_in_threadpool(store.delete, name)
        return {"name": name, "deleted": True}

    @app.get("/v1/vocabularies")
    async def list_vocabularies() -> dict[str, Any]:
        return {"names": store.names()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def try_it() -> HTMLResponse:
        """The page to try the detector in a browser (it calls POST /v1/detect; the token, if any, is typed in)."""
        html, policy = page()
        return HTMLResponse(html, headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Up, what runs the model, and how many requests wait (also Label Studio's health check)."""
        batcher = state.get("batcher")
        return {"status": "UP", "model_class": "ovdet", "model_version": settings.model_version,
                "backend": detector.backend, "queue_depth": batcher.depth() if batcher else 0}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.post("/setup")
    async def ls_setup(request: Request) -> dict[str, Any]:
        """Label Studio connects a project: its labelling config (`schema`) names the labels to find."""
        body = await _json_body(request)
        config = parse_label_config(body.get("schema"))
        state["projects"][str(body.get("project", ""))] = config
        return {"model_version": settings.model_version}

    @app.post("/predict")
    async def ls_predict(request: Request) -> dict[str, Any]:
        """Label Studio asks for pre-annotations of tasks: one prediction per task, boxes in percent."""
        body = await _json_body(request)
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ServiceError(400, "no_tasks", "send {\"tasks\": [{\"data\": {\"image\": URL_OR_PATH}}], "
                               "\"label_config\": XML}")
        if len(tasks) > MAX_TASKS:  # Label Studio sends all selected tasks at once (not --max-images)
            raise ServiceError(413, "too_many_tasks", f"{len(tasks)} tasks, more than this server's cap of "
                               f"{MAX_TASKS} per request; select fewer tasks in Label Studio")
        config = parse_label_config(body["label_config"]) if body.get("label_config") else \
            state["projects"].get(str(body.get("project", "")))
        if config is None:
            raise ServiceError(400, "no_label_config", "send label_config with the tasks, or POST /setup first")
        spec = parse_request_classes(list(config.labels), settings)
        results = []
        for done, task in enumerate(tasks):
            if done and await request.is_disconnected():  # Label Studio gave up (its timeout): stop using the CPU
                raise ServiceError(499, "client_closed", f"the client closed the connection after {done} of "
                                   f"{len(tasks)} tasks; nothing more was detected")
            data = task.get("data") if isinstance(task, dict) else None
            try:
                if not isinstance(data, dict) or config.data_key not in data:
                    raise ServiceError(400, "no_image", f"the task has no data.{config.data_key}")
                image = await run_in_threadpool(fetch_image, data[config.data_key], settings)
                outcome = await run(spec, ("labels", config.labels), [image], {})
            except ServiceError as exc:  # one bad task does not fail the others: no prediction, and a reason
                results.append(failed_task(error_body(exc.status, exc.code, str(exc))["error"],
                                           settings.model_version))
                continue
            h, w = image.shape[:2]
            results.append(task_results(outcome.detections[0], w, h, config, settings.model_version))
        return {"results": results, "model_version": settings.model_version}

    return BodyLimit(app, settings.max_body_bytes, metrics, settings.token)


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(400, "invalid_json", f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ServiceError(400, "invalid_json", f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _options(body: dict) -> dict[str, Any]:
    """detect_batch keywords from conf / iou / max_det / tile (form strings or JSON numbers), range-checked."""
    out: dict[str, Any] = {}
    for name, kind, low, high in (("conf", float, 0.0, 1.0), ("iou", float, 0.0, 1.0), ("max_det", int, 1, 10000),
                                  ("tile", int, 32, 8192)):
        raw = body.get(name)
        if raw is None or raw == "":
            continue
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            value = None
        if value is None or isinstance(raw, bool) or not low <= value <= high:
            raise ServiceError(400, f"bad_{name}", f"{name}={str(raw)[:40]!r}: give a number from {low} to {high}")
        out[name] = value
    return out


def _rows(dets: Any) -> list[dict[str, Any]]:
    return [{"class_name": str(n), "class_id": int(c), "score": round(float(s), 5),
             "xyxy": [round(float(v), 2) for v in box]}
            for n, c, s, box in zip(dets.data["class_name"], dets.class_id, dets.confidence, dets.xyxy)]
