"""Job submission, job spec and job status (docs/job-file.md), as msgspec Structs.

Field names are the ones Cortex's code emits, so existing clients keep working. The items of an
``item_list`` are kept as ONE :class:`msgspec.Raw`: the text of the whole ``[...]`` array, a
zero-copy view of the submission that msgspec checked as JSON while skipping it (no object per
item: :mod:`supervisor.split` decodes the array a chunk at a time). :func:`decode_submission`
refuses a value that is not an array, or an empty one, with msgspec's own message for
``list`` with ``min_length=1`` (``Expected `array` of length >= 1 - at `item_list.items```).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec

from supervisor.config import format_validation_error
from supervisor.errors import JobError
from supervisor.files import JOB_FILE_LIMIT, TooLarge, read_limited

__all__ = [
    "END_STATES",
    "DeadLetterQueue",
    "DelimitedFiles",
    "FilePathLister",
    "ItemList",
    "JobMetrics",
    "JobSpec",
    "JobStatus",
    "JobStatusResponse",
    "JobSubmission",
    "WorkerCounts",
    "counts_lost_deliveries",
    "decode_submission",
    "load_submission",
    "max_attempts",
    "new_job_id",
    "rfc3339",
]

# Cortex decodes these into Go ints: bigger numbers are refused there too.
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=(1 << 63) - 1)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]

# Status codes as Cortex's code writes them.
PENDING: Final = "pending"
ENQUEUING: Final = "enqueuing"
RUNNING: Final = "running"
ENQUEUE_FAILED: Final = "enqueue_failed"
COMPLETED_WITH_FAILURES: Final = "completed_with_failures"
SUCCEEDED: Final = "succeeded"
UNEXPECTED_ERROR: Final = "unexpected_error"
WORKER_ERROR: Final = "worker_error"
WORKER_OOM: Final = "worker_oom"
TIMED_OUT: Final = "timed_out"
STOPPED: Final = "stopped"
END_STATES: Final = frozenset(
    {
        ENQUEUE_FAILED,
        COMPLETED_WITH_FAILURES,
        SUCCEEDED,
        UNEXPECTED_ERROR,
        WORKER_ERROR,
        WORKER_OOM,
        TIMED_OUT,
        STOPPED,
    }
)


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    pass


class ItemList(_Strict):
    items: msgspec.Raw  # the JSON text of a non-empty array (see decode_submission)
    batch_size: PositiveInt


class DelimitedFiles(_Strict):
    s3_paths: Annotated[list[str], msgspec.Meta(min_length=1)]
    batch_size: PositiveInt
    includes: list[str] = []
    excludes: list[str] = []


class FilePathLister(_Strict):
    s3_paths: Annotated[list[str], msgspec.Meta(min_length=1)]
    batch_size: PositiveInt
    includes: list[str] = []
    excludes: list[str] = []


class DeadLetterQueue(_Strict):
    arn: NonEmptyStr
    max_receive_count: PositiveInt


class JobSubmission(_Strict):
    """What a user POSTs to ``/batch/<api_name>`` (or passes to ``run --job``)."""

    workers: PositiveInt
    item_list: ItemList | None = None
    delimited_files: DelimitedFiles | None = None
    file_path_lister: FilePathLister | None = None
    config: dict[str, Any] | None = None
    timeout: PositiveInt | None = None
    sqs_dead_letter_queue: DeadLetterQueue | None = None

    def __post_init__(self) -> None:
        given = [
            k
            for k in ("item_list", "delimited_files", "file_path_lister")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            found = " and ".join(f"`{k}`" for k in given) if given else "none"
            raise ValueError(
                "A job needs exactly one of `item_list`, `delimited_files`, "
                f"`file_path_lister`; found {found}"
            )

    @property
    def max_attempts(self) -> int:
        return max_attempts(self)


class JobSpec(msgspec.Struct, kw_only=True):
    """The job spec: the submission response and ``/cortex/spec/job.json``."""

    job_id: str
    api_name: str
    kind: str = "BatchAPI"
    workers: int
    config: dict[str, Any] | None = None
    api_id: str
    sqs_url: str
    timeout: int | None = None
    sqs_dead_letter_queue: DeadLetterQueue | None = None
    created_time: str
    total_batch_count: int | None = None
    start_time: str | None = None


class WorkerCounts(msgspec.Struct, omit_defaults=True):
    pending: int = 0
    creating: int = 0
    not_ready: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    killed: int = 0
    killed_oom: int = 0
    stalled: int = 0
    unknown: int = 0


class JobStatus(JobSpec, kw_only=True):
    status: str
    batches_in_queue: int = 0
    worker_counts: WorkerCounts | None = None
    end_time: str | None = None


class JobMetrics(msgspec.Struct):
    succeeded: int = 0
    failed: int = 0
    average_time_per_batch: float | None = None


class JobStatusResponse(msgspec.Struct):
    """``GET /batch/<api_name>?jobID=<id>`` and the final line of ``supervisor run``."""

    job_status: JobStatus
    endpoint: str
    api_spec: dict[str, Any]
    metrics: JobMetrics


def max_attempts(job: JobSubmission | JobSpec) -> int:
    """Attempts per batch: once without a dead-letter queue (Cortex), else max_receive_count."""
    dlq = job.sqs_dead_letter_queue
    return 1 if dlq is None else dlq.max_receive_count


def counts_lost_deliveries(job: JobSubmission | JobSpec) -> bool:
    """Whether a delivery lost with its pod counts as a failed attempt: with a dead-letter
    queue, whose ``max_receive_count`` counts receives as SQS does; without one it is
    delivered again (see ``supervisor.queues.base.after_lost_delivery``)."""
    return job.sqs_dead_letter_queue is not None


_MAX_INT64: Final = (1 << 63) - 1


def new_job_id(now_ns: int | None = None) -> str:
    """Cortex's job id: hex of MaxInt64 minus Unix nanoseconds, so ids sort newest first."""
    ns = time.time_ns() if now_ns is None else now_ns
    return format(_MAX_INT64 - ns, "x")


