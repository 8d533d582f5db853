#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the whole suite.
#   bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

echo "== Debian packages: dcmtk dicom3tools orthanc orthanc-dicomweb postgresql chromium openjph-tools"
need=()
for pkg in dcmtk dicom3tools orthanc orthanc-dicomweb postgresql chromium openjph-tools; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi
# The packages start system services; the tests run their own instances on free ports.
for svc in orthanc postgresql; do
  $SUDO service "$svc" stop >/dev/null 2>&1 || true
done

echo "== Python packages: the project with its [test] extra"
python3 -m pip install -q -e '.[test]'

if [ -f tests/viewer/install.sh ]; then
  echo "== OHIF viewer (npm) for the radiologist's-view tests"
  bash tests/viewer/install.sh
fi

echo "== pytest"
exec python3 -m pytest tests -q -p no:cacheprovider --timeout 900 "$@"
