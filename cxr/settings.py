"""The one settings object every process reads (API, watcher, worker, Alembic, CLI).

Values come from ``CXR_*`` environment variables (or a ``.env`` file), with defaults
that give the embedded single-machine setup: SQLite and Celery's filesystem transport,
both under ``CXR_HOME``. Moving to Postgres + Redis is a matter of setting
``CXR_DATABASE_URL`` and ``CXR_BROKER_URL``; no code changes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from typing import Annotated, Any

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = PROJECT_ROOT / "models" / "cxr-default.safetensors"

# BodyPartExamined values (upper case, any one word of the value) that count as a chest.
# DICOM's defined terms are CHEST and THORAX; the rest are common local spellings.
DEFAULT_CHEST_BODY_PARTS = (
    "CHEST", "THORAX", "LUNG", "LUNGS", "CXR", "TORAX", "TORACE", "TORAKS", "BRUST", "BRUSTKORB", "POITRINE",
    "THORACIC", "PECHO", "THX", "TORACICO", "THORAKS",
)


def _split_list(value: Any) -> Any:
    """Accept "A,B" as well as a JSON list from an environment variable."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            return json.loads(value)
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=".env", extra="ignore")

    home: Path = Field(Path("./var"), description="Database file, file store, heatmaps, broker folders.")
    inbox: Path = Field(Path("./inbox"), description="Folder the watcher screens files from.")
    database_url: str = Field("", description="SQLAlchemy URL. Default: SQLite under CXR_HOME.")
    broker_url: str = Field("", description="Celery broker URL. Default: filesystem transport under CXR_HOME.")
    checkpoint: Path | None = Field(None, description="Model bundle (.safetensors) the workers load.")
    queue: str = Field("cxr", description="Celery queue name.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per worker process.")
    engine: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="Inference engine: torch, or onnx (onnxruntime, CPU only; Grad-CAM stays in torch). "
        "auto: onnx on the CPU (about twice torch's rate here, see benchmarks/pipeline.py), torch on CUDA.")
    max_batch: int | None = Field(None, ge=1, description="Studies per forward pass; > 1 runs the worker with a "
                                  "threads pool of this many and micro-batches their forward passes. "
                                  "Default 16 on the CPU, 64 on CUDA.")
    max_wait_ms: float = Field(50.0, ge=0, description="How long a batch waits for more studies after its first.")
    batch_eager: bool = Field(True, description="Run a batch as soon as no other study is being decoded, instead "
                              "of waiting CXR_MAX_WAIT_MS for it to fill: a lone study pays no batching delay.")
    device: str = Field("cpu", description="Torch device for inference: cpu, cuda or cuda:N. Without a usable "
                        "GPU a cuda worker says so in its log and runs on the CPU. See also `cxr worker --gpus`.")
    heatmaps: Literal["all", "flagged", "none"] = Field(
        "all", description="Which scored studies get a Grad-CAM heatmap PNG: all, only flagged ones, or none.")
    watch_settle_seconds: float = Field(
        1.0, ge=0, description="After its writer closed it (close-after-write event), a file must keep its size and "
        "modification time this long before intake.")
    broker_poll_seconds: float = Field(0.1, gt=0, description="Polling interval of the filesystem broker.")
    log_level: str = Field("INFO", description="Log level for every process.")
    max_image_pixels: int = Field(80_000_000, description="Refuse images larger than this before decoding.")
    decode_budget_mb: float = Field(
        512.0, gt=0, description="Decoded image bytes (rows x cols x frames x samples x bytes per sample, read from "
        "the header before decoding) a worker process holds at once; studies over the rest wait their turn, and one "
        "that alone needs more is rejected as too_large.")

    # HTTP API.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="API keys (comma-separated). When any is set, X-API-Key is required.")
    max_upload_mb: float = Field(64.0, gt=0, description="Largest request body the API accepts, in MB (413 above).")
    max_zip_uncompressed_mb: float = Field(
        1024.0, gt=0, description="Largest total uncompressed size of a zip sent to POST /jobs, in MB (413 above).")
    max_zip_members: int = Field(10_000, ge=1, description="Most files a zip sent to POST /jobs may hold.")
    predict_timeout_seconds: float = Field(
        30.0, gt=0, description="How long POST /predict waits for the worker before answering 504 with the study id.")
    callback_retries: int = Field(5, ge=0, description="Retries of a failed job callback (backoff doubles).")
    callback_backoff_seconds: float = Field(
        2.0, gt=0, description="Delay before the first callback retry (Celery's retry_backoff: whole seconds, at "
        "least 1; each retry waits a random time up to this doubled per retry, retry_jitter).")
    callback_backoff_max_seconds: float = Field(300.0, gt=0, description="Longest wait between two callback tries.")
    callback_deadline_seconds: float = Field(
        10.0, gt=0, description="Total time one callback attempt may take, connecting, sending and reading the whole "
        "answer (a receiver that drips its answer is cut off here, whatever the per-read timeouts).")
    callback_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Callback receivers allowed although their address is loopback, private, "
        "link-local, CGNAT, multicast, reserved or unspecified (all refused by default): CIDRs (10.1.0.0/16, ::1/128) "
        "or host names (hooks.internal), comma-separated.")
    callback_concurrency: int = Field(
        8, ge=0, description="Callbacks a `cxr worker` delivers at once, in its own callback process (a threads "
        "pool on the callback queue, apart from screening). 0: this worker starts no callback process.")
    callback_queue: str = Field("", description="Celery queue of job callbacks. Default: CXR_QUEUE + '.callbacks'.")
    auth: Literal["required", "open"] | None = Field(
        None, description="required: every endpoint but /health and /metrics needs X-API-Key (with no key at all, "
        "every such request gets 401). open: none does, even when keys exist (logged as a warning). Unset: required "
        "once CXR_API_KEYS is set or any key was ever created with `cxr apikey create` (revoked keys count), so "
        "revoking the last key never opens the API; open while no key ever existed.")
    db_pool_size: int = Field(
        10, ge=1, description="Database connections a process keeps (SQLAlchemy pool_size; as many again are opened "
        "under peaks). The API lets at most this many requests use the database at once (and as many /predict* "
        "waiting for the worker); the others wait their turn.")
    health_interval_seconds: float = Field(
        2.0, gt=0, description="How often the API checks the database, the broker and the workers (Celery ping) in "
        "the background; GET /health answers from the last check, never waiting on either.")
    stop_grace_seconds: float = Field(
        60.0, gt=0, description="`cxr up` and `cxr worker --gpus`: how long a child may take to stop after SIGTERM "
        "(a worker finishes its batch) before it is killed (SIGKILL).")
    api_url: str = Field("http://127.0.0.1:8000", description="Where `cxr submit` sends files.")
    api_key: SecretStr | None = Field(None, description="The X-API-Key `cxr submit` sends.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated). Empty: CORS is off.")

    # Outputs for PACS and monitoring.
    dicom_outbox: Path | None = Field(
        None, description="Folder that receives a DICOM SR and a heatmap Secondary Capture for each screened "
        "DICOM study. Unset: none are written.")
    worker_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Port of the worker's Prometheus exporter (/metrics). Unset: no exporter.")
    worker_metrics_host: str = Field("127.0.0.1", description="Bind address of the worker's Prometheus exporter.")

    # Quality gate: each rule can be turned off. `unreadable` and `not_an_image` cannot.
    gate_not_radiograph: bool = Field(True, description="Reject DICOM whose Modality is present and not CR, DX or DR.")
    gate_not_chest: bool = Field(True, description="Reject DICOM whose BodyPartExamined is present and not a chest, "
                                 "or, when it is empty, whose Anatomic Region Sequence, Protocol Name, Series or Study "
                                 "Description names another body part.")
    gate_lateral_view: bool = Field(True, description="Reject DICOM whose ViewPosition is LL or RL.")
    gate_multi_frame: bool = Field(True, description="Reject multi-frame DICOM (off: screen the first frame).")
    gate_too_small: bool = Field(True, description="Reject images whose short side is under gate_min_size.")
    gate_min_size: int | None = Field(
        None, ge=1, description="Shortest acceptable image side in pixels. Unset: half the model bundle's input "
        "size, rounded up (112 for a 224 px model).")
    gate_blank_image: bool = Field(True, description="Reject decoded images with no usable contrast or structure.")
    gate_polarity: Literal["invert", "reject", "off"] = Field(
        "invert", description="PNG/JPEG that look like a negative: invert them (and record it), reject them "
        "(inverted_polarity), or do nothing. DICOM is never inverted by this rule.")
    gate_chest_body_parts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_CHEST_BODY_PARTS),
        description="BodyPartExamined words that mean chest (comma-separated or a JSON list).",
    )

    # DICOM VOI (windowing) fallback.
    voi_use_window: bool = Field(True, description="Use the DICOM window / VOI LUT when it is sensible.")
    voi_fallback_percentiles: Annotated[tuple[float, float], NoDecode] = Field(
        (0.5, 99.5), description="Percentiles of the robust min-max used when no sensible window exists."
    )

    # Reliability: leases, the reaper, the broker's redelivery, intake on a full disk (README "What happens when…").
    lease_seconds: float = Field(
        120.0, gt=0, description="A worker's lease on a study in `processing`; renewed every third of it while it "
        "works. Once expired (the worker died or lost the database), the reaper re-queues the study.")
    reap_interval_seconds: float = Field(15.0, gt=0, description="How often the watcher runs the reaper.")
    worker_heartbeat_seconds: float = Field(
        5.0, gt=0, description="How often each worker process writes its heartbeat row (table workers).")
    worker_dead_after_seconds: float = Field(
        30.0, gt=0, description="A worker whose heartbeat is older than this is dead: the reaper re-queues its "
        "leased studies and the studies whose tasks it had taken (prefetched), without waiting for CXR_LEASE_SECONDS "
        "or CXR_REQUEUE_QUEUED_AFTER_SECONDS.")
    requeue_queued_after_seconds: float = Field(
        600.0, gt=0, description="A study `queued` this long while the broker queue is empty has lost its message "
        "(a broker restarted without persistence): the reaper publishes its task again.")
    visibility_timeout_seconds: int = Field(
        7200, gt=0, description="Redis broker: an unacknowledged task is redelivered after this. Keep it well above "
        "the longest batch (a redelivery of a finished study is a no-op, but costs a lookup).")
    min_free_mb: float = Field(
        200.0, ge=0, description="The watcher takes in no file while the store's disk has less free space than "
        "this (MB); files wait in the inbox.")
    watch_archive: Path | None = Field(
        None, description="Move each file taken in from the inbox here (dated sub-folders) instead of deleting it.")
    watch_quiet_seconds: float = Field(
        10.0, ge=0, description="A file for which no close-after-write event was seen (found by a scan at start-up "
        "or by the periodic rescan, a network filesystem, a platform without inotify) must keep its size and "
        "modification time this long before intake.")
    watch_stalled_seconds: float = Field(
        600.0, ge=0, description="A file that still looks unfinished (open for writing with no close event yet, or "
        "content that ends early: PNG without IEND, JPEG without EOI, DICOM cut short) is waited for until it has "
        "not changed for this long; then it is taken in, and one still cut short is kept in the errors folder.")
    watch_ignore: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="More file-name globs the watcher ignores (comma-separated or a JSON "
        "list; case-insensitive), on top of the built-in temporary names (.part, .filepart, .tmp, dot-files, ...).")
    watch_errors: Path | None = Field(
        None, description="Folder for inbox files that are kept rather than taken in or deleted (cut short, over "
        "CXR_MAX_UPLOAD_MB), each with a .reason.txt. Default: `errors` beside the inbox.")

    @field_validator("watch_ignore", mode="before")
    @classmethod
    def _watch_ignore(cls, v: Any) -> Any:
        return [str(x).strip() for x in _split_list(v) if str(x).strip()] if v is not None else []

    @field_validator("watch_errors", mode="after")
    @classmethod
    def _watch_errors(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    # Pseudonymised patient key: HMAC-SHA256 of PatientID with this secret.
    pseudonym_key: SecretStr | None = Field(
        None, description="Secret for the patient key. Default: generated once into $CXR_HOME/pseudonym.key (0600)."
    )

    @field_validator("gate_chest_body_parts", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        return [str(x).strip().upper() for x in _split_list(v)]

    @field_validator("api_keys", "cors_origins", "callback_allow", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        return [str(x) for x in _split_list(v)] if v is not None else []

    @field_validator("voi_fallback_percentiles", mode="before")
    @classmethod
    def _pcts(cls, v: Any) -> Any:
        v = _split_list(v)
        lo, hi = (float(x) for x in v)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError("voi_fallback_percentiles must be two numbers with 0 <= low < high <= 100, e.g. 0.5,99.5")
        return lo, hi

    @model_validator(mode="after")
    def _resolve(self) -> "Settings":
        self.home = self.home.expanduser().resolve()
        self.inbox = self.inbox.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'cxr.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.callback_queue:
            self.callback_queue = f"{self.queue}.callbacks"
        if self.checkpoint is not None:
            self.checkpoint = self.checkpoint.expanduser().resolve()
        if self.watch_archive is not None:
            self.watch_archive = self.watch_archive.expanduser().resolve()
        if self.dicom_outbox is not None:
            self.dicom_outbox = self.dicom_outbox.expanduser().resolve()
        on_cuda = self.device.startswith("cuda")
        if self.engine == "auto":
            self.engine = "torch" if on_cuda else "onnx"
        if self.max_batch is None:
            self._max_batch_is_default = True
            self.max_batch = 64 if on_cuda else 16
        return self

    _max_batch_is_default: bool = PrivateAttr(False)

    @property
    def max_batch_is_default(self) -> bool:
        """True when CXR_MAX_BATCH was not given (the per-device default applies)."""
        return self._max_batch_is_default

    # Derived locations -------------------------------------------------------------
    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def heatmap_dir(self) -> Path:
        return self.home / "heatmaps"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def metrics_dir(self) -> Path:
        """Where worker processes keep their Prometheus multiprocess files (one folder per worker)."""
        return self.home / "metrics"

    @property
    def pseudonym_key_file(self) -> Path:
        return self.home / "pseudonym.key"

    @property
    def decode_budget_bytes(self) -> int:
        return int(self.decode_budget_mb * 1024 * 1024)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    def ensure_dirs(self) -> None:
        for d in (self.home, self.inbox, self.store_dir, self.heatmap_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.uses_filesystem_broker:
            for sub in ("queue", "processed", "control"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
