"""The one settings class. Every field has a default, an environment variable and a README line.

Components take their share of it, not the whole (`EngineSettings.of(settings)`, `FeederSettings.of(...)`):
the fields they read under the same names, so what a component depends on is in its signature.

Environment variables are `DEEPBATCH_<FIELD>`; the two URLs also answer to the conventional
`DATABASE_URL` and `BROKER_URL`. A `.env` file in the working directory is read too.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt,
                      model_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict

# worker/engine/sizing.py's MAX_GPU_BATCH (schema cannot import the engine; a test keeps them equal).
LARGEST_AUTO_BATCH_SIZE = 512

EngineProcessChoice = Literal["auto", "own", "shared"]  # DEEPBATCH_ENGINE_PROCESS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPBATCH_", env_file=".env", extra="ignore")

    # Services. Unset: `deepbatch run` starts an embedded PostgreSQL and Redis under data_dir.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DEEPBATCH_DATABASE_URL", "DATABASE_URL")
    )
    broker_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DEEPBATCH_BROKER_URL", "BROKER_URL")
    )
    data_dir: Path = Path.home() / ".local" / "share" / "deepbatch"
    queue_name: str = "deepbatch"

    # Model and engine.
    model: str = "tiny-deepseek-v3"  # a built-in name, a .gguf file or a local checkpoint directory
    model_aliases: str = ""  # comma-separated: more names a line's `model` may give for the served model
    engine: str = Field(default="deepbatch", pattern=r"^(deepbatch|null|[\w.]+:\w+)$")
    device: str = "auto"  # auto | cpu | cuda | cuda:N, read by the engine (worker/engine/device.py)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16, read likewise
    tensor_parallel_size: PositiveInt = 1  # GPUs one worker splits the model over, one process each
    quantization: str | None = Field(default=None, pattern=r"^(none|fp8)$")  # fp8: linear weights FP8 at load
    # None below: the engine's own default, written once in worker/engine/types.py (EngineConfig for the
    # engine, SamplingParams for default_max_tokens); the README gives each value.
    seed: int | None = None
    max_batch_size: PositiveInt | None = None  # None: sized from the device and its KV cache (README: Engine)
    max_wait_ms: float | None = Field(default=None, ge=0)
    max_num_batched_tokens: PositiveInt | None = None  # None: 8192 on a GPU, 4096 on the CPU
    max_model_len: PositiveInt | None = None
    default_max_tokens: PositiveInt | None = None  # a request's max_tokens when it gives none
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)  # share of the GPU the engine may fill
    cuda_graphs: bool | None = None  # replay decode steps from CUDA graphs (GPU only)
    # Where the worker's engine runs: in a process of its own (worker/engine/process.py says why), or in the
    # worker's; auto: its own on a GPU, the worker's on the CPU (where a second interpreter buys nothing).
    engine_process: EngineProcessChoice = "auto"

    # Delivery and retries.
    max_attempts: PositiveInt = 3
    retry_backoff_s: PositiveFloat = 2.0
    retry_backoff_max_s: PositiveFloat = 300.0
    visibility_timeout_s: PositiveInt = 3600  # Redis: must exceed the longest batch
    lease_s: PositiveFloat = 120.0  # a running request whose worker stops renewing this is taken back
    reconcile_interval_s: PositiveFloat = 60.0  # how often workers look for expired leases and lost messages
    broker_delivery_limit: PositiveInt = 20  # RabbitMQ quorum queue: redeliveries before the broker dead-letters
    circuit_failures: PositiveInt = 5  # a worker failing this many distinct requests in a row gives them back and exits
    database_retry_s: PositiveFloat = 600.0  # how long a worker waits out a lost Postgres before giving up a write
    audit_retention_days: PositiveInt = 180  # `deepbatch audit purge` deletes older audit events
    audit_hmac_key_file: Path | None = None  # the key that signs the audit chain; kept out of the database
    consumer_timeout_ms: PositiveInt = 3 * 3600 * 1000  # RabbitMQ: an unacked message older than this closes the channel
    # The pipeline: slices of requests in, batches of results out (README: How a request flows).
    slice_size: PositiveInt = 256  # request ids per broker message
    target_queue_depth: PositiveInt | None = None  # requests a worker keeps in its engine; None: 2 × max_batch_size
    flush_interval_ms: float = Field(default=50.0, gt=0)  # the recorder writes finished requests at least this often
    flush_max_results: PositiveInt = 1024  # ... or as soon as this many are waiting
    worker_threads: PositiveInt | None = None  # slices in flight; None: enough to keep target_queue_depth

    # Flower (`deepbatch flower`): basic auth is required unless --no-auth is given.
    flower_user: str | None = None
    flower_password: str | None = None
    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_broker_api: str | None = None  # RabbitMQ management API, e.g. http://guest:guest@localhost:15672/api/

    metrics_port: int = Field(default=9464, ge=0, le=65535)  # Prometheus /metrics of a worker; 0 turns it off

    # The HTTP API (`deepbatch serve`): the OpenAI Batch API and the job dashboard.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_auth: bool = True  # every /v1 route and the dashboard need an API key (`deepbatch keys create`)
    files_dir: Path | None = None  # uploaded files; None: data_dir/files
    api_max_file_bytes: PositiveInt = 512 * 1024 * 1024  # an upload's limit (OpenAI's: 200 MB)
    api_max_file_lines: PositiveInt = 100_000  # requests in one batch input file (OpenAI's: 50,000)
    api_requests_per_s: PositiveFloat = 20.0  # each key's token bucket refills at this rate ...
    api_burst: PositiveInt = 40  # ... up to this many requests at once
    api_max_queued_lines: PositiveInt = 1_000_000  # a key's requests queued or running, across its batches

    # Producer.
    insert_chunk_size: PositiveInt = 5000
    # Whose stored results a greedy request may reuse (schema/cache.py): its owner's — its API key's, or
    # the CLI's — or, shared, the whole deployment's.
    result_cache_scope: Literal["owner", "deployment"] = "owner"
    max_line_bytes: PositiveInt = 4 * 1024 * 1024  # far above any context window; a longer line is an error
    # A file this big (what is left of it) is read and encoded in a process of its own (producer/staging.py);
    # starting one costs about a second of imports, which a smaller file would not win back.
    submit_process_min_bytes: NonNegativeInt = 32 * 1024 * 1024

    @model_validator(mode="after")
    def _derived_defaults(self) -> Settings:
        if self.target_queue_depth is None and self.max_batch_size is not None:
            self.target_queue_depth = 2 * self.max_batch_size  # unset: the feeder takes 2 × the engine's batch
        if self.worker_threads is None:
            # Enough slices to fill the target depth, plus two draining their tails meanwhile; with the batch
            # left to the device, enough for the largest batch it may choose (worker/engine/sizing.py).
            depth = self.target_queue_depth or 2 * LARGEST_AUTO_BATCH_SIZE
            self.worker_threads = -(-depth // self.slice_size) + 2
        return self

    @property
    def stored_files_dir(self) -> Path:
        return self.files_dir or self.data_dir / "files"

    @property
    def served_model_names(self) -> frozenset[str]:
        """What a line's `model` may say: the setting, a checkpoint directory's own name, the aliases."""
        aliases = {alias.strip() for alias in self.model_aliases.split(",") if alias.strip()}
        path = Path(self.model)
        return frozenset({self.model, path.name, path.stem if path.suffix == ".gguf" else path.name, *aliases})

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the psycopg 3 driver named, whatever form the user wrote."""
        if self.database_url is None:
            raise RuntimeError("database_url is not set (DATABASE_URL); `deepbatch run` starts an embedded one")
        for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
            if self.database_url.startswith(prefix):
                return "postgresql+psycopg://" + self.database_url[len(prefix) :]
        raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got {self.database_url!r}")


