# Local service checks for bin/test and bin/run (sourced after _lib.sh).

tcp_open() {  # tcp_open HOST PORT
  (exec 3<>"/dev/tcp/$1/$2") >/dev/null 2>&1
}

url_host_port() {  # url_host_port URL DEFAULT_PORT -> "host port"
  "$ROOT/.venv/bin/python" - "$1" "$2" <<'PY'
import sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or int(sys.argv[2]))
PY
}

wait_tcp() {  # wait_tcp HOST PORT SECONDS
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    tcp_open "$1" "$2" && return 0
    sleep 0.1
  done
  return 1
}

ensure_postgres() {  # ensure_postgres URL
  local hp host port
  hp=$(url_host_port "$1" 5432); host=${hp% *}; port=${hp#* }
  tcp_open "$host" "$port" && return 0
  log "PostgreSQL is not answering at $host:$port; trying to start the local cluster"
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  wait_tcp "$host" "$port" 20 || die "PostgreSQL is not reachable at $host:$port. Start it \
(Debian: 'pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start'; \
install: 'apt-get install postgresql') or set DATABASE_URL."
}

ensure_redis() {  # ensure_redis URL [private-dir]: start a server if none answers
  local hp host port
  hp=$(url_host_port "$1" 6379); host=${hp% *}; port=${hp#* }
  tcp_open "$host" "$port" && return 0
  command -v redis-server >/dev/null 2>&1 || die "No Redis answers at $1 and redis-server is \
not installed. Install it ('apt-get install redis-server' on Debian/Ubuntu, 'brew install redis' \
on macOS) or point REDIS_URL at a running Redis."
  if [ -n "${2:-}" ]; then
    mkdir -p "$2"
    log "no Redis at $host:$port: starting a private redis-server (data in $2)"
    redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
      --dir "$2" --pidfile "$2/redis.pid" --logfile "$2/redis.log"
    MANTLE_PRIVATE_REDIS_PID_FILE="$2/redis.pid"
  else
    log "no Redis at $host:$port: starting the machine's redis-server"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$port" --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
  fi
  wait_tcp "$host" "$port" 10 || die "redis-server did not start on $host:$port"
}

ensure_rabbitmq() {  # ensure_rabbitmq URL: the suite checks RabbitMQ works as a broker too
  local hp host port
  hp=$(url_host_port "$1" 5672); host=${hp% *}; port=${hp#* }
  tcp_open "$host" "$port" && return 0
  if command -v rabbitmq-server >/dev/null 2>&1; then
    log "RabbitMQ is not answering at $host:$port; starting it"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_tcp "$host" "$port" 60 && return 0
  fi
  die "RabbitMQ is not reachable at $host:$port (the suite tests it as a Celery broker). Start it \
('rabbitmq-server -detached'; install: 'apt-get install rabbitmq-server') or set \
MANTLE_TEST_AMQP_URL to a reachable broker."
}
