"""Every setting headstart reads, in one place.

Only the edges (the app factory, the worker start, the CLI) call `Settings.from_env`; everything
else receives the frozen `Settings` object. `SETTINGS` below is the single table of environment
variables, their defaults and their meaning: docs/settings.md's table is checked against it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Mapping

from backend.common.errors import ConfigurationError


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _host_list(raw: str) -> tuple[str, ...]:
    return tuple(host.strip().lower() for host in raw.split(",") if host.strip())


MIN_ADMIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Setting:
    env: str
    field: str
    default: str
    parse: Callable[[str], object]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("REDIS_URL", "redis_url", "", str,
            "Redis for embeddings, heads, labels and queues. Empty: use 127.0.0.1:6379 if a Redis "
            "answers there, else start an embedded redis-server (`headstart serve` only)."),
    Setting("LABEL_STUDIO_URL", "label_studio_url", "", str,
            "Label Studio base URL with scheme, e.g. http://localhost:8080. Needed for media "
            "uploaded to Label Studio, label sync and pushing predictions."),
    Setting("LABEL_STUDIO_API_KEY", "label_studio_api_key", "", str,
            "Personal access token (recommended) or legacy token of a Label Studio user."),
    Setting("BASIC_AUTH_USER", "basic_auth_user", "", str,
            "With BASIC_AUTH_PASS: require HTTP basic auth on every route except /health."),
    Setting("BASIC_AUTH_PASS", "basic_auth_pass", "", str, "Password for BASIC_AUTH_USER."),
    Setting("BACKBONE", "backbone", "mobilenet_v2", str,
            "Frozen feature extractor for new heads (see `headstart backbones`)."),
    Setting("BACKBONE_WEIGHTS_FILE", "backbone_weights_file", "", str,
            "Load the backbone's state dict from this local file instead of torchvision's "
            "download (torch hub cache)."),
    Setting("TEXT_ENCODER", "text_encoder", "sentence-transformers/all-MiniLM-L6-v2", str,
            "Frozen sentence encoder for new heads on <Text>/<HyperText> (see `headstart backbones`), or a local "
            "sentence-transformers model directory (/path/to/model) for offline use."),
    Setting("TORCH_THREADS", "torch_threads", "1", int,
            "Torch CPU threads per process. 1 holds up best when gunicorn workers and an RQ "
            "worker share a host."),
    Setting("WORKERS", "workers", "2", int, "gunicorn worker processes for `headstart serve`."),
    Setting("THREADS", "threads", "4", int, "Threads per gunicorn worker."),
    Setting("UP_WORKERS", "up_workers", "2", int,
            "RQ workers `headstart up` starts beside the backend. Each takes trainings first, then embedding and "
            "re-prediction chunks, so with two a training never waits for the first embedding pass to finish."),
    Setting("PORT", "port", "9090", int, "Port for `headstart serve`."),
    Setting("MODEL_DIR", "model_dir", "", str,
            "Scratch directory for downloaded media. Empty: a temporary directory. Heads are "
            "kept in Redis, not here, so workers on other hosts need no shared disk."),
    Setting("LOCAL_FILES_DOCUMENT_ROOT", "local_files_document_root", "", str,
            "Read Label Studio local-files media straight from this directory (the same root "
            "Label Studio uses) instead of downloading it."),
    Setting("MEDIA_MAX_BYTES", "media_max_bytes", "33554432", int,
            "Largest media file accepted, in bytes."),
    Setting("MEDIA_MAX_PIXELS", "media_max_pixels", "40000000", int,
            "Largest decoded image accepted, in pixels (width x height)."),
    Setting("MEDIA_TIMEOUT_S", "media_timeout_s", "10", float,
            "Seconds allowed to fetch one media file."),
    Setting("MEDIA_ALLOWED_HOSTS", "media_allowed_hosts", "", _host_list,
            "Comma-separated extra hosts media may be fetched from, besides LABEL_STUDIO_URL's, even on "
            "private addresses (e.g. minio:9000 for a private S3). `host` allows any port, `host:port` one."),
    Setting("MEDIA_PUBLIC_HOSTS", "media_public_hosts", "true", _bool,
            "Also fetch media from other hosts when every address they resolve to is public (never "
            "loopback, private, link-local or cloud metadata). false: only LABEL_STUDIO_URL's host and "
            "MEDIA_ALLOWED_HOSTS."),
    Setting("MEDIA_DECODE_BUDGET_BYTES", "media_decode_budget_bytes", "268435456", int,
            "Most bytes of decoded pixels one process holds at once, over all its threads (a decode waits "
            "its turn); an image that alone needs more is refused. Images shrink while they decode, so "
            "this bounds a process's peak memory."),
    Setting("MEDIA_POISON_KILLS", "media_poison_kills", "2", int,
            "A task input that was being fetched or embedded when its worker died (killed, out of memory) "
            "this many times is skipped from then on, as a media error, and listed in `headstart status` "
            "and /admin."),
    Setting("PREDICT_MAX_FETCH", "predict_max_fetch", "200", int,
            "Most inputs one /predict fetches and embeds; its other tasks are answered from cached "
            "features, or empty (the workers embed them and, with REPREDICT_UNLABELED, write their "
            "predictions). Retrieve Predictions sends every selected task in one /predict and waits 100 "
            "s."),
    Setting("PREDICT_DEADLINE_S", "predict_deadline_s", "60", float,
            "Seconds one /predict may spend fetching and embedding; tasks not done by then are answered "
            "empty, with the reason logged. Keep it below Label Studio's ML_TIMEOUT_PREDICT (100 s)."),
    Setting("MULTI_LABEL_THRESHOLD", "multi_label_threshold", "0.5", float,
            "Probability above which a class is predicted for choice=\"multiple\" controls."),
    Setting("MIN_LABELS_PER_CLASS", "min_labels_per_class", "1", int,
            "Labeled tasks each class needs before a head is trained."),
    Setting("TRAIN_MIN_INTERVAL_S", "train_min_interval_s", "1", float,
            "Least seconds between the starts of two trainings of one project while submits come in a burst "
            "(more than 3 within one interval); a burst coalesces into about one training per "
            "interval. At an annotator's pace the next training starts at once."),
    Setting("LABEL_CHECK_S", "label_check_s", "30", float,
            "A training also looks for label changes no webhook announced (one Label Studio request) when "
            "the last look is this many seconds old, and a queue refresh re-reads the project's model version "
            "and ML backends (two requests; it points the project back at headstart's backend when deleting a "
            "prediction set in Label Studio cleared it). 0: only after START_TRAINING, and the queue's first look."),
    Setting("REPREDICT_UNLABELED", "repredict_unlabeled", "true", _bool,
            "After a promotion, predict every unlabeled task and write the predictions into "
            "Label Studio."),
    Setting("REPREDICT_MIN_INTERVAL_S", "repredict_min_interval_s", "10", float,
            "Least seconds between the starts of two passes that write the served version's predictions of every "
            "unlabeled task into Label Studio (each is an import of thousands of predictions that holds its "
            "database for seconds). Promotions in between are written by the next pass, with the version served "
            "then. 0: a pass after every promotion."),
    Setting("ZERO_SHOT", "zero_shot", "true", _bool,
            "Before a control's first head, pre-label with the image backbone's own ImageNet classifier when every "
            "choice names an ImageNet class (or lists them in predicted_values), as model version <control>-v0."),
    Setting("ACTIVE_LEARNING", "active_learning", "true", _bool,
            "Order Label Studio's labeling queue by what teaches the head most: set a project's sampling to "
            "Uncertainty sampling (when it is still the default) and keep headstart's next picks current for it. "
            "false: leave the project's sampling and order alone."),
    Setting("ACTIVE_FRONT", "active_front", "8", int,
            "Most unlabeled tasks headstart keeps at the front of Label Studio's queue at a time (the next picks "
            "Label Studio will serve in headstart's order; refreshed after every training). At least the number "
            "of annotators labeling at once."),
    Setting("AUTO_ACCEPT_PRECISION", "auto_accept_precision", "0.98", float,
            "Target precision of auto-accept: per class, the confidence above which the model's labels reach it "
            "out of fold (shown by `headstart status` and /admin; `headstart export --min-precision` overrides it)."),
    Setting("SUSPECT_MARKERS", "suspect_markers", "true", _bool,
            "After each training, mark the tasks whose label is probably wrong in Label Studio with a prediction "
            "of model version `headstart-suspect` (its suggested label), filterable in the Data Manager."),
    Setting("VERSION_DETAIL_KEEP", "version_detail_keep", "3", int,
            "Newest head versions per control that keep their per-label detail (labels trained on, out-of-fold "
            "results, media errors) besides the served one and its rollback target; older ones keep their summary."),
    Setting("REJECTED_VERSIONS_KEEP", "rejected_versions_keep", "20", int,
            "Newest rejected (or superseded) versions kept per control; older ones are deleted, tensors and "
            "metadata (at least 1). The served version and its rollback target are never deleted."),
    Setting("JOB_TIMEOUT_S", "job_timeout_s", "1800", int, "RQ timeout for one job, in seconds."),
    Setting("JOB_RETRIES", "job_retries", "3", int, "RQ retries for a failing job (with backoff)."),
    Setting("WORKER_HEARTBEAT_S", "worker_heartbeat_s", "10", int,
            "Seconds between a worker's heartbeats while it runs a job. A job whose worker died (killed, "
            "out of memory, host lost) is detected after 3 missed beats and re-run at once (it uses one "
            "of its JOB_RETRIES)."),
    Setting("MAX_REQUEST_BYTES", "max_request_bytes", "33554432", int,
            "Largest request body accepted (413 above). Label Studio sends every selected task in one "
            "/predict, about 1-3 KB per task."),
    Setting("DEVICE", "device", "auto", str,
            "Torch device for embedding and training on workers: auto (CUDA when present), cpu, cuda."),
    Setting("ADMIN_TOKEN", "admin_token", "", str,
            "Token for admin routes. Empty: admin routes are refused."),
    Setting("LOG_LEVEL", "log_level", "INFO", str, "Python logging level."),
)


@dataclass(frozen=True)
class Settings:
    redis_url: str = ""
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    backbone: str = "mobilenet_v2"
    backbone_weights_file: str = ""
    text_encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    torch_threads: int = 1
    workers: int = 2
    threads: int = 4
    up_workers: int = 2
    port: int = 9090
    model_dir: str = ""
    local_files_document_root: str = ""
    media_max_bytes: int = 32 * 1024 * 1024
    media_max_pixels: int = 40_000_000
    media_timeout_s: float = 10.0
    media_allowed_hosts: tuple[str, ...] = ()
    media_public_hosts: bool = True
    media_decode_budget_bytes: int = 256 * 1024 * 1024
    media_poison_kills: int = 2
    predict_max_fetch: int = 200
    predict_deadline_s: float = 60.0
    multi_label_threshold: float = 0.5
    min_labels_per_class: int = 1
    train_min_interval_s: float = 1.0
    label_check_s: float = 30.0
    repredict_unlabeled: bool = True
    repredict_min_interval_s: float = 10.0
    zero_shot: bool = True
    active_learning: bool = True
    active_front: int = 8
    auto_accept_precision: float = 0.98
    suspect_markers: bool = True
    version_detail_keep: int = 3
    rejected_versions_keep: int = 20
    job_timeout_s: int = 1800
    job_retries: int = 3
    worker_heartbeat_s: int = 10
    max_request_bytes: int = 32 * 1024 * 1024
    device: str = "auto"
    admin_token: str = ""
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read every setting from `environ` (default: the process environment)."""
        environ = os.environ if environ is None else environ
        values = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env, setting.default)
            try:
                values[setting.field] = setting.parse(raw)
            except ValueError as exc:
                raise ConfigurationError(
                    f"{setting.env}={raw!r} is not valid ({exc}). {setting.help}"
                ) from None
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse combinations that would silently weaken access control."""
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            missing = "BASIC_AUTH_PASS" if self.basic_auth_user else "BASIC_AUTH_USER"
            raise ConfigurationError(f"{missing} is empty while the other half of basic auth is set: set both "
                                     "BASIC_AUTH_USER and BASIC_AUTH_PASS (or neither, for no basic auth).")
        if self.version_detail_keep < 0 or self.rejected_versions_keep < 1:
            raise ConfigurationError("VERSION_DETAIL_KEEP counts versions (0 or more) and REJECTED_VERSIONS_KEEP too "
                                     "(1 or more: a training reads back the version it just saved).")
        if self.admin_token and len(self.admin_token) < MIN_ADMIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"ADMIN_TOKEN is {len(self.admin_token)} characters; use at least {MIN_ADMIN_TOKEN_LENGTH}, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'.")

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)