def rfc3339(ts: float | None = None) -> str:
    t = time.time() if ts is None else ts
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


_decoder = msgspec.json.Decoder(JobSubmission)
_items_decoder = msgspec.json.Decoder(Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1)])
_JSON_WS: Final = b" \t\r\n"
_ITEM_CHUNK: Final = 1 << 20


def _check_items(items: msgspec.Raw, where: str) -> None:
    """Refuse ``item_list.items`` unless it is a non-empty array, in msgspec's words."""
    text = memoryview(items)
    k = 1
    while k < len(text) and text[k] in _JSON_WS:
        k += 1
    if k < len(text) and text[0] == ord("[") and text[k] != ord("]"):
        return
    try:  # not an array, or an empty one: small values, so decoding them costs nothing
        _items_decoder.decode(text)
    except msgspec.ValidationError as e:
        raise JobError(f"{where}: {e} - at `item_list.items`") from None
    raise JobError(f"{where}: expected a non-empty array - at `item_list.items`")  # not reached


class _ConfigValues(msgspec.Struct):
    """Only ``config``, its values left as text: to name the key of a value msgspec refused."""

    config: dict[str, msgspec.Raw] | None = None


def _json_check(raw: msgspec.Raw, tp: Any) -> object:
    return msgspec.json.decode(raw, type=tp)


def _check_utf8(data: bytes, where: str) -> None:
    """Refuse bytes that are not UTF-8: msgspec checks the strings it decodes, not the ones it
    skips (``item_list.items`` is kept as text, and is sent on as it is)."""
    if data.isascii():
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    for start in range(0, len(view), _ITEM_CHUNK):
        try:
            decoder.decode(
                view[start : start + _ITEM_CHUNK], final=start + _ITEM_CHUNK >= len(view)
            )
        except UnicodeDecodeError as e:
            at = start + e.start
            raise JobError(
                f"{where}: not valid JSON (byte {at}, 0x{data[at]:02x}, is not UTF-8)"
            ) from None


def decode_submission(data: bytes, where: str = "job") -> JobSubmission:
    """Decode and validate a JSON job submission; errors name the field path."""
    if not data or data.isspace():
        raise JobError(f"{where}: the job is empty; expected a JSON object")
    try:
        sub = _decoder.decode(data)
    except msgspec.ValidationError as e:
        config = None
        if "`$.config[...]" in str(e):
            with contextlib.suppress(msgspec.DecodeError):
                config = msgspec.json.decode(data, type=_ConfigValues).config
        message = format_validation_error(
            e, where, data={"config": config}, tp=JobSubmission, check=_json_check
        )
        raise JobError(message) from None
    except msgspec.DecodeError as e:
        _check_utf8(data, where)  # says where, if that is what is wrong
        if data.startswith(b"\xef\xbb\xbf"):
            raise JobError(
                f"{where}: not valid JSON (it starts with a byte order mark; "
                "save it as UTF-8 without one)"
            ) from None
        raise JobError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise JobError(f"{where}: not valid JSON (nested too deeply to be read)") from None
    _check_utf8(data, where)
    if sub.item_list is not None:
        _check_items(sub.item_list.items, where)
    return sub


def load_submission(path: str | os.PathLike[str]) -> tuple[JobSubmission, bytes]:
    """Read a job file (JSON; ``-`` for stdin). Returns the submission and its raw bytes."""
    where = str(path)
    try:
        data = read_limited(path, JOB_FILE_LIMIT)
    except OSError as e:
        raise JobError(f"{where}: cannot read the job file ({e.strerror or e})") from None
    except TooLarge as e:
        raise JobError(f"{where}: cannot read the job file ({e})") from None
    return decode_submission(data, where), data
