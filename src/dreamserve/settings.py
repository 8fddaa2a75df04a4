"""The one typed settings object. Read once (``Settings()``), then passed down; tests build it directly.

Environment variables use the prefix ``DREAMSERVE_`` and ``__`` for nesting, e.g.
``DREAMSERVE_DATA_DIR=/srv/dream`` or ``DREAMSERVE_MODELS='{"bytedance/seedream-v4": {"source": "/w/klein"}}'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "bytedance/seedream-v4"


class ModelSpec(BaseModel):
    """How one served model (``/v1/Run/{owner}/{model}``) is loaded and run."""

    #: A preset name from ``dreamserve.presets.PRESETS`` (``flux2-klein-4b``, ``sd-turbo``, ``tiny``, ...), a local
    #: diffusers folder, a single-file checkpoint, or a hub id.
    source: str = "tiny"
    #: Denoising steps; ``None`` takes the preset's or the family's default (4 for distilled FLUX.2 klein).
    steps: int | None = None
    #: Native generation cap in pixels: larger requests are generated at this area and upscaled. ``None`` takes the
    #: preset's or the family's cap (4 MP for FLUX.2, 512x512 for SD-Turbo, 256x256 for ``tiny``).
    max_pixels: int | None = Field(default=None, ge=64 * 64)
    #: Most reference images passed to the model (the first ones are used); ``None`` takes the preset's.
    max_references: int | None = Field(default=None, ge=0, le=14)
    #: Largest number of images denoised in one pipeline call.
    max_batch: int = Field(default=4, ge=1, le=15)
    #: How long a worker about to start a batch below ``max_batch`` waits for more same-shape tasks (milliseconds;
    #: 0 = no wait); ``None`` takes ``Settings.batch_window_ms``. Right after a task that ran alone, half of it
    #: after each arrival (one client at a time pays half).
    batch_window_ms: int | None = Field(default=None, ge=0, le=10_000)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    #: Worker child processes serving this model on this host (one per GPU in production).
    workers: int = Field(default=1, ge=0)
    #: Allow downloads from the Hugging Face hub when ``source`` is a hub id.
    allow_download: bool = False
    #: A LoRA to fuse after loading (e.g. Qwen-Image-Lightning), a local file or hub id; with it, ``lora_steps``.
    lora: str | None = None
    lora_steps: int | None = None
    #: ``torch.compile`` the denoiser (regional compile where the model supports it).
    compile: bool = False
    #: ``fp8``: the denoiser's linear layers in FP8, weights and activations (torchao's float8 dynamic quantization,
    #: per-row scales). Needs ``torchao`` (``dreamserve[fp8]``) and a CUDA GPU with FP8 tensor cores (compute
    #: capability 8.9+: Ada, Hopper, Blackwell); lossy. Best together with ``compile``.
    quantize: Literal["none", "fp8"] = "none"
    #: Send a small preview image (latent -> RGB, no VAE decode) with every Nth progress event (0 = none). Live
    #: socket frames carry it; the event log and Task/Detail do not keep it.
    preview_every: int = Field(default=1, ge=0)
    #: Decode previews with this tiny autoencoder (a diffusers ``AutoencoderTiny`` folder trained for the model's
    #: VAE latents, e.g. TAESD for SD-Turbo) instead of the fitted linear map.
    preview_decoder: str | None = None
    #: Where the latent -> RGB maps fitted for unknown VAEs are kept, keyed by a hash of the VAE's weights (known
    #: VAE families use published factors and fit nothing). ``None``: ``$XDG_CACHE_HOME/dreamserve/preview-maps``
    #: (``~/.cache/...``).
    preview_cache_dir: str | None = None
    #: Above the native cap, upscale with this ESRGAN-class model (a local .pth/.safetensors loaded by ``spandrel``)
    #: instead of Lanczos.
    upscaler: str | None = None
    #: FLUX.2 [klein]: compute the references' attention K/V on the first step and reuse them (Flux2KleinKVPipeline).
    #: Meant for checkpoints trained for it (FLUX.2-klein-9b-kv); other klein weights were not.
    reference_kv_cache: bool = False
    #: On the CPU, the model process keeps the memory it frees for its next tensors instead of giving it back
    #: (glibc: no mmap, no trimming; ``dreamserve/malloc.py``): no page faults after the first call, 15-20 % faster
    #: per call on SD-Turbo, but the process holds its peak memory. Not used on GPUs.
    keep_freed_memory: bool = True
    #: Keep the VAE's convolutions in channels-last (NHWC) memory format: oneDNN's CPU and cuDNN's GPU
    #: convolutions run faster on it, with the same results to float rounding (SD-Turbo at 256x256 on a CPU: the
    #: VAE decode, most of an image's time there, in 0.83x the CPU time; ``bench/memory_format.py``).
    channels_last: bool = True
    #: The engine that loads and runs the model in the model process, as ``module:Class``; ``None`` is diffusers'
    #: (``dreamserve.engine.Engine``). Another runtime plugs in here behind the same supervisor, pipe and queue: a
    #: class with ``load(spec)`` and the ``ModelEngine`` methods of ``jobs.py``. The tests' scripted
    #: engine (``tests/scripted_engine.py``: real PNGs after a set delay per step, no torch) simulates GPUs with it.
    engine: str | None = None


class S3Settings(BaseModel):
    """Output and input files in an S3 bucket (any S3 endpoint) instead of the local data folder."""

    bucket: str
    endpoint: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    #: Lifetime of the presigned URLs that output links redirect to.
    presign_seconds: int = 3600


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DREAMSERVE_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path("dreamserve-data")
    #: SQLAlchemy async URL; defaults to SQLite in ``data_dir``.
    database_url: str | None = None
    #: Database connections a process may hold at once, kept open once made. SQLAlchemy's default pool kept 5
    #: and closed the other 10 on their return: under load a new connection (with aiosqlite, a new thread) for
    #: most requests, 5 a second in bench/soak.py. More wait for one, as before.
    database_pool_size: int = Field(default=15, ge=1, le=1000)
    host: str = "127.0.0.1"
    port: int = 8000
    #: Serve HTTPS (and WSS) on ``port`` with this certificate chain (PEM: the server's certificate first, then
    #: the intermediates) instead of plain HTTP. ``None``: plain HTTP, as behind a TLS-terminating proxy
    #: (docs/deploy.md).
    ssl_certfile: Path | None = None
    #: The certificate's private key (PEM); ``None`` when ``ssl_certfile`` holds the key too.
    ssl_keyfile: Path | None = None
    #: Base URL put in output links; defaults to ``http://{host}:{port}`` (``https://`` with ``ssl_certfile``).
    public_url: str | None = None

    models: dict[str, ModelSpec] = Field(default_factory=lambda: {DEFAULT_MODEL: ModelSpec()})
    #: Run the model workers inside ``serve`` (the embedded default). Off for an API-only replica.
    run_workers: bool = True

    # Scale-out: set these and the same code runs on PostgreSQL, Redis and S3 (docs/deploy.md).
    #: Redis for events (one stream per task) and, with ``dispatch="celery"``, the Celery broker.
    redis_url: str | None = None
    #: ``local``: workers in this process poll the tasks table; ``celery``: tasks go to ``gpu.<model>`` queues.
    dispatch: Literal["local", "celery"] = "local"
    s3: S3Settings | None = None

    lease_seconds: float = 30.0
    heartbeat_seconds: float = 2.0
    #: A task whose worker died is re-queued until it has been started this many times, then failed.
    max_attempts: int = 2
    #: How long a cooperative cancel of a running task may take before the child is killed.
    cancel_grace_seconds: float = 10.0

    #: A timestamp nonce (unix seconds or milliseconds) is accepted, and may be reused (Wiro's clients sign once and
    #: poll with the same headers, the n8n node for up to 600 s), until it is this old.
    nonce_max_age_seconds: int = Field(default=900, ge=1)
    #: ... and refused when it is this far ahead of the server clock.
    nonce_max_future_seconds: int = Field(default=60, ge=0)
    #: A nonce that is no timestamp ("random integer") is single-use: remembered this long, then pruned. A random
    #: nonce carries no time, so one replayed after that cannot be told from a new one: clients that care should
    #: send timestamps (docs/reliability.md).
    nonce_remember_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    #: Single-use nonces one project may have remembered at once (about 85 bytes a row in SQLite). Past it a new
    #: one is refused (HTTP 429, code 96) until the oldest is pruned: forgetting one early would let its replay in.
    nonce_max_remembered: int = Field(default=100_000, ge=1)
    #: Make timestamp nonces single-use as well (breaks Wiro's own clients, which reuse them).
    unique_nonces: bool = False
    #: Requests a project may make per minute (a token bucket per project in each API process); 0 = no limit.
    #: Over it, the answer is HTTP 429 with code 96 and Retry-After.
    rate_limit_per_minute: int = Field(default=1200, ge=0)
    #: Requests a project may make at once before the per-minute rate applies; 0 = one minute's worth.
    rate_limit_burst: int = Field(default=0, ge=0)

    # Per-project quotas: past either, Run answers code 96 (HTTP 429) until some of the project's tasks end.
    #: Unfinished (queued or running) tasks a project may have; 0 = no cap.
    max_queued_tasks: int = Field(default=100, ge=0)
    #: Unfinished work a project may have, in megapixels (images x width x height / 10^6); 0 = no cap. The default
    #: is about four requests of 15 images at 4096x4096, or 250 at 2048x2048.
    max_queued_megapixels: float = Field(default=1024.0, ge=0)
    #: What a project may store (its uploads, task inputs and outputs): bytes and files; 0 = no cap. Past either,
    #: File/Upload and Run with uploaded inputs answer ``storage_full`` until some are deleted (or expire).
    max_project_bytes: int = Field(default=20 * 1024**3, ge=0)
    max_project_files: int = Field(default=100_000, ge=0)
    #: Highest priority (0-9) a project's requests get unless ``keys create --max-priority`` gave it its own; higher
    #: asks are lowered to it. Within a priority, claims take projects in turn (round-robin).
    max_priority: int = Field(default=0, ge=0, le=9)
    #: Default of ``ModelSpec.batch_window_ms``.
    batch_window_ms: int = Field(default=100, ge=0, le=10_000)
    #: Tasks whose URL inputs this process fetches at once (``preprocess.py``), and how many of them may be one
    #: project's; each task's URLs are fetched concurrently under one deadline, ``fetch_timeout_seconds``, and
    #: ``preprocess_fetches`` bounds the fetches in flight (memory: that many x ``max_upload_bytes`` at worst).
    preprocess_tasks: int = Field(default=8, ge=1)
    preprocess_tasks_per_project: int = Field(default=1, ge=1)
    preprocess_fetches: int = Field(default=32, ge=1)

    #: Smallest output a request may ask for; Seedream's is 1280x720. Lower it for small CPU models.
    min_pixels: int = Field(default=1280 * 720, ge=64 * 64)
    #: Largest file in a request (each reference image, each upload).
    max_upload_bytes: int = 30 * 1024 * 1024
    #: Largest request body: refused from its Content-Length, or as soon as that many bytes have streamed in.
    max_request_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    #: Largest JSON (or any non-form) body, counted the same way (HTTP 413): files come as multipart, so JSON
    #: bodies are small, and they are parsed whole.
    max_json_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_input_pixels: int = 36_000_000
    #: Bytes the API process may hold at once for checking uploaded reference images (their bytes, and the
    #: pixels of each as it is decoded); a request past it is refused with 429 (retry). References given as this
    #: server's file URLs cost nothing: they were checked when stored and are copied blob to blob.
    reference_budget_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    #: Deadline for all the URL inputs of one task (fetched concurrently before the task can take a model process).
    fetch_timeout_seconds: float = 20.0
    #: Let server-side fetches (input URLs, callbacks) reach loopback and private addresses.
    fetch_allow_private: bool = False
    #: Hosts (``minio.internal``, ``*.corp.example``) and networks (``10.1.0.0/16``, ``fd00::5``) that
    #: input image fetches may always reach, private or not.
    fetch_allow_hosts: list[str] = Field(default_factory=list)
    #: The same for callback deliveries (``callbackUrl``): a separate list, so that allowing an internal image
    #: store does not let any client POST to it.
    callback_allow_hosts: list[str] = Field(default_factory=list)

    #: The secret that task tokens, file access keys and sealed webhook secrets derive from. Unset: read from
    #: ``server_key_file``, created on first start. Every replica and worker of a deployment needs the same one.
    server_secret: SecretStr | None = None
    #: Where the server secret is kept (0600); defaults to ``<data_dir>/server.key``.
    server_key_file: Path | None = None
    #: Host header values this server answers (``api.example.com``, ``*.example.com``); empty = any. Set it
    #: against DNS rebinding when the server is reachable from browsers.
    allowed_hosts: list[str] = Field(default_factory=list)
    #: When set, ``/metrics``, ``/healthz``, ``/readyz`` (details), ``/docs`` and ``/openapi.json`` need
    #: ``Authorization: Bearer <ops_token>``.
    ops_token: SecretStr | None = None
    #: Write the prompt into output PNGs (``prompt`` text chunk). Off: they carry the AI-generated mark, the seed
    #: and the model's public name only, as output URLs are made to be shared.
    png_embed_prompt: bool = False

    #: How long uploads and the files of an ended task are kept, in seconds (0 = until deleted with File/Delete,
    #: File/FolderDelete or Task/InputOutputDelete). Files show it as ``expiretime``; the reaper deletes expired
    #: files and rows.
    retention_seconds: float = Field(default=0.0, ge=0)
    #: A blob no file row names (a server killed while saving), or the scratch folder of a task no worker holds,
    #: is deleted by the reaper once this old (mtime, or S3 Last-Modified): far longer than any writer takes
    #: between storing bytes and committing the row that names them (``sweep.py``).
    orphan_grace_seconds: float = Field(default=3600.0, ge=0)
    #: Pause between two passes of the orphan sweep over the blob store.
    orphan_sweep_seconds: float = Field(default=3600.0, gt=0)
    #: Blobs listed (and checked against the rows in one query) per reaper tick.
    orphan_sweep_page: int = Field(default=500, ge=1, le=5000)

    webhook_attempts: int = 5
    webhook_backoff_seconds: float = 1.0
    #: One callback POST, connect to answer; a receiver slower than this is a failed attempt.
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Callbacks in flight at once from one API process, and of one project to one receiver host of them (per
    #: project: one tenant's hung receiver cannot take another's slots at a host they share).
    webhook_concurrency: int = Field(default=32, ge=1)
    webhook_per_host: int = Field(default=4, ge=1)
    #: A project's receiver (host and port) that failed this many attempts in a row is left alone for
    #: ``webhook_breaker_seconds`` (after a pause one failure pauses it again, twice as long, up to ten times): that
    #: project's callbacks to it wait, nobody else's do.
    webhook_breaker_failures: int = Field(default=5, ge=1)
    webhook_breaker_seconds: float = Field(default=30.0, gt=0)

    # Connections (``serve``; put the reverse proxy of deploy/ in front for body timeouts and per-address limits).
    #: Connections and requests uvicorn serves at once; past it, new requests get HTTP 503.
    http_limit_concurrency: int = Field(default=4096, ge=16)
    #: An idle keep-alive connection is closed after this many seconds.
    http_keepalive_seconds: int = Field(default=5, ge=1)
    #: A connection whose request head (request line and headers) has not fully arrived this many seconds after
    #: it opened (or after its last request) is closed: half-open connections cannot hold descriptors forever.
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Open connections at most (also bounded by the open-file limit less a reserve); past it, new connections
    #: are closed at once so the server's descriptors are never exhausted.
    http_max_connections: int = Field(default=4096, ge=16)
    #: A client that reads nothing of an answer for this many seconds while its write buffer is full is cut off:
    #: a never-read stream frees its synchronous slot and the memory of what it buffered.
    http_write_stall_seconds: float = Field(default=60.0, gt=0)
    #: Largest WebSocket frame a client may send (task sockets only send small JSON frames).
    ws_max_bytes: int = Field(default=64 * 1024, ge=1024)
    #: Offer permessage-deflate on task sockets. Off: their frames are small JSON that compression barely
    #: shrinks, while each compressed socket holds its own zlib streams (memory a socket flood multiplies).
    ws_compression: bool = False
    #: Addresses whose X-Forwarded-For is trusted as the client address (the reverse proxy's).
    forwarded_allow_ips: str = "127.0.0.1"
    #: Task sockets open at once from one client address; past it, a new socket is closed with 1008.
    socket_max_per_address: int = Field(default=16, ge=1)
    #: Tasks one socket may follow at once.
    socket_max_tasks: int = Field(default=4, ge=1)
    #: Frames a socket may send that register nothing (not JSON, unknown token, over its task limit) before
    #: it is closed with 1008.
    socket_max_bad_frames: int = Field(default=8, ge=1)
    #: Task sockets open at once on this process, from all addresses (each is a descriptor, well below the
    #: open-file limit ``serve`` raises); past it, a new socket is closed with 1008.
    socket_max_total: int = Field(default=1024, ge=1)
    #: Follows (one socket following one task) of one project's tasks at once, over all sockets; a
    #: registration past it closes its socket with 1008. Bounds what one tenant's tokens make the fan-out do.
    socket_max_per_project: int = Field(default=256, ge=1)
    #: Frames waiting to be sent to one socket; a socket that falls this far behind (it does not read) is
    #: closed with 1008 instead of holding the fan-out or the frames in memory.
    socket_send_frames: int = Field(default=512, ge=16)
    #: ``/readyz`` fails when a background loop (claims, heartbeats, reaper, callbacks, dispatcher, memory) has died,
    #: or has not completed an iteration for this long (or three of its periods, if longer).
    loop_stale_seconds: float = Field(default=60.0, gt=0)
    #: Every so often the API gives the free memory inside its heap back to the system (``malloc.py``); 0 = never.
    release_memory_seconds: float = Field(default=30.0, ge=0)
    #: Once ``serve`` has started, its heap is frozen out of the garbage collector's scans and young collections
    #: come less often (``gcpause.py``); false: CPython's defaults.
    gc_pause: bool = True

    #: How long ``/v1/images/*`` (OpenAI's synchronous shape) waits for its task before answering an error
    #: that names the task, which keeps running and can be followed with Task/Detail.
    sync_wait_seconds: float = 600.0
    #: Synchronous ``/v1/images/*`` requests one project may have waiting at once; past it, HTTP 429.
    sync_max_per_project: int = Field(default=8, ge=1)
    #: Cancel the task of a synchronous ``/v1/images/*`` call whose client went away: nobody can get its images.
    sync_cancel_on_disconnect: bool = True
    #: Model ids of Ark's ``/api/v3/images/generations`` and the served model each stands for (served slugs are
    #: taken as they are). Add an endpoint id (``ep-...``) here to keep existing Ark code unchanged.
    ark_models: dict[str, str] = Field(
        default_factory=lambda: {
            "seedream-4-0-250828": DEFAULT_MODEL,
            "doubao-seedream-4-0-250828": DEFAULT_MODEL,
        }
    )
    #: Model names of Replicate's ``/v1/models/{owner}/{name}`` routes and the served model each stands for (served
    #: slugs are taken as they are): code calling ``replicate.run("bytedance/seedream-4", ...)`` runs unchanged.
    replicate_models: dict[str, str] = Field(default_factory=lambda: {"bytedance/seedream-4": DEFAULT_MODEL})
    #: Serve the web playground at ``/``.
    playground: bool = True
    #: Level of the ``dreamserve`` loggers (the model process's records included), set up by ``serve``/``worker``.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    #: Reported as ``cps``; ``totalcost`` = cps x elapsed seconds for successful tasks.
    cost_per_second: float = 0.0

    @field_validator("models")
    @classmethod
    def _lower_slugs(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        # Wiro model slugs are case-insensitive in practice (/Run/ByteDance/seedream-v4 works).
        return {slug.lower(): spec for slug, spec in value.items()}

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'dreamserve.db'}"

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> Settings:
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile is set without ssl_certfile: set both to serve HTTPS")
        return self

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_certfile is not None else "http"
        return (self.public_url or f"{scheme}://{self.host}:{self.port}").rstrip("/")

    @property
    def key_path(self) -> Path:
        return self.server_key_file or self.data_dir / "server.key"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "files"
