#!/bin/sh
# Run a command (`warren dev ...`) so that it never outlives the test that started it.
#
#   tests/warren-dev-guard.sh <command> [args...]
#
# The caller starts this script as the leader of a new process group, with a pipe on its
# standard input. When that pipe closes (the test finished, crashed, or was killed), the
# command gets SIGTERM, and after a grace period the whole group gets SIGKILL. When the
# command exits by itself (e.g. it refused its flags), the whole group goes at once, so the
# caller sees the output close instead of waiting for a URL. A test that wants a power cut
# sends SIGKILL to the group itself.
exec 3<&0
"$@" </dev/null 3<&- &
child=$!
# An asynchronous list reads /dev/null unless told otherwise: give the watcher our stdin.
(
    read -r _ignored || true
    kill -TERM "$child" 2>/dev/null
    sleep "${WARREN_GUARD_GRACE:-15}"
    kill -KILL 0
) <&3 &
exec 3<&-
wait "$child"
kill -KILL 0
