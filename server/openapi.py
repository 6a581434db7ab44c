"""The OpenAPI 3.1 document of the HTTP API, served at ``/openapi.json``.

It describes what :mod:`mu2net.server.http_api` does: the task API (``/v1``), the Open
Inference Protocol REST API (``/v2``; the protocol's own schemas are in its specification,
so only the shapes this server answers with are given), Prometheus metrics and the status
page. Every error answer is ``{"error": message, "code": gRPC status name}`` (the Open
Inference Protocol's error body, plus ``code`` (google.rpc.Code's name, which tells a 409's
ABORTED from ALREADY_EXISTS); a 500 adds ``request_id``); a 429 has a ``Retry-After``
header (seconds). ``tests/test_fuzz.py`` fuzzes the server against it with
schemathesis.
"""

from __future__ import annotations

from typing import Any

from mu2net.datasets import TASK_NAME_RE

_ERROR = {"$ref": "#/components/schemas/Error"}
_TASK_REF = {"$ref": "#/components/schemas/Task"}


#: The 503 of a write (upload, delete, evolve, rollback): shutting down, or sent to a replica
#: that forwards nowhere.
_READ_ONLY = {503: "the server is shutting down, or is a read-only replica (--no-evolver --repository) without "
                   "--ingest-url: send writes to the evolver host's server"}


#: A replica's forwarded write (upload, delete, evolve, rollback) that timed out.
_FORWARDED = {**_READ_ONLY, 504: "a replica forwarded the write to the evolver host's server (--ingest-url) and "
                                 "got no answer in time: its outcome is unknown (read the task)"}

#: What a rollback's 400, 404 and 409 mean.
_ROLLBACK = {**_FORWARDED,
             409: "the task's served path changed during the rollback (another rollback, or a publish): "
                  "nothing restored; read the task and retry",
             503: _READ_ONLY[503] + ", or the model repository could not be read whole (the message names it)",
             404: "no such task (or deleted during the rollback), a version not retained (or collected "
                  "meanwhile), or no retained system version with another path of it",
             400: "a version that is not an integer, no model repository (--repository), or a path whose "
                  "components were deleted with a task"}


def _errors(*codes: int, text_of: dict[int, str] | None = None) -> dict[str, Any]:
    text = {400: "bad request: the message names the bad value and what is allowed",
            401: "missing or wrong admin token", 404: "no such task", 409: "a task of that name exists",
            413: "body or request larger than the server's limit",
            429: "overloaded: retry after the Retry-After header's seconds",
            503: "not ready: the task has no served path yet, or the server is shutting down",
            502: "a replica could not reach the evolver host's server it forwards writes to (--ingest-url)",
            504: "the request's deadline passed before its images were computed",
            500: "internal error (logged with the request_id; no internals in the answer)"}
    out: dict[str, Any] = {}
    for c in (*codes, 500):
        out[str(c)] = {"description": {**text, **(text_of or {})}[c],
                       "content": {"application/json": {"schema": _ERROR}}}
        if c == 429:
            out[str(c)]["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 0}}}
    return out


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NAME = {"name": "name", "in": "path", "required": True, "description": "task name",
         "schema": {"type": "string", "pattern": TASK_NAME_RE.pattern}}
_VERSION = {"name": "version", "in": "path", "required": True, "description": "model version (ignored: the "
            "served path answers)", "schema": {"type": "string"}}
_ADMIN: list[dict[str, list[str]]] = [{"bearer": []}, {}]  # the token is needed only when the server has one (--admin-token)

_TASK = {
    "type": "object",
    "required": ["name", "state", "private", "labels", "image_shape", "iterations_done", "system_version",
                 "path_id", "metrics", "history"],
    "properties": {
        "name": {"type": "string"},
        "state": {"enum": ["queued", "training", "serving", "failed"]},
        "private": {"type": "boolean"},
        "acl_group": {"type": ["string", "null"]},
        "labels": {"type": "array", "items": {"type": "string"}},
        "image_shape": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3,
                        "description": "[height, width, channels] of the stored images"},
        "num_examples": {"type": "object", "additionalProperties": {"type": "integer"}},
        "splits": {"type": "object", "additionalProperties": {"type": "string"}},
        "iterations_done": {"type": "integer", "minimum": 0},
        "error": {"type": ["string", "null"]},
        "system_version": {"type": "integer", "minimum": 0, "description": "of the snapshot that loaded the "
                           "served path; 0: none"},
        "path_id": {"type": ["string", "null"]},
        "path_length": {"type": "integer"},
        "metrics": {"type": "object", "description": "validation_accuracy, test_accuracy (fractions in [0, 1]), "
                    "activated_params, trainable_params, score of the served path"},
        "improved_at": {"type": ["number", "null"], "description": "unix seconds of the last higher score"},
        "history": {"type": "array", "items": {"type": "object", "properties": {
            "system_version": {"type": "integer"}, "time": {"type": "number"},
            "validation_accuracy": {"type": ["number", "null"]}, "test_accuracy": {"type": ["number", "null"]}}}},
        "evolution": {"type": "object", "properties": {"paused": {"type": "boolean"},
                                                       "stale_iterations": {"type": "integer"},
                                                       "pinned": {"type": "boolean", "description":
                                                                  "rolled back by a user: not evolved until woken"}}},
        "evolver": {"type": ["object", "null"], "description": "what the evolver does for this task now"},
        "rolled_back_to": {"type": "object", "description": "in a rollback's answer: the retained version and "
                           "path the task went back to", "properties": {"system_version": {"type": "integer"},
                                                                        "path_id": {"type": "string"}}},
    },
}

