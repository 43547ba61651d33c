#!/usr/bin/env bash
# Builds the pgx test client once into ~/.cache/mg/pgx-client/<hash of its sources> and prints
# the binary's path; does nothing when it is already there (like the Kafka jars and the control plane).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
command -v go >/dev/null || { echo "pgx client: Go 1.25 or newer is needed to build it (https://go.dev/dl)" >&2; exit 1; }
hash=$(cat go.mod go.sum main.go | sha256sum | cut -c1-16)
out="${MG_PGX_CACHE:-$HOME/.cache/mg/pgx-client}/$hash"
if [ ! -x "$out/pgx-client" ]; then
  mkdir -p "$out"
  nice -n 19 go build -trimpath -o "$out/pgx-client.tmp" .
  mv "$out/pgx-client.tmp" "$out/pgx-client"
fi
echo "$out/pgx-client"
