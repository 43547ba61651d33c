#!/usr/bin/env bash
# From a bare machine to a running local cluster: install what is missing,
# start Kafka, the schema registry and 3 Postgres instances with their agents,
# then the poolers, the gateway and one orchestrator per cell, and show the
# cluster's status (read from Kafka), queries through the gateway and the
# shard's consensus state.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash compose/setup.sh
# The cluster's processes run as bundles (decision 0071), built from these sources now.
export MG_DIST="$PWD/dist/cluster"
node --import tsx compose/build.ts "$MG_DIST"
compose/bin/mg cluster up "$@"
echo
compose/bin/mg cluster status "$@"
echo
# A query through the gateway (SCRAM login), once to the primary and once to a replica.
gw_port=$(node -e "console.log(require('./.mg/cluster.json').gateway.port)")
export PGPASSWORD="${MG_PASSWORD:-postgres}"
for db in postgres postgres@replica; do
  psql -h 127.0.0.1 -p "$gw_port" -U postgres -d "$db" -Atc \
    "select '$db via the gateway: ' || case when pg_is_in_recovery() then 'a replica' else 'the primary' end || ' on port ' || current_setting('port')"
done
echo
# The shard's consensus state from the orchestrators: term, rule, primary, durability policy.
compose/bin/mg shard status "$@"
