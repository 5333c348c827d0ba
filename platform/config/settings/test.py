"""Test settings: real PostgreSQL and Redis, on databases the suite may wipe."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("MANTLE_ENVIRONMENT", "test")
os.environ.setdefault("DJANGO_SECRET_KEY", "test-secret-key-not-for-production")
os.environ.setdefault("MANTLE_API_KEY_PEPPER", "test-pepper")
os.environ.setdefault("MANTLE_IDENTITY_KEY", "test-identity-key")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/14")
# The Files API's store: a directory of this test run, which the servers a test starts
# inherit through the environment (tests/support/stack.py passes os.environ on).
if not os.environ.get("MANTLE_FILE_STORE"):
    os.environ["MANTLE_FILE_STORE"] = tempfile.mkdtemp(prefix="mantle-test-files-")

from config.settings.base import *  # noqa: F403
from config.settings.base import VAR_DIR

# Control-plane tasks run inline in tests; the inference path never does: it is
# tested through a real worker process and a real broker.
CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_EAGER_PROPAGATES = True
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
# A server process the tests start (tests/support/browser.py) writes its mail to files the test
# reads, as a person would open the link in their mailbox.
if os.environ.get("MANTLE_TEST_EMAIL_DIR"):
    EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    EMAIL_FILE_PATH = Path(os.environ["MANTLE_TEST_EMAIL_DIR"])
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
MANTLE_VAR_DIR = VAR_DIR / "test"
