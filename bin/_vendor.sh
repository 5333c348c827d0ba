# Front-end libraries for the console and the back office, installed through npm
# (the registry; never a CDN at run time) and copied into static files at set-up.
# Sourced after _lib.sh. The copies are generated (gitignored), cached by version.

VENDOR_PACKAGES=("htmx.org@2.0.11:dist/htmx.min.js:htmx.min.js"
                 "chart.js@4.6.1:dist/chart.umd.min.js:chart.umd.min.js")

# ensure_static_vendor: platform/console/static/vendor/{htmx.min.js,chart.umd.min.js}
ensure_static_vendor() {
  local dest="$ROOT/platform/console/static/vendor" cache="$MANTLE_HOME/npm" entry spec file name tgz
  mkdir -p "$dest" "$cache"
  for entry in "${VENDOR_PACKAGES[@]}"; do
    IFS=: read -r spec file name <<<"$entry"
    [ -s "$dest/$name" ] && [ -f "$dest/.$name.$spec" ] && continue
    tgz="$cache/$(tr '@/' '--' <<<"${spec#@}").tgz"
    if [ ! -s "$tgz" ]; then
      command -v npm >/dev/null 2>&1 || die "npm is needed once to fetch $spec for the console \
(Debian: 'apt-get install npm')"
      log "fetching $spec from the npm registry (once)"
      local tmp; tmp="$(mktemp -d)"
      (cd "$tmp" && npm pack --silent "$spec" >/dev/null) || die "npm pack $spec failed"
      mv "$tmp"/*.tgz "$tgz"; rm -rf "$tmp"
    fi
    tar -xzf "$tgz" -O "package/$file" >"$dest/$name.tmp" || die "$tgz has no $file"
    mv "$dest/$name.tmp" "$dest/$name"
    rm -f "$dest/.$name".*; touch "$dest/.$name.$spec"
  done
}

# ensure_chromium: Debian's Chromium for the browser tests (never a browser download).
ensure_chromium() {
  [ -x /usr/bin/chromium ] && return 0
  [ "$(id -u)" = 0 ] || die "the browser tests need Debian's Chromium: run \
'sudo apt-get update && sudo apt-get install -y chromium'"
  log "installing Debian's chromium for the browser tests (once)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
    || die "apt-get install chromium failed; install it by hand and run again"
}
