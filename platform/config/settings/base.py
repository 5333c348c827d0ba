"""Settings for every environment; production differs only by environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

from core import secret_checks
from core.env import env, secret
from core.logs import install_redacting_record_factory

ROOT_DIR = Path(__file__).resolve().parents[3]
VAR_DIR = Path(env.str("MANTLE_VAR_DIR", default=str(ROOT_DIR / "var")))

DEBUG = env.bool("DJANGO_DEBUG", default=False)
# production | development (bin/run) | test. Production refuses to start on a missing,
# placeholder or shared secret (core/secret_checks.py); development and test may fall
# back to a fixed one.
MANTLE_ENVIRONMENT = env.str("MANTLE_ENVIRONMENT", default="production")
# What this process is (gateway, control, drain, beat, migrate; `all` for one process doing
# everything): each role is given, and requires, only the secrets it uses.
MANTLE_ROLE = env.str("MANTLE_ROLE", default="all")
_LENIENT = MANTLE_ENVIRONMENT in secret_checks.LENIENT_ENVIRONMENTS
SECRET_KEY = secret("DJANGO_SECRET_KEY") or (
    # Only a development fallback: bin/run writes a random key to var/ instead.
    "insecure-dev-key-change-me" if DEBUG and _LENIENT else ""
)
# The pepper keys the HMAC under which API key secrets are stored. Losing it
# invalidates every key; leaking it alone reveals none.
API_KEY_PEPPER = secret("MANTLE_API_KEY_PEPPER") or (SECRET_KEY if _LENIENT else "")
# Seals the key identities and endpoint specs cached in Redis (core/integrity.py), so
# that whoever can write Redis without holding it cannot grant access. Rotatable.
MANTLE_IDENTITY_KEY = secret("MANTLE_IDENTITY_KEY") or (
    f"dev-identity:{SECRET_KEY}" if _LENIENT and SECRET_KEY else ""
)
secret_checks.check(
    environment=MANTLE_ENVIRONMENT,
    role=MANTLE_ROLE,
    values={
        secret_checks.DJANGO_SECRET_KEY: SECRET_KEY,
        secret_checks.API_KEY_PEPPER: API_KEY_PEPPER,
        secret_checks.IDENTITY_KEY: MANTLE_IDENTITY_KEY,
    },
)

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
PUBLIC_BASE_URL = env.str("MANTLE_PUBLIC_BASE_URL", default="http://127.0.0.1:8000")

INSTALLED_APPS = [
    # The back office: Unfold's theme (before the admin, whose templates it overrides)
    # and Django's admin on Mantle's own site class (docs/backoffice.md).
    "unfold.apps.BasicAppConfig",
    "billing.backoffice.apps.BackOfficeAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ninja",
    # Staff's second factor in the back office: TOTP devices, recovery codes (docs/backoffice.md).
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "accounts",
    "catalog",
    "gateway",
    "console",
    "billing",
]

# The /v1 gateway is on the hot path: the middleware that only the console and
# admin need is skipped for it (see core.middleware.for_console), because
# Django runs each sync middleware hook of an async request in a thread hop.
MIDDLEWARE = [
    "core.middleware.RequestIdMiddleware",
    "core.middleware.MetricsMiddleware",
    "core.middleware.SecurityHeadersMiddleware",
    "core.middleware.ConsoleSecurityMiddleware",
    "core.middleware.ConsoleWhiteNoiseMiddleware",
    "core.middleware.ConsoleSessionMiddleware",
    "core.middleware.ConsoleCommonMiddleware",
    "core.middleware.ConsoleCsrfViewMiddleware",
    "core.middleware.ConsoleAuthenticationMiddleware",
    "core.middleware.ConsoleOTPMiddleware",
    "core.middleware.ConsoleMessageMiddleware",
    "core.middleware.ConsoleXFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database --------------------------------------------------------------------
# PostgreSQL in any real deployment; with DATABASE_URL unset, an embedded SQLite
# file in WAL mode lets the platform run with no database server at all.
if env.str("DATABASE_URL", default=""):
    DATABASES = {"default": env.db("DATABASE_URL")}
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    if "postgresql" in DATABASES["default"]["ENGINE"]:
        # An unreachable database must fail a request in seconds, not hang it.
        DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
            "connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT", default=5)
        )
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "mantle.sqlite3",
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, cache, Celery ------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "mantle:cache",
    }
}

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_TIME_LIMIT = 600
CELERY_TASK_SOFT_TIME_LIMIT = 540
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    "flush-api-key-last-used": {
        "task": "mantle.control.flush_api_key_last_used",
        "schedule": 30.0,
        "options": {"queue": "control"},
    },
}

# --- Auth ---------------------------------------------------------------------------
AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/console/login/"
LOGIN_REDIRECT_URL = "/console/"
LOGOUT_REDIRECT_URL = "/console/login/"
# Every password log-in (console and back office) goes through the throttled backend.
AUTHENTICATION_BACKENDS = ["accounts.backends.ThrottledModelBackend"]
# Log-in throttling (accounts/throttle.py): failed attempts within the window per
# (email, client address) pair and per client address, after which that pair or that
# address is refused until the window ends. Never per email alone: that would let anyone
# lock a person out. Past the account warning, failures from many addresses are logged.
MANTLE_LOGIN_MAX_FAILURES_PER_PAIR = env.int("MANTLE_LOGIN_MAX_FAILURES_PER_PAIR", default=5)
MANTLE_LOGIN_MAX_FAILURES_PER_ADDRESS = env.int("MANTLE_LOGIN_MAX_FAILURES_PER_ADDRESS", default=20)
MANTLE_LOGIN_FAILURE_WINDOW_S = env.int("MANTLE_LOGIN_FAILURE_WINDOW_S", default=900)
MANTLE_LOGIN_ACCOUNT_WARNING = env.int("MANTLE_LOGIN_ACCOUNT_WARNING", default=50)
# Sign-up (console/services.py): attempts per email and per client address in the window.
MANTLE_SIGNUP_MAX_PER_EMAIL = env.int("MANTLE_SIGNUP_MAX_PER_EMAIL", default=3)
MANTLE_SIGNUP_MAX_PER_ADDRESS = env.int("MANTLE_SIGNUP_MAX_PER_ADDRESS", default=10)
MANTLE_SIGNUP_WINDOW_S = env.int("MANTLE_SIGNUP_WINDOW_S", default=3600)
# How long the links mailed for a sign-up and an invitation work.
MANTLE_SIGNUP_LINK_TTL_S = env.int("MANTLE_SIGNUP_LINK_TTL_S", default=2 * 86400)
# Invitation mails (new invitations and resends) per recipient of one organization and per
# organization, in a day: an invitation is a mail a tenant makes the platform send.
MANTLE_INVITATION_MAX_PER_EMAIL = env.int("MANTLE_INVITATION_MAX_PER_EMAIL", default=5)
MANTLE_INVITATION_MAX_PER_ORG = env.int("MANTLE_INVITATION_MAX_PER_ORG", default=200)
MANTLE_INVITATION_WINDOW_S = env.int("MANTLE_INVITATION_WINDOW_S", default=86400)
# Invoice PDFs an organization may render within the window (console and management API;
# billing/invoice_pdf.py): each render is CPU-bound and serialized per process.
MANTLE_INVOICE_PDF_MAX_PER_ORG = env.int("MANTLE_INVOICE_PDF_MAX_PER_ORG", default=60)
MANTLE_INVOICE_PDF_WINDOW_S = env.int("MANTLE_INVOICE_PDF_WINDOW_S", default=600)
MANTLE_INVITATION_TTL_S = env.int("MANTLE_INVITATION_TTL_S", default=7 * 86400)
# The second factor (django-otp; accounts/two_factor.py): the name authenticator apps
# show (staff's says back office: one authenticator serves both), and device keys and
# recovery codes hidden from admin pages.
MANTLE_OTP_ISSUER = env.str("MANTLE_OTP_ISSUER", default="Mantle back office")
MANTLE_CONSOLE_OTP_ISSUER = env.str("MANTLE_CONSOLE_OTP_ISSUER", default="Mantle")


def OTP_TOTP_ISSUER(device: Any) -> str:  # django-otp's setting: a callable is allowed
    return str(MANTLE_OTP_ISSUER if device.user.is_staff else MANTLE_CONSOLE_OTP_ISSUER)


OTP_ADMIN_HIDE_SENSITIVE_DATA = True
MANTLE_RECOVERY_CODES = 10
# Lifetime of the short-lived inference key the console's playground mints (docs/console.md).
MANTLE_PLAYGROUND_KEY_TTL_S = env.int("MANTLE_PLAYGROUND_KEY_TTL_S", default=3600)

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
CSRF_COOKIE_SAMESITE = "Lax"
# Security headers and cookies (docs/reliability.md, "Security"). Behind a TLS-terminating
# proxy (MANTLE_BEHIND_TLS_PROXY=1) its X-Forwarded-Proto says a request came over HTTPS;
# without such a proxy in front, trusting that header would let any client claim HTTPS.
# On HTTPS requests every cookie is marked Secure (core.middleware.SecurityHeadersMiddleware)
# and HSTS is sent; over plain HTTP neither applies, so the defaults are safe for both.
MANTLE_BEHIND_TLS_PROXY = env.bool("MANTLE_BEHIND_TLS_PROXY", default=False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if MANTLE_BEHIND_TLS_PROXY else None
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=365 * 24 * 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
_CSP_COMMON = (
    "default-src 'self'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
# Console pages: scripts only from our origin or carrying the request's nonce.
MANTLE_CSP = env.str(
    "MANTLE_CSP",
    default=f"{_CSP_COMMON}; script-src 'self' 'nonce-{{nonce}}'; style-src 'self' 'unsafe-inline'",
)
# The admin's theme (Unfold) evaluates Alpine.js expressions, which needs 'unsafe-eval'.
MANTLE_CSP_ADMIN = env.str(
    "MANTLE_CSP_ADMIN",
    default=f"{_CSP_COMMON}; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'",
)

EMAIL_BACKEND = env.str(
    "DJANGO_EMAIL_BACKEND", default="django.core.mail.backends.filebased.EmailBackend"
)
EMAIL_FILE_PATH = VAR_DIR / "emails"
DEFAULT_FROM_EMAIL = env.str("MANTLE_FROM_EMAIL", default="Mantle <no-reply@mantle.local>")

# --- Requests --------------------------------------------------------------------------
# Every request body (except a compile upload whose credentials checked out first) is
# bounded by this while it streams in, before authentication (core/body_limit.py): past
# it the reply is 413 and nothing more is read. Kept under FILE_UPLOAD_MAX_MEMORY_SIZE
# (2.5 MiB) by default, so no such body is ever spooled to disk.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("MANTLE_MAX_BODY_BYTES", default=2 * 1024 * 1024)
# /readyz details and /metrics (core/ops.py): served with `Authorization: Bearer
# <MANTLE_OPS_TOKEN>` or to a peer address inside MANTLE_OPS_NETWORKS (comma-separated
# CIDRs); anyone else gets /readyz's status and the names of failing components only,
# and 404 for /metrics. Both empty by default: nothing is trusted by address alone.
MANTLE_OPS_TOKEN = secret("MANTLE_OPS_TOKEN") or ""  # or MANTLE_OPS_TOKEN_FILE
MANTLE_OPS_NETWORKS = [
    n.strip() for n in env.str("MANTLE_OPS_NETWORKS", default="").split(",") if n.strip()
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns about a missing root
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

# --- Mantle ---------------------------------------------------------------------------
MANTLE_ARTIFACT_DIR = Path(
    env.str("MANTLE_ARTIFACT_DIR", default=str(Path.home() / ".cache" / "mantle" / "artifacts"))
)
# Compile jobs (docs/compile.md). Uploads are staged in MANTLE_UPLOAD_DIR, which compile
# nodes must see at the same path (one machine, or a shared mount); a job deletes its own.
MANTLE_UPLOAD_DIR = Path(
    env.str("MANTLE_UPLOAD_DIR", default=str(MANTLE_ARTIFACT_DIR.parent / "uploads"))
)
MANTLE_MAX_UPLOAD_BYTES = env.int("MANTLE_MAX_UPLOAD_BYTES", default=2 * 1024**3)
# Where compile nodes put new artifacts: "" is MANTLE_ARTIFACT_DIR; an fsspec URL
# (s3://bucket/artifacts) shares them between nodes, each node's directory a cache.
MANTLE_ARTIFACT_STORE = env.str("MANTLE_ARTIFACT_STORE", default="")
# Checkpoint directories a compile job may name on the node (colon-separated); empty: none.
MANTLE_CHECKPOINT_ROOTS = [
    Path(p) for p in env.str("MANTLE_CHECKPOINT_ROOTS", default="").split(":") if p.strip()
]
# A queued or running job with no progress report for this long is failed as stale.
MANTLE_COMPILE_STALE_S = env.int("MANTLE_COMPILE_STALE_S", default=2 * 3600)
# Per-organization compile quotas: jobs queued or running at once (checkpoint jobs too),
# and bytes of uploads staged for such jobs (an upload is cut at what is left, 413).
MANTLE_COMPILE_MAX_ACTIVE_JOBS = env.int("MANTLE_COMPILE_MAX_ACTIVE_JOBS", default=4)
MANTLE_COMPILE_MAX_STAGED_BYTES = env.int(
    "MANTLE_COMPILE_MAX_STAGED_BYTES", default=2 * MANTLE_MAX_UPLOAD_BYTES
)
CELERY_BEAT_SCHEDULE["compile-fail-stale"] = {
    "task": "mantle.control.compile_fail_stale",
    "schedule": 300.0,
    "options": {"queue": "control"},
}
# Stored responses of the Responses API (POST /v1/responses with `store`, OpenAI's default)
# are kept this many days, then deleted by a control task (docs/api.md, "The Responses API").
MANTLE_RESPONSES_RETENTION_DAYS = env.int("MANTLE_RESPONSES_RETENTION_DAYS", default=30)
CELERY_BEAT_SCHEDULE["responses-delete-expired"] = {
    "task": "mantle.control.responses_delete_expired",
    "schedule": 3600.0,
    "options": {"queue": "control"},
}
# The Files API (/v1/files, docs/api.md "Files"). Bytes live in MANTLE_FILE_STORE: a local
# directory, or an fsspec URL (s3://bucket/files; its protocol package, such as s3fs, is the
# operator's to install) shared by every gateway and batch runner. Metadata is in the database.
MANTLE_FILE_STORE = env.str("MANTLE_FILE_STORE", default=str(MANTLE_ARTIFACT_DIR.parent / "files"))
# One upload's bytes (OpenAI's limit): the body limit of POST /v1/files for a valid key.
MANTLE_FILE_MAX_BYTES = env.int("MANTLE_FILE_MAX_BYTES", default=512 * 1024**2)
# Per organization, every purpose counted (the batch runner's output files too).
MANTLE_FILES_ORG_MAX_BYTES = env.int("MANTLE_FILES_ORG_MAX_BYTES", default=100 * 1024**3)
MANTLE_FILES_ORG_MAX_COUNT = env.int("MANTLE_FILES_ORG_MAX_COUNT", default=10_000)
# Uploads without `expires_after` are kept this many days; 0 keeps them until deleted.
MANTLE_FILES_DEFAULT_RETENTION_DAYS = env.int("MANTLE_FILES_DEFAULT_RETENTION_DAYS", default=0)
CELERY_BEAT_SCHEDULE["files-delete-expired"] = {
    "task": "mantle.control.files_delete_expired",
    "schedule": 3600.0,
    "options": {"queue": "control"},
}
# The Batch API (docs/api.md, "The Batch API"; docs/batches.md): requests per batch, the
# tokens an organization may have enqueued per model in batches not finished yet (OpenAI's
# batch queue limit, apart from online RPM/TPM), and the runners' leases.
MANTLE_BATCH_MAX_LINES = env.int("MANTLE_BATCH_MAX_LINES", default=100_000)
MANTLE_BATCH_QUEUE_TOKENS = env.int("MANTLE_BATCH_QUEUE_TOKENS", default=20_000_000)
MANTLE_BATCH_LEASE_S = env.float("MANTLE_BATCH_LEASE_S", default=30.0)
MANTLE_BATCH_POLL_S = env.float("MANTLE_BATCH_POLL_S", default=1.0)
MANTLE_BATCH_RUNNER_BATCHES = env.int("MANTLE_BATCH_RUNNER_BATCHES", default=4)
# Batches of one organization running at once, across runners (the rest wait their turn).
MANTLE_BATCH_ORG_RUNNING = env.int("MANTLE_BATCH_ORG_RUNNING", default=2)
# One batch line's answer as stored (its output file line); larger answers are that line's
# error (`output_too_large`): an embeddings line of 2,048 inputs answers ~16 MB of floats.
MANTLE_BATCH_LINE_OUTPUT_MAX_BYTES = env.int(
    "MANTLE_BATCH_LINE_OUTPUT_MAX_BYTES", default=4 * 1024**2
)
# One batch's answers in all (output and error files): lines past it are not run and are
# written as `batch_output_limit` errors. The files are written past the organization's file
# quota (paid for already), so this is what bounds them.
MANTLE_BATCH_OUTPUT_MAX_BYTES = env.int("MANTLE_BATCH_OUTPUT_MAX_BYTES", default=10 * 1024**3)
# A batch line whose worker dies under it (not billed) is tried once more, and its error is
# `worker_lost` if that one dies too; a batch with this many such lines is stopped, its unrun
# lines written as `batch_workers_lost`. Bounds what an input that kills workers costs (a
# node lost once costs a line one retry, not a place here).
MANTLE_BATCH_MAX_WORKERS_LOST = env.int("MANTLE_BATCH_MAX_WORKERS_LOST", default=5)
# Batches of one organization not yet ended (validating to finalizing); more is a 429.
MANTLE_BATCH_ORG_ACTIVE = env.int("MANTLE_BATCH_ORG_ACTIVE", default=100)
# A batch whose pool offers batches no capacity for MANTLE_BATCH_PARK_AFTER_S lets go of its
# runner for MANTLE_BATCH_PARK_S (other organizations' batches run meanwhile).
MANTLE_BATCH_PARK_AFTER_S = env.float("MANTLE_BATCH_PARK_AFTER_S", default=30.0)
MANTLE_BATCH_PARK_S = env.float("MANTLE_BATCH_PARK_S", default=60.0)
# Requests to /v1/files and /v1/batches per organization per minute (uploads, lists, reads,
# cancels: the management surface, apart from the inference RPM/TPM).
MANTLE_FILES_BATCHES_RPM = env.int("MANTLE_FILES_BATCHES_RPM", default=600)
# Threads for file bytes (uploads' parsing and storing, downloads): their own pool, so that
# large files never queue the gateway's database reads behind them.
MANTLE_FILE_IO_THREADS = env.int("MANTLE_FILE_IO_THREADS", default=4)
# Fair sharing across a pool's nodes (docs/service_tiers.md): one organization holds at most
# this share of a pool's task slots with online requests in flight (1: off); past it its
# requests wait at the gateway up to MANTLE_FAIR_POOL_WAIT_S for one of its own to end.
MANTLE_FAIR_POOL_ORG_SHARE = env.float("MANTLE_FAIR_POOL_ORG_SHARE", default=0.75)
MANTLE_FAIR_POOL_WAIT_S = env.float("MANTLE_FAIR_POOL_WAIT_S", default=10.0)
# A surge's backlog (docs/service_tiers.md, "Surges"): the default tier waits at the gateway
# while a pool has this many times its task slots (less the priority reserve) of online
# requests in flight (then a 503 after MANTLE_FAIR_POOL_WAIT_S), priority one factor more,
# flex only while slots are idle (else 429 resource_unavailable at once). 0: no bound.
MANTLE_POOL_BACKLOG_FACTOR = env.float("MANTLE_POOL_BACKLOG_FACTOR", default=1.0)
# The share of a pool's task slots the default and flex tiers leave free for priority and
# provisioned requests (rounded down: none on a pool of fewer than 10 slots).
MANTLE_POOL_PRIORITY_RESERVE = env.float("MANTLE_POOL_PRIORITY_RESERVE", default=0.1)
# Provisioned throughput (docs/provisioned.md): the tokens per minute one unit guarantees,
# per model ("*": any other), as bench/provisioned.py measures them on the pool a unit is
# sold on; copied into a commitment when it is sold. One unit is one request in flight
# reserved on the pool and served ahead of every pay-as-you-go tier. JSON, e.g.
# {"smollm2-135m-instruct": 320}. The built-in chat model's figure is its one-stream
# decode rate at a full batch on the 2-core reference machine (docs/benchmarks.md).
MANTLE_PROVISIONED_UNIT_TPM: dict[str, int] = env.json(
    "MANTLE_PROVISIONED_UNIT_TPM", default={"smollm2-135m-instruct": 320}
)
MANTLE_DEFAULT_POOL = env.str("MANTLE_DEFAULT_POOL", default="cpu")
MANTLE_DEFAULT_REGION = env.str("MANTLE_DEFAULT_REGION", default="local")
# The regions an organization may be created in (comma-separated); the default region is one.
MANTLE_REGIONS = list(
    dict.fromkeys(
        [MANTLE_DEFAULT_REGION]
        + [r.strip() for r in env.str("MANTLE_REGIONS", default="").split(",") if r.strip()]
    )
)
# Default limits of the public built-in endpoints, per endpoint (keys and projects
# have their own, see accounts).
MANTLE_PUBLIC_RPM = env.int("MANTLE_PUBLIC_RPM", default=100_000)
MANTLE_PUBLIC_TPM = env.int("MANTLE_PUBLIC_TPM", default=100_000_000)
# Per-key and per-project limits when none is set on the key or project.
MANTLE_DEFAULT_KEY_RPM = env.int("MANTLE_DEFAULT_KEY_RPM", default=10_000)
MANTLE_DEFAULT_KEY_TPM = env.int("MANTLE_DEFAULT_KEY_TPM", default=10_000_000)
MANTLE_DEFAULT_PROJECT_RPM = env.int("MANTLE_DEFAULT_PROJECT_RPM", default=50_000)
MANTLE_DEFAULT_PROJECT_TPM = env.int("MANTLE_DEFAULT_PROJECT_TPM", default=50_000_000)
# An organization's share of each shared (public) endpoint, all its keys and projects
# together; key and project limits above it are refused when set and clamped when served.
MANTLE_ORG_ENDPOINT_RPM = env.int("MANTLE_ORG_ENDPOINT_RPM", default=50_000)
MANTLE_ORG_ENDPOINT_TPM = env.int("MANTLE_ORG_ENDPOINT_TPM", default=50_000_000)
# max_tokens when a request names none: the rest of the context, capped here.
MANTLE_DEFAULT_MAX_TOKENS = env.int("MANTLE_DEFAULT_MAX_TOKENS", default=2048)
# Tenant chat templates and tokenizers run in the shared gateway (docs/security.md):
# a template renders in a child process under a time, output and loop budget, at most
# MANTLE_TEMPLATE_ORG_SHARE of the MANTLE_TEMPLATE_RENDERERS children per organization;
# tokenizer.json files are capped at load, and the loaded ones cached up to an estimate
# of MANTLE_TOKENIZER_CACHE_BYTES (least recently used first out).
MANTLE_TEMPLATE_BUDGET_S = env.float("MANTLE_TEMPLATE_BUDGET_S", default=1.0)
MANTLE_TEMPLATE_MAX_OUTPUT_CHARS = env.int(
    "MANTLE_TEMPLATE_MAX_OUTPUT_CHARS", default=2 * DATA_UPLOAD_MAX_MEMORY_SIZE
)
MANTLE_TEMPLATE_MAX_ITERATIONS = env.int("MANTLE_TEMPLATE_MAX_ITERATIONS", default=1_000_000)
MANTLE_TEMPLATE_RENDERERS = env.int("MANTLE_TEMPLATE_RENDERERS", default=4)
MANTLE_TEMPLATE_ORG_SHARE = env.int(
    "MANTLE_TEMPLATE_ORG_SHARE", default=max(1, MANTLE_TEMPLATE_RENDERERS // 2)
)
MANTLE_TEMPLATE_MEMORY_BYTES = env.int("MANTLE_TEMPLATE_MEMORY_BYTES", default=256 * 1024**2)
MANTLE_TOKENIZER_CACHE_BYTES = env.int("MANTLE_TOKENIZER_CACHE_BYTES", default=512 * 1024**2)
MANTLE_TOKENIZER_MAX_BYTES = env.int("MANTLE_TOKENIZER_MAX_BYTES", default=32 * 1024**2)
MANTLE_TOKENIZER_MAX_VOCAB = env.int("MANTLE_TOKENIZER_MAX_VOCAB", default=512 * 1024)
# Inference requests do their gateway work in turns, oldest first (core/turns.py); off:
# the event loop shares itself among all of them (the benchmarks' baseline).
MANTLE_GATEWAY_TURNS = env.bool("MANTLE_GATEWAY_TURNS", default=True)
# Seconds a gateway request may wait for its worker before it fails cleanly.
MANTLE_REQUEST_TIMEOUT_S = env.float("MANTLE_REQUEST_TIMEOUT_S", default=120.0)
# The places a request holds while it runs (a provider's slot, its organization's share of
# a pool, a provisioned unit) are leases of this long, at most to the request's deadline,
# that their gateway renews every third of a lease (gateway/leases.py): a gateway that dies
# holding places gives them back within this time, not at its requests' deadlines.
MANTLE_INFLIGHT_LEASE_S = env.float("MANTLE_INFLIGHT_LEASE_S", default=30.0)
if not MANTLE_INFLIGHT_LEASE_S > 0:
    raise ImproperlyConfigured(
        f"MANTLE_INFLIGHT_LEASE_S is {MANTLE_INFLIGHT_LEASE_S!r}: it must be more than 0 seconds"
    )
# Seconds without any event from a started request before its worker is presumed dead.
MANTLE_WORKER_SILENCE_S = env.float("MANTLE_WORKER_SILENCE_S", default=15.0)
# Seconds one write to a gateway client may wait for the client to take data before its
# connection is dropped (nginx's send_timeout, 60 s by default, is the same idea): a client
# that stops reading cannot hold a connection and its buffers forever. 0 disables it.
MANTLE_SEND_TIMEOUT_S = env.float("MANTLE_SEND_TIMEOUT_S", default=60.0)
# Incorrect API keys one client address may send per window before the gateway refuses
# its requests (429) until the window ends: guessing is slowed, valid keys elsewhere not.
MANTLE_KEY_FAILURE_LIMIT = env.int("MANTLE_KEY_FAILURE_LIMIT", default=20)
MANTLE_KEY_FAILURE_WINDOW_S = env.int("MANTLE_KEY_FAILURE_WINDOW_S", default=60)

# --- Stripe (docs/billing.md, "Stripe") ------------------------------------------------------
# Optional: with no key, Stripe is disabled and the platform invoices on its own.
STRIPE_API_KEY = secret("STRIPE_API_KEY") or ""
STRIPE_WEBHOOK_SECRET = secret("STRIPE_WEBHOOK_SECRET") or ""
# "stripe" (the real API, when a key is set) or "fake" (in-memory, for tests only).
MANTLE_STRIPE_BACKEND = env.str("MANTLE_STRIPE_BACKEND", default="stripe")
if MANTLE_STRIPE_BACKEND == "fake" and not _LENIENT:
    # The fake's hosted Checkout page (/billing/stripe/fake-checkout/<session>) completes
    # any top-up with a test card for whoever opens it: prepaid credit nobody paid for.
    raise ImproperlyConfigured(
        "MANTLE_STRIPE_BACKEND is 'fake' in the production environment: the fake Stripe "
        "is for development and test only (its Checkout page credits top-ups nobody paid)"
    )
# Retries by the SDK, with the same idempotency key (connection errors, 409, 5xx, and
# 429s that Stripe marks retryable); then the caller's task retries later.
STRIPE_MAX_NETWORK_RETRIES = env.int("STRIPE_MAX_NETWORK_RETRIES", default=2)
STRIPE_TIMEOUT_S = env.float("STRIPE_TIMEOUT_S", default=30.0)
STRIPE_WEBHOOK_TOLERANCE_S = env.int("STRIPE_WEBHOOK_TOLERANCE_S", default=300)
# "charge_automatically" (the saved payment method) or "send_invoice" (bank transfer).
STRIPE_COLLECTION_METHOD = env.str("STRIPE_COLLECTION_METHOD", default="charge_automatically")
STRIPE_DAYS_UNTIL_DUE = env.int("STRIPE_DAYS_UNTIL_DUE", default=30)
STRIPE_METER_EVENT_NAME = env.str("STRIPE_METER_EVENT_NAME", default="mantle_tokens")
# Dunning: this many failed payments within the window suspend an organization.
MANTLE_DUNNING_MAX_FAILURES = env.int("MANTLE_DUNNING_MAX_FAILURES", default=3)
MANTLE_DUNNING_WINDOW_DAYS = env.int("MANTLE_DUNNING_WINDOW_DAYS", default=30)
# What goes to Stripe: finalized monthly "invoices" (exact), or hourly "meter_events".
MANTLE_STRIPE_USAGE_PUSH = env.str("MANTLE_STRIPE_USAGE_PUSH", default="invoices")
# The fake only (tests): where its hosted Checkout pages live (a test server's
# /billing/stripe/fake-checkout/), and the webhook URL it POSTs its events to; empty:
# Stripe's address, and no delivery (tests deliver events themselves).
MANTLE_STRIPE_FAKE_CHECKOUT_URL = env.str("MANTLE_STRIPE_FAKE_CHECKOUT_URL", default="")
MANTLE_STRIPE_FAKE_WEBHOOK_URL = env.str("MANTLE_STRIPE_FAKE_WEBHOOK_URL", default="")
# Top-ups (docs/billing.md, "Top-ups and auto-recharge"), in the billing currency: the
# smallest and largest one payment may buy, the console top-ups an organization may have
# waiting for payment at once, and the largest daily cap an auto-recharge may set.
MANTLE_TOPUP_MIN = env.str("MANTLE_TOPUP_MIN", default="5.00")
MANTLE_TOPUP_MAX = env.str("MANTLE_TOPUP_MAX", default="10000.00")
MANTLE_TOPUP_PENDING_MAX = env.int("MANTLE_TOPUP_PENDING_MAX", default=5)
MANTLE_AUTO_RECHARGE_DAILY_CAP_MAX = env.str(
    "MANTLE_AUTO_RECHARGE_DAILY_CAP_MAX", default="50000.00"
)
CELERY_BEAT_SCHEDULE.update(
    {
        "stripe-push-pending-invoices": {
            "task": "mantle.billing.stripe_push_pending_invoices",
            "schedule": 600.0,
            "options": {"queue": "billing"},
        },
        "stripe-push-meter-hour": {
            "task": "mantle.billing.stripe_push_meter_hour",
            "schedule": 3600.0,
            "options": {"queue": "billing"},
        },
        "stripe-retry-events": {
            "task": "mantle.billing.stripe_retry_events",
            "schedule": 300.0,
            "options": {"queue": "billing"},
        },
        # Auto-recharge: balances against thresholds, off the request path.
        "auto-recharge-evaluate": {
            "task": "mantle.billing.auto_recharge_evaluate_all",
            "schedule": 60.0,
            "options": {"queue": "billing"},
        },
    }
)

# --- Prices, invoices, credits, budgets, wallet (docs/billing.md) ---------------------------
# The one currency the platform bills in (prices, credits, invoices, budgets).
MANTLE_BILLING_CURRENCY = env.str("MANTLE_BILLING_CURRENCY", default="USD")
# How an organization without a billing account pays: prepaid | postpaid | unlimited.
MANTLE_BILLING_DEFAULT_MODE = env.str("MANTLE_BILLING_DEFAULT_MODE", default="postpaid")
MANTLE_INVOICE_PREFIX = env.str("MANTLE_INVOICE_PREFIX", default="MAN")
# Hours after a month ends before its drafts are finalized: the drain catches up first.
MANTLE_INVOICE_FINALIZE_DELAY_HOURS = env.int("MANTLE_INVOICE_FINALIZE_DELAY_HOURS", default=6)
# The seller on every invoice (the operator), copied onto each invoice at finalization and
# checked at start-up (billing/tax.py): legal name, postal address (lines separated by
# "\n"), ISO 3166-1 alpha-2 country and tax id (VAT/GST number). docs/deployment.md.
MANTLE_SELLER_LEGAL_NAME = env.str("MANTLE_SELLER_LEGAL_NAME", default="Mantle")
MANTLE_SELLER_ADDRESS = env.str("MANTLE_SELLER_ADDRESS", default="")
MANTLE_SELLER_COUNTRY = env.str("MANTLE_SELLER_COUNTRY", default="")
MANTLE_SELLER_TAX_ID = env.str("MANTLE_SELLER_TAX_ID", default="")


def _unit_prices(raw: str) -> dict[str, str]:
    """`input=0.1,output=0.4,cached_input=0.05,request=1,compute_ms=0.02` (USD per million
    units)."""
    prices = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        unit, _, value = part.partition("=")
        units = ("input", "output", "cached_input", "request", "compute_ms")
        if unit.strip() not in units or not value.strip():
            raise ImproperlyConfigured(
                f"MANTLE_COMPILED_MODEL_PRICES: {part!r} is not <unit>=<price per million> "
                "with unit input, output, cached_input, request or compute_ms"
            )
        prices[unit.strip()] = value.strip()
    return prices


# The list price an organization's newly compiled model gets (docs/billing.md, "Unpriced
# models"): empty, a compiled model has no price and is refused (403 model_not_priced)
# until an operator prices it. Only the units of the model's kind are used: input and
# output (and cached_input, if given) for text models, request and compute_ms for tensor
# models.
MANTLE_COMPILED_MODEL_PRICES = _unit_prices(env.str("MANTLE_COMPILED_MODEL_PRICES", default=""))
CELERY_BEAT_SCHEDULE.update(
    {
        # On the minute 0 too: prices change on whole hours, and this rewrites them.
        "billing-wallet-sync": {
            "task": "mantle.billing.wallet_sync_all",
            "schedule": crontab(minute="*/5"),
            "options": {"queue": "billing"},
        },
        "billing-provisioned-sync": {
            "task": "mantle.billing.provisioned_sync",
            "schedule": 60.0,
            "options": {"queue": "billing"},
        },
        "billing-budgets-evaluate": {
            "task": "mantle.billing.budgets_evaluate_all",
            "schedule": 300.0,
            "options": {"queue": "billing"},
        },
        "billing-invoices-refresh": {
            "task": "mantle.billing.invoices_refresh",
            "schedule": crontab(minute=20),
            "options": {"queue": "billing"},
        },
        "billing-invoices-finalize": {
            "task": "mantle.billing.invoices_finalize_due",
            "schedule": crontab(minute=40),
            "options": {"queue": "billing"},
        },
        "billing-credits-expire": {
            "task": "mantle.billing.credits_expire",
            "schedule": crontab(minute=1),
            "options": {"queue": "billing"},
        },
    }
)

# --- Alerts and webhooks (docs/billing.md, "Alerts and webhooks") ---------------------------
# A prepaid organization whose balance falls under this (in the billing currency) is told,
# once per crossing, unless it set its own amount; empty: no low-balance alert by default.
MANTLE_ALERT_LOW_BALANCE_DEFAULT = env.str("MANTLE_ALERT_LOW_BALANCE_DEFAULT", default="10.00")
# Webhook URLs are the customers' (core/outbound.py's WEBHOOK policy): https to public
# addresses on port 443 or 1024-65535 only, whatever the providers' lists allow, except
# hosts listed here (`host`, `host:port` or a CIDR): not public / plain http.
MANTLE_WEBHOOK_ALLOWED_PRIVATE = env.list("MANTLE_WEBHOOK_ALLOWED_PRIVATE", default=[])
MANTLE_WEBHOOK_ALLOWED_HTTP = env.list("MANTLE_WEBHOOK_ALLOWED_HTTP", default=[])
CELERY_BEAT_SCHEDULE.update(
    {
        "billing-webhook-deliveries-due": {
            "task": "mantle.billing.webhook_deliveries_due",
            "schedule": 60.0,
            "options": {"queue": "billing"},
        },
        "billing-low-balance-evaluate": {
            "task": "mantle.billing.low_balance_evaluate_all",
            "schedule": 300.0,
            "options": {"queue": "billing"},
        },
    }
)

# --- Metering (docs/billing.md, "Metering") ---------------------------------------------------
# Whole months of raw usage events kept before the current one; older monthly partitions
# are dropped (rollups, which invoices read, are kept).
MANTLE_USAGE_RETENTION_MONTHS = env.int("MANTLE_USAGE_RETENTION_MONTHS", default=13)
CELERY_BEAT_SCHEDULE.update(
    {
        "usage-partitions-ensure": {
            "task": "mantle.billing.usage_partitions_ensure",
            "schedule": 24 * 3600.0,
            "options": {"queue": "billing"},
        },
        "usage-partitions-drop-expired": {
            "task": "mantle.billing.usage_partitions_drop_expired",
            "schedule": 24 * 3600.0,
            "options": {"queue": "billing"},
        },
    }
)

# --- Back office (/admin/, docs/backoffice.md) -------------------------------------------------
MANTLE_CREDIT_NOTE_PREFIX = env.str("MANTLE_CREDIT_NOTE_PREFIX", default="CN")
UNFOLD = {
    "SITE_TITLE": "Mantle back office",
    "SITE_HEADER": "Mantle back office",
    "SITE_SYMBOL": "account_balance",
    "SITE_URL": "/admin/",
    "SHOW_VIEW_ON_SITE": False,
    "SIDEBAR": {
        "show_search": True,
        "show_all_applications": True,
        "navigation": "billing.backoffice.adminsite.sidebar_navigation",
    },
}
CELERY_BEAT_SCHEDULE["backoffice-drain-lag-sample"] = {
    "task": "mantle.billing.drain_lag_sample",
    "schedule": 60.0,
    "options": {"queue": "billing"},
}

install_redacting_record_factory()

# --- Logging ---------------------------------------------------------------------------
LOG_LEVEL = env.str("MANTLE_LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_id": {"()": "core.logs.RequestIdFilter"},
        "redact": {"()": "core.logs.RedactSecretsFilter"},
    },
    "formatters": {
        "plain": {
            "format": "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["request_id", "redact"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "uvicorn.access": {"level": "WARNING"},
    },
}

# --- Upstream providers (docs/providers.md) ------------------------------------------------
# Fernet keys that encrypt providers' credentials (core/secretbox.py); the first encrypts.
MANTLE_PROVIDER_SECRET_KEYS = secret("MANTLE_PROVIDER_SECRET_KEYS") or ""
# Whether organizations may add providers with their own keys for their own endpoints.
MANTLE_PROVIDER_BYOK = env.bool("MANTLE_PROVIDER_BYOK", default=False)
# Outbound destinations: https only, never loopback, private, link-local, multicast or
# reserved addresses (cloud metadata included), except hosts or networks listed here
# (`host`, `host:port` or a CIDR); plain http only to hosts listed in the second.
MANTLE_PROVIDER_ALLOWED_PRIVATE = env.list("MANTLE_PROVIDER_ALLOWED_PRIVATE", default=[])
MANTLE_PROVIDER_ALLOWED_HTTP = env.list("MANTLE_PROVIDER_ALLOWED_HTTP", default=[])
# Single sign-on (accounts/oidc.py): an organization's identity provider is a tenant's
# destination with lists of its own, empty by default (public https only, port 443 or
# 1024-65535); an operator whose tenants' provider is internal lists it here, and the tests
# list their provider on loopback. The provider lists above never apply to it.
MANTLE_SSO_ALLOWED_PRIVATE = env.list("MANTLE_SSO_ALLOWED_PRIVATE", default=[])
MANTLE_SSO_ALLOWED_HTTP = env.list("MANTLE_SSO_ALLOWED_HTTP", default=[])
# The name servers that verify single sign-on domains' TXT records (`address` or
# `address:port`); empty: the system's resolver.
MANTLE_SSO_DNS_NAMESERVERS = env.list("MANTLE_SSO_DNS_NAMESERVERS", default=[])
# The same two lists for organizations' own providers (BYOK), which the operator's never
# reach: empty, public https only (a deployment whose tenants are its own teams may list
# an internal host here; the tests list their fake provider on loopback).
MANTLE_PROVIDER_BYOK_ALLOWED_PRIVATE = env.list("MANTLE_PROVIDER_BYOK_ALLOWED_PRIVATE", default=[])
MANTLE_PROVIDER_BYOK_ALLOWED_HTTP = env.list("MANTLE_PROVIDER_BYOK_ALLOWED_HTTP", default=[])
# Retries of one target on a connection error, 429 or 5xx before the first byte; a
# retry-after longer than the cap moves on to the next target instead of waiting.
MANTLE_PROVIDER_RETRIES = env.int("MANTLE_PROVIDER_RETRIES", default=2)
MANTLE_PROVIDER_RETRY_AFTER_MAX_S = env.float("MANTLE_PROVIDER_RETRY_AFTER_MAX_S", default=2.0)
# The circuit breaker: this many failures in a row cool a target down for so long.
MANTLE_PROVIDER_FAILURES_TO_COOL = env.int("MANTLE_PROVIDER_FAILURES_TO_COOL", default=3)
MANTLE_PROVIDER_COOLDOWN_S = env.int("MANTLE_PROVIDER_COOLDOWN_S", default=30)
# One organization's most of an operator's provider's max_concurrency in flight (rounded
# down, at least 1; 1: no share). Organizations' own providers have none.
_provider_org_share = env.str("MANTLE_PROVIDER_ORG_SHARE", default="0.5")
try:
    MANTLE_PROVIDER_ORG_SHARE = float(_provider_org_share)
except ValueError:
    MANTLE_PROVIDER_ORG_SHARE = float("nan")
if not 0 < MANTLE_PROVIDER_ORG_SHARE <= 1:
    raise ImproperlyConfigured(
        f"MANTLE_PROVIDER_ORG_SHARE is {_provider_org_share!r}: it must be a number more than "
        "0 and at most 1 (1: no per-organization share)"
    )
# Bounds on what a provider may send back: a whole answer, one stream line, a stream.
MANTLE_PROVIDER_MAX_RESPONSE_BYTES = env.int(
    "MANTLE_PROVIDER_MAX_RESPONSE_BYTES", default=16 * 1024**2
)
MANTLE_PROVIDER_MAX_LINE_BYTES = env.int("MANTLE_PROVIDER_MAX_LINE_BYTES", default=1024**2)
MANTLE_PROVIDER_MAX_STREAM_BYTES = env.int("MANTLE_PROVIDER_MAX_STREAM_BYTES", default=64 * 1024**2)
