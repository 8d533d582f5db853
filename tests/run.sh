#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the whole suite.
#   bash tests/run.sh                 gates (ruff, mypy, import contracts), the unit lane, then the whole suite
#   bash tests/run.sh [pytest args]   install, then only pytest with these arguments
#
# The suite starts its own Orthanc, PostgreSQL and DCMTK peers on free loopback ports in temp dirs.
# It never stops, restarts or reconfigures a service it did not start: an administrator's real
# Orthanc or PostgreSQL may run on this host. Debian packages may start their service when they are
# installed; while this script installs them, a policy-rc.d keeps that from happening (only when the
# host has no policy of its own), and it is removed again at once.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

DEBIAN_PACKAGES=(dcmtk dicom3tools orthanc orthanc-dicomweb postgresql chromium openjph-tools haproxy)
echo "== Debian packages: ${DEBIAN_PACKAGES[*]}"
need=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  policy=/usr/sbin/policy-rc.d
  own_policy=""
  if [ ! -e "$policy" ]; then
    # 101 = "action not allowed": invoke-rc.d then starts no service during this install.
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    own_policy=1
  fi
  # shellcheck disable=SC2064
  trap "[ -n '$own_policy' ] && $SUDO rm -f '$policy'" EXIT
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
  if [ -n "$own_policy" ]; then $SUDO rm -f "$policy"; fi
  trap - EXIT
fi

# [train] brings PyTorch (the CPU build) for the training scripts' --tiny tests: the suite imports it.
echo "== Python packages: the project with its [test] and [train] extras"
python3 -m pip install -q -e '.[test,train]'

if [ -f tests/support/viewer/install.sh ]; then
  echo "== OHIF viewer (npm) for the radiologist's-view tests"
  bash tests/support/viewer/install.sh
fi

if [ $# -gt 0 ]; then
  # Arguments given: run just what they ask for (e.g. one file, or --collect-only).
  echo "== pytest $*"
  exec python3 -m pytest tests -q -p no:cacheprovider --timeout 900 "$@"
fi

# Gates first: each takes seconds and says exactly what is wrong, before the slow lane starts peers.
echo "== gates: ruff check, ruff format --check, mypy, import contracts (lint-imports)"
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy
lint-imports

echo "== unit lane: no peers, injected clock (with coverage of node/, db/, pipelines/)"
python3 -m pytest tests/unit -q -p no:cacheprovider --timeout 300 \
  --cov=node --cov=db --cov=pipelines --cov-report=term:skip-covered

echo "== the whole suite with real peers"
# --durations: the slowest tests in every CI log, to keep the suite within its 20-minute budget on 2 cores.
exec python3 -m pytest tests -q -p no:cacheprovider --timeout 900 --ignore=tests/unit --durations=40
