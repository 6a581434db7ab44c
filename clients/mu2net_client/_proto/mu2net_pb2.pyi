from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RawTensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("task", "encoded_images", "raw", "top_k", "id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ENCODED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    task: str
    encoded_images: _containers.RepeatedScalarFieldContainer[bytes]
    raw: RawTensor
    top_k: int
    id: str
    def __init__(self, task: _Optional[str] = ..., encoded_images: _Optional[_Iterable[bytes]] = ..., raw: _Optional[_Union[RawTensor, _Mapping]] = ..., top_k: _Optional[int] = ..., id: _Optional[str] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("labels", "label_ids", "scores")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LABEL_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    label_ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., label_ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "system_version", "path_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    system_version: int
    path_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., system_version: _Optional[int] = ..., path_id: _Optional[str] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error_code", "error_message", "error_type", "retry_after_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: ClassifyResponse
    error_code: str
    error_message: str
    error_type: str
    retry_after_ms: int
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., error_type: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("name", "state", "private", "labels", "system_version", "path_id", "validation_accuracy", "test_accuracy", "iterations_done", "error", "activated_params", "improved_at", "history", "paused", "stale_iterations", "evolver", "pinned")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_PARAMS_FIELD_NUMBER: _ClassVar[int]
    IMPROVED_AT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    STALE_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    EVOLVER_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    private: bool
    labels: _containers.RepeatedScalarFieldContainer[str]
    system_version: int
    path_id: str
    validation_accuracy: float
    test_accuracy: float
    iterations_done: int
    error: str
    activated_params: int
    improved_at: float
    history: _containers.RepeatedCompositeFieldContainer[AccuracyPoint]
    paused: bool
    stale_iterations: int
    evolver: EvolverActivity
    pinned: bool
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., private: _Optional[bool] = ..., labels: _Optional[_Iterable[str]] = ..., system_version: _Optional[int] = ..., path_id: _Optional[str] = ..., validation_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., iterations_done: _Optional[int] = ..., error: _Optional[str] = ..., activated_params: _Optional[int] = ..., improved_at: _Optional[float] = ..., history: _Optional[_Iterable[_Union[AccuracyPoint, _Mapping]]] = ..., paused: _Optional[bool] = ..., stale_iterations: _Optional[int] = ..., evolver: _Optional[_Union[EvolverActivity, _Mapping]] = ..., pinned: _Optional[bool] = ...) -> None: ...

class AccuracyPoint(_message.Message):
    __slots__ = ("system_version", "time", "validation_accuracy", "test_accuracy")
    SYSTEM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    system_version: int
    time: float
    validation_accuracy: float
    test_accuracy: float
    def __init__(self, system_version: _Optional[int] = ..., time: _Optional[float] = ..., validation_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ...) -> None: ...

class EvolverActivity(_message.Message):
    __slots__ = ("task", "iteration", "generation", "generations", "children_running", "phase", "updated")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_RUNNING_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    task: str
    iteration: int
    generation: int
    generations: int
    children_running: int
    phase: str
    updated: float
    def __init__(self, task: _Optional[str] = ..., iteration: _Optional[int] = ..., generation: _Optional[int] = ..., generations: _Optional[int] = ..., children_running: _Optional[int] = ..., phase: _Optional[str] = ..., updated: _Optional[float] = ...) -> None: ...
