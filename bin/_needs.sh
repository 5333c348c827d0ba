# What the selected tests need beyond PostgreSQL and Redis, for bin/test (sourced after
# _lib.sh): `browser` (Debian's Chromium), `rabbitmq` (a RabbitMQ server) and `models` (the
# built-in artifacts and the prepare environment). A test says so with the marker of that
# name in its own module; tests/support/needs.py checks the markers are there.
#
# The decision reads files and never starts Python, so the inner loop stays fast: every
# argument that names a file or directory under tests/ (a node id's `::...` dropped) is a
# selected path, and a need is selected when a .py file among them contains
# `pytest.mark.<need>`. No such argument means the whole suite, and every need. Options
# (-k, -m) do not narrow the choice: the set-up may do more than the tests use, never less.

TEST_NEEDS=(browser rabbitmq models)  # as the markers in pyproject.toml

# select_needs [pytest args...]: sets MANTLE_TEST_NEEDS to the selected needs, space-separated.
select_needs() {
  local arg path paths=() need
  for arg in "$@"; do
    path="${arg%%::*}"
    [ -n "$path" ] && [ -e "$path" ] || continue
    case "$(cd "$(dirname -- "$path")" && pwd)/$(basename -- "$path")" in
      "$ROOT/tests" | "$ROOT/tests/"*) paths+=("$path") ;;
    esac
  done
  if [ ${#paths[@]} -eq 0 ]; then
    MANTLE_TEST_NEEDS="${TEST_NEEDS[*]}"
    return 0
  fi
  MANTLE_TEST_NEEDS=""
  for need in "${TEST_NEEDS[@]}"; do
    if grep -rqsE --include='*.py' "pytest\.mark\.$need\b" -- "${paths[@]}"; then
      MANTLE_TEST_NEEDS+="${MANTLE_TEST_NEEDS:+ }$need"
    fi
  done
}

needs() {  # needs NAME: whether the selected tests need NAME
  [[ " $MANTLE_TEST_NEEDS " == *" $1 "* ]]
}