_CLASSIFY_RESULT = {
    "type": "object", "required": ["task", "system_version", "path_id", "results"],
    "properties": {
        "task": {"type": "string"}, "system_version": {"type": "integer"}, "path_id": {"type": "string"},
        "results": {"type": "array", "items": {"type": "object", "required": ["labels", "label_ids", "scores"],
                                               "properties": {
                                                   "labels": {"type": "array", "items": {"type": "string"}},
                                                   "label_ids": {"type": "array", "items": {"type": "integer"}},
                                                   "scores": {"type": "array", "items": {"type": "number"}}}}},
    },
}

_INFER_REQUEST = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"timeout": {
            "type": "integer", "minimum": 0, "description": "microseconds (Triton's schedule-policy extension); "
            "images not computed by then are dropped unrun (504); 0: no timeout"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                           "datatype": {"enum": ["UINT8", "BYTES"]}, "parameters": {"type": "object"},
                           "data": {"type": "array"}}}},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}},
    },
}

_INFER_RESPONSE = {
    "type": "object", "required": ["model_name", "outputs"],
    "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
                   "parameters": {"type": "object"},
                   "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"]}}},
}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-serialisable dict)."""
    task_paths = {
        "/v1/tasks": {
            "get": {"operationId": "listTasks", "summary": "every task, in queue order",
                    "responses": {"200": _json({"type": "object", "required": ["tasks"], "properties": {
                        "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}}}}),
                        **_errors()}},
            "post": {"operationId": "uploadTask", "summary": "upload a labeled dataset as a new task",
                     "security": _ADMIN,
                     "parameters": [
                         {"name": "name", "in": "query", "required": True, "schema": _NAME["schema"]},
                         {"name": "private", "in": "query", "schema": {"type": "string", "description":
                                                                       "true/false/1/0, any case"}},
                         {"name": "acl_group", "in": "query", "schema": {"type": "string"}}],
                     "requestBody": {"required": True, "description": "an ImageFolder zip or tar(.gz) archive, or "
                                     ".npz arrays x_train [N,H,W(,C)] uint8, y_train [N] int (optionally x_val, "
                                     "y_val, x_test, y_test, label_names)",
                                     "content": {"application/octet-stream": {"schema": {
                                         "type": "string", "format": "binary"}}}},
                     "responses": {"202": _json(_TASK_REF, "accepted: the task is queued for the evolver"),
                                   **_errors(400, 401, 409, 413, 429, 502, 503, 504, text_of=_FORWARDED)}},
        },
        "/v1/tasks/{name}": {
            "parameters": [_NAME],
            "get": {"operationId": "getTask", "responses": {"200": _json(_TASK_REF), **_errors(404)}},
            "delete": {"operationId": "deleteTask", "security": _ADMIN,
                       "summary": "delete a task with every component trained on its data",
                       "responses": {"200": _json({"type": "object", "required": ["deleted", "requeued"],
                                                   "properties": {"deleted": {"type": "string"},
                                                                  "requeued": {"type": "array",
                                                                               "items": {"type": "string"}}}}),
                                     **_errors(401, 404, 502, 503, 504, text_of=_FORWARDED)}},
        },
        "/v1/tasks/{name}/classify": {
            "parameters": [_NAME],
            "post": {"operationId": "classify", "summary": "top-k labels of images with the task's served path",
                     "parameters": [{"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                                    {"name": "timeout_ms", "in": "query", "description": "deadline in "
                                     "milliseconds from the request's arrival; images not computed by then are "
                                     "dropped unrun (504)", "schema": {"type": "number", "exclusiveMinimum": 0}}],
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": {"type": "object", "properties": {
                             "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"},
                                        "description": "encoded images (PNG, JPEG, ...)"},
                             "raw": {"type": "object", "required": ["shape", "data"], "properties": {
                                 "shape": {"type": "array", "items": {"type": "integer"}},
                                 "data": {"type": "string", "contentEncoding": "base64",
                                          "description": "uint8 pixels [N,H,W,C], row-major"}}},
                             "top_k": {"type": "integer", "minimum": 1}}}},
                         "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                                 "description": "one encoded image"}}}},
                     "responses": {"200": _json(_CLASSIFY_RESULT), **_errors(400, 404, 413, 429, 503, 504)}},
        },
        "/v1/tasks/{name}/evolve": {
            "parameters": [_NAME],
            "post": {"operationId": "evolveTask", "security": _ADMIN,
                     "summary": "wake a task paused by continual evolution",
                     "responses": {"202": _json(_TASK_REF), **_errors(401, 404, 502, 503, 504, text_of=_FORWARDED)}},
        },
        "/v1/tasks/{name}/rollback": {
            "parameters": [_NAME],
            "post": {"operationId": "rollbackTask", "security": _ADMIN,
                     "summary": "serve the task's path of an earlier retained system version and pin it there "
                                "(needs --repository)",
                     "parameters": [{"name": "version", "in": "query", "description": "a retained system version "
                                     "(default: the newest with another path of the task)",
                                     "schema": {"type": "integer", "minimum": 0}}],
                     "responses": {"200": _json(_TASK_REF), **_errors(400, 401, 404, 409, 502, 503, 504,
                                                                      text_of=_ROLLBACK)}},
        },
        "/v1/system": {"get": {"operationId": "system", "summary": "system version, layer pool and evolver status",
                               "responses": {"200": _json({"type": "object"}), **_errors()}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition format", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}}, **_errors(404)}}},
        "/": {"get": {"operationId": "page", "summary": "status page",
                      "responses": {"200": {"description": "HTML", "content": {
                          "text/html": {"schema": {"type": "string"}}}}, **_errors()}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "this document",
                                  "responses": {"200": _json({"type": "object"})}}},
    }
    infer: dict[str, Any] = {"operationId": "modelInfer", "summary": "Open Inference Protocol inference (binary tensor and "
             "classification extensions)",
             "requestBody": {"required": True, "content": {
                 "application/json": {"schema": _INFER_REQUEST},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                              "JSON header of Inference-Header-Content-Length bytes, then "
                                              "binary tensor data"}}}},
             "responses": {"200": {"description": "inference response", "content": {
                 "application/json": {"schema": _INFER_RESPONSE},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                 **_errors(400, 404, 413, 429, 503, 504)}}
    infer["parameters"] = [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                            "description": "length of the JSON header before the binary tensor data (binary "
                            "tensor extension)", "schema": {"type": "integer", "minimum": 0}}]
    metadata = {"responses": {"200": _json({"type": "object", "required": ["name"]}), **_errors(404, 503)}}
    not_ready = {"description": "not ready (no served path yet)",
                 "content": {"application/json": {"schema": {"type": "object", "required": ["ready"]}}}}
    ready = {"responses": {"200": _json({"type": "object", "required": ["ready"]}),
                           **_errors(404), "503": not_ready}}
    v2_paths = {
        "/v2/health/live": {"get": {"operationId": "serverLive", "responses": {
            "200": _json({"type": "object", "required": ["live"]}), **_errors()}}},
        "/v2/health/ready": {"get": {"operationId": "serverReady", "responses": {
            "200": _json({"type": "object", "required": ["ready"]}), **_errors(), "503": not_ready}}},
        "/v2": {"get": {"operationId": "serverMetadata", "responses": {
            "200": _json({"type": "object", "required": ["name", "version", "extensions"]}), **_errors()}}},
        "/v2/models/{name}": {"parameters": [_NAME], "get": {"operationId": "modelMetadata", **metadata}},
        "/v2/models/{name}/versions/{version}": {"parameters": [_NAME, _VERSION],
                                                 "get": {"operationId": "modelVersionMetadata", **metadata}},
        "/v2/models/{name}/ready": {"parameters": [_NAME], "get": {"operationId": "modelReady", **ready}},
        "/v2/models/{name}/versions/{version}/ready": {"parameters": [_NAME, _VERSION],
                                                       "get": {"operationId": "modelVersionReady", **ready}},
        "/v2/models/{name}/infer": {"parameters": [_NAME], "post": infer},
        "/v2/models/{name}/versions/{version}/infer": {"parameters": [_NAME, _VERSION],
                                                       "post": {**infer, "operationId": "modelVersionInfer"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "mu2net", "version": "0.1.0",
                 "description": "A multitask image classifier that keeps learning (mu2Net, Gesmundo & Dean 2022)."},
        "paths": {**task_paths, **v2_paths},
        "components": {
            "schemas": {"Task": _TASK, "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string"}, "request_id": {"type": "string"},
                "code": {"type": "string", "description": "the gRPC status name of the error (google.rpc.Code), "
                         "e.g. ABORTED or ALREADY_EXISTS for a 409"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the server's --admin-token"}},
        },
    }

