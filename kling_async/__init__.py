"""kling_async: an asyncio-native SDK for Kling text-to-video.

::

    import kling_async as ka

    async with ka.KlingClient(api_key="sk-...") as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="A cat surfing"))
        task = await kling.text2video.wait(task.task_id, timeout=900)
        print(task.video.url)

The error tree is documented in :mod:`kling_async._errors`; the emulator for tests lives in
:mod:`kling_async.testing`.
"""

from kling_async import _logging  # noqa: F401 (the package logger; KLING_LOG)
from kling_async._client import COMETAPI_BASE_URL, OFFICIAL_BASE_URL, ClientStats, KlingClient
from kling_async._errors import (
    AccountError,
    AddressRefused,
    AmbiguousSubmissionError,
    APIError,
    AuthenticationError,
    ClientClosedError,
    ConcurrencyLimitError,
    DownloadError,
    IgnoredLookupError,
    InvalidRequestError,
    JobStoreError,
    KlingError,
    PolicyError,
    RateLimitError,
    ResponseDecodeError,
    RestoredError,
    ServerError,
    TaskFailedError,
    TaskNotFoundError,
    ThrottledError,
    TransportError,
    UnreachableError,
    UsageError,
    ValidationError,
    WaitTimeoutError,
)
from kling_async._version import __version__
from kling_async.engine.account import (
    Account,
    AccountBinding,
    AccountMember,
    AccountSettings,
)
from kling_async.engine.durations import DurationStats, DurationStore, LearnedDurations
from kling_async.engine.jobs import Job, JobEvent, JobStatus
from kling_async.engine.limits import (
    AdaptiveLimit,
    CreateOutcome,
    RequestBudget,
    RequestLimiter,
    SlotLimiter,
)
from kling_async.engine.sqlite_store import SQLiteJobStore
from kling_async.engine.store import JobRecord, JobStore, MemoryJobStore
from kling_async.http.download import DEFAULT_DOWNLOAD_TIMEOUT, DEFAULT_MAX_BYTES, DownloadResult
from kling_async.protocol.auth import BearerAuth, JWTAuth
from kling_async.protocol.models import (
    CameraConfig,
    CameraControl,
    CameraType,
    Mode,
    Task,
    TaskStatus,
    Text2VideoRequest,
    Video,
)
from kling_async.protocol.poll import PollPolicy
from kling_async.protocol.profiles import (
    COMETAPI,
    KNOWN_MODELS,
    OFFICIAL,
    BackendProfile,
    UnknownModelWarning,
)
from kling_async.protocol.retry import RetryPolicy
from kling_async.protocol.schedule import DurationSummary

__all__ = [
    # client and settings
    "KlingClient",
    "ClientStats",
    "BackendProfile",
    "COMETAPI",
    "COMETAPI_BASE_URL",
    "KNOWN_MODELS",
    "OFFICIAL",
    "OFFICIAL_BASE_URL",
    "PollPolicy",
    "RetryPolicy",
    "BearerAuth",
    "JWTAuth",
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_MAX_BYTES",
    # jobs
    "Job",
    "JobEvent",
    "JobStatus",
    # the engine's seams and their in-process defaults
    "SlotLimiter",
    "AdaptiveLimit",
    "CreateOutcome",
    "RequestLimiter",
    "RequestBudget",
    "DurationStats",
    "DurationStore",
    "DurationSummary",
    "LearnedDurations",
    # one account shared by several clients (kling_async.redis.RedisAccount)
    "Account",
    "AccountBinding",
    "AccountMember",
    "AccountSettings",
    # jobs: where a client keeps them
    "JobRecord",
    "JobStore",
    "MemoryJobStore",
    "SQLiteJobStore",
    # data
    "DownloadResult",
    "CameraConfig",
    "CameraControl",
    "CameraType",
    "Mode",
    "Task",
    "TaskStatus",
    "Text2VideoRequest",
    "Video",
    # errors and warnings
    "APIError",
    "AccountError",
    "AddressRefused",
    "AmbiguousSubmissionError",
    "AuthenticationError",
    "ClientClosedError",
    "ConcurrencyLimitError",
    "DownloadError",
    "IgnoredLookupError",
    "InvalidRequestError",
    "JobStoreError",
    "KlingError",
    "PolicyError",
    "RateLimitError",
    "ResponseDecodeError",
    "RestoredError",
    "ServerError",
    "TaskFailedError",
    "TaskNotFoundError",
    "ThrottledError",
    "TransportError",
    "UnknownModelWarning",
    "UnreachableError",
    "UsageError",
    "ValidationError",
    "WaitTimeoutError",
    "__version__",
]
