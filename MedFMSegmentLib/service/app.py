"""The service's HTTP routes (FastAPI): volumes, prompts, focus, jobs, adapters, info.

Every route needs ``Authorization: Bearer <token>`` (compared in constant time); bodies are read
up to a limit; every error answers JSON ``{"error": "one line"}`` with a 4xx status (a 500 only
for a defect of the service itself, still one line, the traceback going to the server's log).
Arrays travel as frames (:mod:`.wire`), never as JSON numbers.
"""

from __future__ import annotations

import hmac
import json
import logging
import platform

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InputError
from ..io import MedicalImage
from . import work
from .archive import ArchiveError, pack_adapter, unpack_adapter
from .jobs import JobManager
from .state import FocusWorker, ServiceState
from .wire import MEDIA_TYPE, WireError, decode_frame, encode_frame, geometry_from_dict, volume_id

__all__ = ["ServiceError", "create_app"]

log = logging.getLogger(__name__)
API = "/v1"


class ServiceError(Exception):
    """An error answered to the client: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())[:500] or "error"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())[:500] or "error"}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(WireError)
    async def wire_error(request: Request, exc: WireError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(ArchiveError)
    async def archive_error(request: Request, exc: ArchiveError) -> JSONResponse:
        return _error(409 if "exists" in str(exc) else 400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(MemoryError)
    async def memory_error(request: Request, exc: MemoryError) -> JSONResponse:
        return _error(507, "the service ran out of memory for this request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _error(500, f"internal error: {type(exc).__name__}: {text}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 beyond ``limit`` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ServiceError(413, f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int):
    body = await read_body(request, limit)
    if not body:
        return {}
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(400, f"request body is not valid JSON: {exc}") from None


def _frame(arrays, header: dict) -> Response:
    return Response(encode_frame(arrays, header), media_type=MEDIA_TYPE)


def _volume_or_404(state: ServiceState, vid: str) -> MedicalImage:
    try:
        return state.volume(vid)
    except KeyError:
        raise ServiceError(404, f"no volume {vid[:40]!r} here (upload it first)") from None


def _decode_volume(state: ServiceState, body: bytes) -> tuple[str, MedicalImage]:
    header, arrays = decode_frame(body, state.limits.max_volume_bytes)
    if len(arrays) != 1 or arrays[0].ndim != 3 or arrays[0].dtype == bool:
        raise InputError("a volume frame holds one (K, J, I) numeric array")
    geometry = geometry_from_dict(header.get("geometry") or {})
    array = arrays[0]
    if tuple(array.shape) != geometry.shape:
        raise InputError(f"array shape {array.shape} does not match its geometry {geometry.shape}")
    is_2d = bool(header.get("is_2d", False))
    if is_2d and array.shape[0] != 1:
        raise InputError("a 2D image has one slice")
    vid = volume_id(array, geometry, is_2d)
    claimed = header.get("volume_id")
    if claimed is not None and claimed != vid:
        raise InputError("the volume's content does not match the id the client computed")
    modality = header.get("modality")
    image = MedicalImage(array, geometry, source=f"volume {vid}", is_2d=is_2d,
                         modality=modality if isinstance(modality, str) else None)
    return vid, image


def _versions() -> dict:
    import numpy
    import torch
    from importlib.metadata import version

    return {"medfmsegment": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "fastapi": version("fastapi"), "uvicorn": version("uvicorn")}


def create_app(state: ServiceState, jobs: JobManager, focus: FocusWorker, token: str) -> FastAPI:
    """The FastAPI application serving ``state``; every route requires ``token``."""
    expected = token.encode()

    def authorise(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
            raise ServiceError(401, "missing or wrong bearer token")

    app = FastAPI(title="MedFMSegment service", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, dependencies=[Depends(authorise)])
    _install_error_handlers(app)
    limits = state.limits

    versions = _versions()

    @app.get(API + "/info")
    def info() -> dict:
        return {"versions": versions, "device": str(state.device), "models": list(state.model_specs), "default_model": state.default_model,
                "adapters": [a["name"] for a in state.adapters()], "limits": limits.to_dict(),
                "volumes": len(state.volume_ids()), "embedding_cache": {"bytes": state.cache.nbytes,
                                                                          "max_bytes": state.cache.max_bytes}}

    @app.post(API + "/volumes", status_code=201)
    async def upload_volume(request: Request) -> dict:
        body = await read_body(request, limits.max_upload_bytes)
        vid, image = await run_in_threadpool(_decode_volume, state, body)
        state.add_volume(vid, image)
        return {"volume_id": vid, "shape": list(image.array.shape)}

    @app.api_route(API + "/volumes/{vid}", methods=["GET", "HEAD"])
    def volume(vid: str) -> dict:
        image = _volume_or_404(state, vid)
        return {"volume_id": vid, "shape": list(image.array.shape), "dtype": str(image.array.dtype),
                "is_2d": image.is_2d}

    @app.delete(API + "/volumes/{vid}")
    def delete_volume(vid: str) -> dict:
        if not state.delete_volume(vid):
            raise ServiceError(404, f"no volume {vid[:40]!r} here")
        return {"deleted": vid}

    @app.post(API + "/volumes/{vid}/focus")
    async def focus_slice(vid: str, request: Request) -> dict:
        body = await read_json(request, limits.max_json_bytes)

        def plan() -> dict:
            fields = work.check_fields(body, {
                "axis": work.resolve_axis, "index": lambda v: work._int(v, "index"),
                "radius": lambda v: work._int(v, "radius", 0, 16),
                "model": work.PROMPT_FIELDS["model"], "adapter": work.PROMPT_FIELDS["adapter"],
                "intensity": work.PROMPT_FIELDS["intensity"]}, "focus request")
            _volume_or_404(state, vid)
            session, _ = state.session(vid, fields.get("model"), fields.get("adapter"), fields.get("intensity"))
            axis = fields.get("axis", 2)
            voxel_axis = axis if isinstance(axis, int) else session.image.geometry.voxel_axis_for(
                "axial" if axis == "auto" else axis)
            if "index" not in fields or fields["index"] >= session.image.geometry.size[voxel_axis]:
                raise InputError("focus needs a slice index inside the volume")
            return {"planned": focus.focus(session, voxel_axis, fields["index"], fields.get("radius", 2))}

        return await run_in_threadpool(plan)

    @app.post(API + "/volumes/{vid}/prompts")
    async def prompt(vid: str, request: Request) -> Response:
        body = await read_json(request, limits.max_json_bytes)
        prompts, options = work.parse_prompt(body)
        _volume_or_404(state, vid)
        where = work.check_prompt(state, vid, prompts, options)
        if where is None:
            job = jobs.submit("prompt", work.prompt_job(state, vid, prompts, options))
            return JSONResponse({"job_id": job.id}, status_code=202)
        array_axis, index, plane, mask = await run_in_threadpool(work.segment_2d, state, vid, prompts, options, where)
        if int(plane.sum()) != int(mask.sum()):  # never expected: the result reaches beyond its slice
            return _frame([mask], {"kind": "mask"})
        return _frame([plane], {"kind": "slice", "array_axis": array_axis, "index": index,
                                "shape": list(mask.shape)})

    @app.post(API + "/volumes/{vid}/automatic", status_code=202)
    async def automatic(vid: str, request: Request) -> dict:
        body = await read_json(request, limits.max_json_bytes)
        _volume_or_404(state, vid)
        return {"job_id": jobs.submit("automatic", work.automatic_job(state, vid, body)).id}

    @app.post(API + "/finetune", status_code=202)
    async def finetune(request: Request) -> dict:
        body = await read_json(request, limits.max_json_bytes)
        try:
            job_work = work.finetune_job(state, body)
        except KeyError as exc:
            raise ServiceError(404, f"no volume {str(exc)[:40]} here (upload it first)") from None
        return {"job_id": jobs.submit("finetune", job_work).id}

    def job_or_404(jid: str):
        job = jobs.get(jid)
        if job is None:
            raise ServiceError(404, f"no job {jid[:40]!r} here")
        return job

    @app.get(API + "/jobs/{jid}")
    def job_status(jid: str) -> dict:
        return job_or_404(jid).status()

    @app.get(API + "/jobs/{jid}/updates")
    def job_updates(jid: str, since: int = 0) -> Response:
        job = job_or_404(jid)
        cursor, items = job.updates_since(since)
        return _frame([plane for _, _, plane in items],
                      {"next": cursor, "slices": [[a, i] for a, i, _ in items],
                       "shape": list(job.shape) if job.shape else None, "state": job.state})

    @app.get(API + "/jobs/{jid}/reports")
    def job_reports(jid: str, since: int = 0) -> dict:
        cursor, items = job_or_404(jid).reports_since(since)
        return {"next": cursor, "reports": items}

    @app.get(API + "/jobs/{jid}/result")
    def job_result(jid: str) -> Response:
        job = job_or_404(jid)
        if job.state != "done":
            raise ServiceError(409, f"job is {job.state}" + (f": {job.message}" if job.message else ""))
        if isinstance(job.result, dict):
            return JSONResponse(job.result)
        return _frame([job.result], {"kind": "mask"})

    @app.post(API + "/jobs/{jid}/cancel")
    def cancel(jid: str) -> dict:
        job_or_404(jid)
        return jobs.cancel(jid).status()

    @app.get(API + "/adapters")
    def adapters() -> list:
        return state.adapters()

    @app.get(API + "/adapters/{name}/archive")
    def download_adapter(name: str) -> Response:
        return Response(pack_adapter(state.existing_adapter(name)), media_type="application/zip")

    @app.put(API + "/adapters/{name}/archive", status_code=201)
    async def upload_adapter(name: str, request: Request) -> dict:
        path = state.adapter_path(name)
        body = await read_body(request, limits.max_upload_bytes)
        await run_in_threadpool(unpack_adapter, body, path, limits.max_upload_bytes)
        return {"name": name, "metadata": state.adapter_metadata(name)}

    return app
