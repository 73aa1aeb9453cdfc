#!/bin/sh
# The container's main process (issue 14): bring the test cluster up with agents and the controller,
# then wait; on SIGTERM or SIGINT (docker stop, compose down) stop it cleanly and exit 0.
set -eu
cd /src
stop() { scripts/testcluster --dir "$HPR_TESTCLUSTER_DIR" down || true; exit 0; }
trap stop TERM INT
scripts/testcluster --dir "$HPR_TESTCLUSTER_DIR" up --nodes "${HPR_NODES:-4}" --agents --controller
echo "hpresilience test cluster up: docker compose exec slurm sinfo  (docker/README.md)"
sleep infinity &
wait $!
