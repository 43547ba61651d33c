#!/usr/bin/env bash
# From a bare machine to a running local cluster: install what is missing,
# start Kafka, the schema registry and 3 Postgres instances with their agents,
# then show the cluster's status (read from Kafka) and a query on the primary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash compose/setup.sh
compose/bin/mg cluster up "$@"
echo
compose/bin/mg cluster status "$@"
echo
port=$(node -e "const s=require('./.mg/cluster.json'); console.log(s.postgres.basePort)" 2>/dev/null || echo 15432)
psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atc \
  "select 'primary on port $port answers: ' || version() || E'\\nreplicas streaming from it: ' || (select count(*) from pg_stat_replication where state = 'streaming')"
