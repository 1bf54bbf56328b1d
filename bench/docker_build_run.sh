#!/usr/bin/env bash
# Build the Dockerfile and run the image on a machine without a Docker engine, with Debian's buildah (as
# root), then check it as a user would: /readyz, the README's curls, SIGTERM. Prints the build time, the
# image size and the time to ready; writes them to OUT/docker.json.
#
#   sudo bench/docker_build_run.sh OUT [warm]
#
# No base image can be pulled here, so python:3.11-slim-bookworm is made locally: debootstrap's minbase
# bookworm with python3.11 and venv, committed under that name (once; reused after). Pip inside the
# build takes the torch CPU wheel from this machine's find-links folder and trusts its CA bundle (both
# mounted read-only and passed as build arguments). `warm`: the volume starts with this checkout's
# fetched assets, prepared ML-100K and quick-start artefacts, so "ready" measures the start alone;
# without it the container fetches, prepares and trains on first start, as a new deployment does.
set -euo pipefail
OUT=${1:?usage: bench/docker_build_run.sh OUT [warm]}
WARM=${2:-}
SD=(--storage-driver vfs)
BASE=docker.io/library/python:3.11-slim-bookworm
ROOTFS=${ROOTFS:-/var/tmp/automr-bookworm}
WHEELS=${WHEELS:-$(pip config get global.find-links 2>/dev/null || echo /opt/wheels)}
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
INDEX=${INDEX:-https://pypi.org/simple}
PORT=${AUTOMR_PORT:-8000}
VOL=${VOL:-/var/tmp/automr-volume}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

if ! buildah "${SD[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "== base image $BASE from debootstrap"
  [ -x "$ROOTFS/usr/bin/python3.11" ] || debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,python3-pip-whl,python3-setuptools-whl,ca-certificates \
    bookworm "$ROOTFS" http://deb.debian.org/debian
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  ctr=$(buildah "${SD[@]}" from scratch)
  mnt=$(buildah "${SD[@]}" mount "$ctr")
  cp -a "$ROOTFS"/. "$mnt"/
  buildah "${SD[@]}" umount "$ctr"
  buildah "${SD[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3.11 "$ctr"
  buildah "${SD[@]}" commit "$ctr" "$BASE"
  buildah "${SD[@]}" rm "$ctr"
fi

echo "== build"
t0=$(date +%s)
buildah "${SD[@]}" bud --isolation chroot --pull=false --layers=false \
  --volume "$WHEELS:/wheels:ro" --volume "$CA:/ca-bundle.crt:ro" \
  --build-arg PIP_INDEX_URL="$INDEX" --build-arg PIP_EXTRA_INDEX_URL= \
  --build-arg FIND_LINKS=/wheels --build-arg CA_BUNDLE=/ca-bundle.crt \
  --build-arg GIT_SHA="$(git rev-parse HEAD)" -t automr:local . 2>&1 | tee "$OUT/build.log"
build_s=$(( $(date +%s) - t0 ))
size=$(buildah "${SD[@]}" inspect --type image --format '{{.ImageSize}}' automr:local 2>/dev/null \
  || buildah "${SD[@]}" images --format '{{.Size}}' automr:local)
human=$(buildah "${SD[@]}" images --format '{{.Size}}' automr:local)
base_human=$(buildah "${SD[@]}" images --format '{{.Size}}' "$BASE")

echo "== run"
rm -rf "$VOL" && mkdir -p "$VOL"
if [ "$WARM" = warm ]; then
  mkdir -p "$VOL/runs" && cp -a "${AUTOMR_HOME:-$HOME/.cache/automr}"/. "$VOL"/ && rm -rf "$VOL/redis"
  cp -a runs/ml-100k "$VOL/runs/ml-100k"
fi
chown -R 10001:10001 "$VOL"
ctr=$(buildah "${SD[@]}" from automr:local)
t0=$(date +%s)
buildah "${SD[@]}" run --isolation chroot --network host --user 10001:10001 \
  -v "$VOL:/data" -v "$CA:/ca-bundle.crt:ro" -e PIP_CERT=/ca-bundle.crt -e AUTOMR_PORT="$PORT" "$ctr" -- \
  sh -c 'make artefacts RUNS=/data/runs && AUTOMR_ARTEFACTS_DIR="$(make -s print-artefacts RUNS=/data/runs)" exec .venv/bin/automr serve' \
  > "$OUT/container.log" 2>&1 &
runner=$!
until curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
  kill -0 $runner 2>/dev/null || { echo "the container exited"; tail -30 "$OUT/container.log"; exit 1; }
  sleep 2
done
ready_s=$(( $(date +%s) - t0 ))
echo "ready after ${ready_s}s"

user=$(curl -fsS "http://127.0.0.1:$PORT/users/1/history" >/dev/null && echo 1 || echo 196)
{
  curl -sS "localhost:$PORT/recommend" -H 'content-type: application/json' -d "{\"user_id\": \"$user\", \"k\": 5}"; echo
  curl -sS "localhost:$PORT/recommend" -H 'content-type: application/json' -d "{\"user_id\": \"$user\", \"k\": 5, \"mode\": \"bigrec\"}"; echo
  curl -sS "localhost:$PORT/interactions" -H 'content-type: application/json' \
    -d "{\"events\": [{\"user_id\": \"$user\", \"item_id\": \"168\", \"timestamp\": 1700000000, \"event_id\": \"readme-1\"}]}"; echo
  curl -sS "localhost:$PORT/users/$user/history" | head -c 300; echo
  curl -sS "localhost:$PORT/version"; echo
} | tee "$OUT/curls.txt"

echo "== SIGTERM"
pid=$(pgrep -f "service.cli serve" | head -1)
kill -TERM "$pid"
wait $runner && rc=0 || rc=$?
tail -5 "$OUT/container.log"
buildah "${SD[@]}" rm "$ctr" >/dev/null
cat > "$OUT/docker.json" <<JSON
{"build_s": $build_s, "image_bytes": "$size", "image_size": "$human", "base_size": "$base_human",
 "ready_s": $ready_s, "start": "${WARM:-cold}", "exit_code_after_sigterm": $rc,
 "machine": "$(lscpu | sed -n 's/^Model name: *//p')", "commit": "$(git rev-parse HEAD)"}
JSON
cat "$OUT/docker.json"
