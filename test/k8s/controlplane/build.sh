#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager) once into
# ~/.cache/mg/k8s/<version>/ and does nothing when the binaries are already there, like the
# Kafka jars. Prints the cache directory. Decision 0044 has the versions, flags and timings.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
k8s_version=v1.37.2
etcd_version=v3.7.0
binaries=(etcd kube-apiserver kube-controller-manager)
out="${MG_K8S_CACHE:-$HOME/.cache/mg/k8s}/$k8s_version"
mkdir -p "$out"

command -v go >/dev/null || { echo "control plane: Go 1.26 or newer is needed to build it (https://go.dev/dl)" >&2; exit 1; }
have_all() { for b in "${binaries[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

# One build at a time per machine: a second caller waits for the first and then finds the cache.
exec {lock}>"$out/.build.lock"
flock "$lock"
if have_all; then echo "$out"; exit 0; fi

# Without these the servers report v0.0.0-master and clients refuse or misjudge features.
major=${k8s_version#v}; major=${major%%.*}
minor=${k8s_version#v*.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean"
done

start=$(date +%s)
echo "control plane: building ${binaries[*]} ($k8s_version, etcd $etcd_version) into $out; the first build takes minutes" >&2
for b in "${binaries[@]}"; do
  [ -x "$out/$b" ] && continue
  # nice: the build is long and must not starve the tests of other users of the machine.
  nice -n 19 go build -trimpath -ldflags "$ldflags" -o "$out/$b.tmp" "./$b"
  mv "$out/$b.tmp" "$out/$b"
done
echo "control plane: built in $(( $(date +%s) - start ))s" >&2
echo "$out"
