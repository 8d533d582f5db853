#!/usr/bin/env bash
# Fetch the prebuilt OHIF v3 viewer (npm package @ohif/app, which ships dist/) into tests/.cache/ohif.
#   bash tests/support/viewer/install.sh
# Idempotent and quiet when already there. Only the package itself is needed (its dist/ is a complete
# static web app), so it is fetched with `npm pack` instead of `npm install`, which would pull in the
# whole build tool chain (webpack, babel, ...) for nothing.
# Without npm it says so and exits 0: the viewer tests then skip, naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/../../.."

SPEC="${OHIF_NPM_SPEC:-@ohif/app@3.13}"
DEST="tests/.cache/ohif"
APP="$DEST/node_modules/@ohif/app"

if [ -f "$APP/dist/index.html" ] && [ -f "$APP/.installed-spec" ] && [ "$(cat "$APP/.installed-spec")" = "$SPEC" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "tests/support/viewer/install.sh: npm not found; OHIF ($SPEC) not installed, the viewer tests will skip." \
    "Install Node.js + npm (e.g. apt-get install nodejs npm) and run this script again."
  exit 0
fi

echo "Fetching $SPEC (prebuilt OHIF viewer) with npm into $DEST ..."
mkdir -p "$DEST"
tmp="$(mktemp -d "$DEST/.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
tarball="$(cd "$tmp" && npm pack "$SPEC" --silent 2>/dev/null | tail -n 1)"
if [ -z "$tarball" ] || [ ! -f "$tmp/$tarball" ]; then
  echo "tests/support/viewer/install.sh: 'npm pack $SPEC' failed (no registry access?); the viewer tests will skip."
  exit 0
fi
tar -xzf "$tmp/$tarball" -C "$tmp"
if [ ! -f "$tmp/package/dist/index.html" ]; then
  echo "tests/support/viewer/install.sh: $tarball has no dist/index.html; the viewer tests will skip."
  exit 0
fi
echo "$SPEC" >"$tmp/package/.installed-spec"
mkdir -p "$(dirname "$APP")"
rm -rf "$APP"
mv "$tmp/package" "$APP"
echo "OHIF $(sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' "$APP/package.json" | head -n 1) installed in $APP"
