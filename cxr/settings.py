"""The one settings object every process reads (API, watcher, worker, Alembic, CLI).

Values come from ``CXR_*`` environment variables (or a ``.env`` file), with defaults
that give the embedded single-machine setup: SQLite and Celery's filesystem transport,
both under ``CXR_HOME``. Moving to Postgres + Redis is a matter of setting
``CXR_DATABASE_URL`` and ``CXR_BROKER_URL``; no code changes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = PROJECT_ROOT / "models" / "cxr-default.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=".env", extra="ignore")

    home: Path = Field(Path("./var"), description="Database file, file store, heatmaps, broker folders.")
    inbox: Path = Field(Path("./inbox"), description="Folder the watcher screens files from.")
    database_url: str = Field("", description="SQLAlchemy URL. Default: SQLite under CXR_HOME.")
    broker_url: str = Field("", description="Celery broker URL. Default: filesystem transport under CXR_HOME.")
    checkpoint: Path | None = Field(None, description="Model bundle (.safetensors) the workers load.")
    queue: str = Field("cxr", description="Celery queue name.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per worker process.")
    device: str = Field("cpu", description="Torch device for inference: cpu, cuda, cuda:N.")
    heatmaps: bool = Field(True, description="Write a Grad-CAM heatmap PNG for every scored study.")
    watch_settle_seconds: float = Field(1.0, ge=0, description="A file must keep its size this long before intake.")
    broker_poll_seconds: float = Field(0.1, gt=0, description="Polling interval of the filesystem broker.")
    log_level: str = Field("INFO", description="Log level for every process.")
    max_image_pixels: int = Field(80_000_000, description="Refuse images larger than this before decoding.")

    @model_validator(mode="after")
    def _resolve(self) -> "Settings":
        self.home = self.home.expanduser().resolve()
        self.inbox = self.inbox.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'cxr.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.checkpoint is not None:
            self.checkpoint = self.checkpoint.expanduser().resolve()
        return self

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
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    def resolved_checkpoint(self) -> Path | None:
        """The bundle to load: CXR_CHECKPOINT, else the shipped default if it exists."""
        if self.checkpoint is not None:
            return self.checkpoint
        return DEFAULT_BUNDLE if DEFAULT_BUNDLE.exists() else None

    def ensure_dirs(self) -> None:
        for d in (self.home, self.inbox, self.store_dir, self.heatmap_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.uses_filesystem_broker:
            for sub in ("queue", "processed", "control"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
