# Shared set-up steps for bin/run and bin/test (sourced, not run).
# Everything heavy is cached under $MANTLE_HOME, keyed by content, so a fresh
# clone on a machine that has run Mantle before starts in seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MANTLE_HOME="${MANTLE_HOME:-$HOME/.cache/mantle}"
export MANTLE_ARTIFACT_DIR="${MANTLE_ARTIFACT_DIR:-$MANTLE_HOME/artifacts}"
export PYTHONPATH="$ROOT:$ROOT/platform${PYTHONPATH:+:$PYTHONPATH}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '\033[1;34m[mantle]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[mantle] error:\033[0m %s\n' "$*" >&2; exit 1; }

find_python() {
  for py in "${MANTLE_PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  die "Python 3.11 or newer is needed (set MANTLE_PYTHON to its path)"
}

# ensure_venv: the platform's virtual environment, shared by every clone that
# pins the same lock file; .venv in the checkout points at it.
ensure_venv() {
  local py lock_hash venv
  py="$(find_python)"
  lock_hash="$(sha256sum <"$ROOT/requirements/lock.txt" | cut -c1-16)"
  venv="$MANTLE_HOME/venvs/platform-$lock_hash"
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    log "creating the virtual environment ($venv)"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$venv/bin/pip" install -q -r "$ROOT/requirements/lock.txt" 2>&1 \
      | grep -v "^WARNING: Location" >&2 || true
    "$venv/bin/python" -c "import django, celery, onnxruntime, tokenizers" \
      || die "installing requirements/lock.txt into $venv failed (see above)"
    touch "$venv/.complete"
  fi
  if [ "$(readlink "$ROOT/.venv" 2>/dev/null)" != "$venv" ]; then
    rm -rf "$ROOT/.venv"
    ln -s "$venv" "$ROOT/.venv"
  fi
  export PATH="$ROOT/.venv/bin:$PATH"
}

redis_ping() {  # redis_ping URL
  "$ROOT/.venv/bin/python" - "$1" <<'PY' >/dev/null 2>&1
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()
PY
}
