#!/usr/bin/env bash
# Validates tabby's Kubernetes manifests offline, with no cluster:
#  1. every manifest the kustomization lists, and every example, against the
#     API schemas of each Kubernetes version in TABBY_K8S_VERSIONS
#     (kubernetes-validate --strict: unknown fields are errors); a kind with
#     no schema (a typo in kind or apiVersion) is an error too, where the
#     tool itself only warns;
#  2. lint.py: the objects against each other, make-secrets.sh, the Secrets'
#     example, and the daemons' flags in the Rust sources.
#
# Usage: deploy/validate.sh [DEPLOY_DIR]   (default: this script's directory)
# Env:   KUBERNETES_VALIDATE  the tool (default: target/tools/kv-venv/bin/kubernetes-validate,
#                             installed by scripts/install-deps.sh, i.e. make deps)
#        TABBY_K8S_VERSIONS   default "1.28.0 1.33.0"
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
dir=$(cd "${1:-$here}" && pwd)
kv=${KUBERNETES_VALIDATE:-$repo/target/tools/kv-venv/bin/kubernetes-validate}
versions=${TABBY_K8S_VERSIONS:-1.28.0 1.33.0}

if [ ! -x "$kv" ]; then
  echo "validate.sh: kubernetes-validate not found at $kv (run \`make deps\`, i.e. scripts/install-deps.sh, or set KUBERNETES_VALIDATE)" >&2
  exit 1
fi
# The Python beside the tool has its PyYAML, which lint.py needs.
py=$(dirname "$kv")/python3
[ -x "$py" ] || py=python3

# The files the kustomization lists (lint.py checks that this is all of them).
mapfile -t files < <(cd "$dir" && "$py" -c '
import yaml
k = yaml.safe_load(open("kustomization.yaml"))
print("\n".join(k.get("resources", [])))')
mapfile -t examples < <(cd "$dir" && find examples -name '*.yaml' ! -name kustomization.yaml 2>/dev/null | sort)
[ ${#files[@]} -gt 0 ] || { echo "validate.sh: kustomization.yaml lists no resources" >&2; exit 1; }

echo "kubernetes-validate $("$kv" --version) on ${#files[@]} manifests and ${#examples[@]} examples, Kubernetes $versions"
args=(--strict)
for v in $versions; do args+=(--kubernetes-version "$v"); done
status=0
out=$(cd "$dir" && "$kv" "${args[@]}" "${files[@]}" "${examples[@]}" 2>&1) || status=$?
printf '%s\n' "$out"
if [ "$status" -ne 0 ]; then
  echo "validate.sh: schema validation failed (exit $status)" >&2
  exit 1
fi
# kubernetes-validate exits 0 when it has no schema for a kind (WARN): a
# misspelt kind or apiVersion would pass unchecked.
if grep -qv '^INFO ' <<<"$out"; then
  echo "validate.sh: kubernetes-validate printed something other than INFO lines (above)" >&2
  exit 1
fi
# Every object of every file was checked against every version.
objects=$(grep -c '^INFO ' <<<"$out")
echo "schemas: $objects checks passed"

"$py" "$here/lint.py" "$dir" "$repo"
echo "validate.sh: OK"