class ComponentSettings(BaseModel):
    """A component's share of Settings. Fields are declared with their type only: the default, the
    environment variable and the validation are Settings' (a test checks the types agree)."""

    model_config = ConfigDict(frozen=True)

    @classmethod
    def of(cls, settings: Settings) -> Self:
        return cls.model_construct(**{name: getattr(settings, name) for name in cls.model_fields})


class EngineSettings(ComponentSettings):
    """What builds a worker's engine (worker/runtime.py): which engine, and its EngineConfig."""

    engine: str
    model: str
    device: str
    dtype: str
    tensor_parallel_size: PositiveInt
    quantization: str | None
    seed: int | None
    max_batch_size: PositiveInt | None
    max_wait_ms: float | None
    max_num_batched_tokens: PositiveInt | None
    max_model_len: PositiveInt | None
    gpu_memory_utilization: float | None
    cuda_graphs: bool | None
    engine_process: EngineProcessChoice


class RetrySettings(ComponentSettings):
    """The retry policy's (worker/retries.py): backoff of a failed request, patience with a lost database."""

    retry_backoff_s: PositiveFloat
    retry_backoff_max_s: PositiveFloat
    database_retry_s: PositiveFloat


class RecorderSettings(RetrySettings):
    """The recorder's (worker/recorder.py): how often results are written, and the model they name."""

    model: str
    flush_interval_ms: float
    flush_max_results: PositiveInt


class FeederSettings(RecorderSettings):
    """The feeder's (worker/feeder.py), with its recorder's and retry policy's."""

    circuit_failures: PositiveInt
    target_queue_depth: PositiveInt | None
    default_max_tokens: PositiveInt | None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
