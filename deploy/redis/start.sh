#!/bin/sh
# Starts redis-server with the ACL users of users.acl (next to this script), each with the
# password in REDIS_<USER>_PASSWORD (e.g. REDIS_GATEWAY_PASSWORD): only its SHA-256 goes
# into the generated ACL file, never the password itself. A user without a password
# refuses the start. Arguments are passed on to redis-server.
set -eu
rules="$(dirname "$0")/users.acl"
acl="${REDIS_ACL_FILE:-/tmp/mantle-users.acl}"
: >"$acl"
while read -r kind user rest; do
  [ "$kind" = user ] || continue
  case " $rest " in
    *" nopass "* | *" off "*) echo "user $user $rest" >>"$acl"; continue ;;
  esac
  var="REDIS_$(echo "$user" | tr '[:lower:]-' '[:upper:]_')_PASSWORD"
  password="$(printenv "$var" || true)"
  if [ -z "$password" ]; then
    echo "$var is not set: the Redis user '$user' needs a password" >&2
    exit 1
  fi
  hash="$(printf '%s' "$password" | sha256sum | cut -d' ' -f1)"
  echo "user $user $rest #$hash" >>"$acl"
done <"$rules"
# The image's entrypoint drops to the redis user; the file holds hashes only.
chmod 644 "$acl"
exec docker-entrypoint.sh redis-server --aclfile "$acl" "$@"
