#!/bin/sh
# Run a command (`warren dev ...`) so that it never outlives the test that started it.
#
#   tests/warren-dev-guard.sh <command> [args...]
#
# The caller starts this script as the leader of a new process group, with a pipe on its
# standard input. When that pipe closes (the test finished, crashed, or was killed), the
# command gets SIGTERM, and after a grace period the whole group gets SIGKILL. A test that
# wants a power cut sends SIGKILL to the group itself.
"$@" </dev/null &
child=$!
read -r _ignored || true
kill -TERM "$child" 2>/dev/null
(sleep "${WARREN_GUARD_GRACE:-15}"; kill -KILL 0) &
wait "$child"
kill -KILL 0
