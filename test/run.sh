#!/usr/bin/env bash
# The test command (README, .ci/run): sets up what it needs, starts one Kafka
# broker and one schema registry shared by the whole run, runs the unit and
# integration tests with node's test runner, and stops what it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash compose/setup.sh
# The operator's test needs a Kubernetes control plane built from source, once (decision 0044).
# Without Go only the tests that need it fail (they name the reason), not the whole run.
if [ $# -eq 0 ] || printf '%s\n' "$@" | grep -q 'operator'; then
  bash test/k8s/controlplane/build.sh >/dev/null || echo "test/run.sh: the test control plane did not build; the operator test will fail" >&2
fi
# So does the pgx (Go) client of the sharded merge test, built once too (decision 0077).
if [ $# -eq 0 ] || printf '%s\n' "$@" | grep -q 'sharding-stream'; then
  bash test/clients/pgx/build.sh >/dev/null || echo "test/run.sh: the pgx test client did not build; sharding-stream's binary test will fail" >&2
fi

export MG_TEST_DIR="${MG_TEST_DIR:-$(mktemp -d /tmp/mg-test.XXXXXX)}"
chmod 755 "$MG_TEST_DIR" # Postgres runs as its own user and must reach data dirs below
# The components run as bundles (decision 0071): each run its own, so runs from one checkout never share one.
export MG_DIST="$PWD/dist/test-$(basename "$MG_TEST_DIR")"
node --import tsx compose/build.ts "$MG_DIST"
stop_infra() {
  # A file ended by --test-timeout never ran its after hook: stop any cluster it left running.
  for spec in "$MG_TEST_DIR"/*/cluster.json; do
    [ -f "$spec" ] && compose/bin/mg cluster down --data-dir "$(dirname "$spec")" >/dev/null 2>&1 || true
  done
  node --import tsx test/support/infra.ts down || true
  rm -rf "$MG_DIST"
}
trap stop_infra EXIT
node --import tsx test/support/infra.ts up
set -a; . "$MG_TEST_DIR/infra.env"; set +a

files=("$@")
[ ${#files[@]} -gt 0 ] || files=(test/unit/*.test.ts test/integration/*.test.ts test/fault/*.test.ts)
node --import tsx --test --test-concurrency=1 --test-timeout="${MG_TEST_TIMEOUT_MS:-600000}" --test-reporter=spec "${files[@]}"
