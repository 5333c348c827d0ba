"""`celery -A config.celery` gets Celery's Django fix-up (django.setup() in the worker,
connections closed around tasks) even where nothing set DJANGO_SETTINGS_MODULE first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_control_worker_app_gets_the_django_fixup_without_a_settings_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'platform'}"
    probe = (
        "import config.celery as c; "
        "print(sorted(type(f).__name__ for f in c.app._fixups if f is not None))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['DjangoFixup']"
