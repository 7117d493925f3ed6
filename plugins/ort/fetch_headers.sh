#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ API headers (API 21) from Debian trixie's libonnxruntime-dev package,
# pinned by version and sha256, without touching the machine's own apt state. Usage: fetch_headers.sh DEST
# A library built against API 21 headers runs in onnxruntime >= 1.21 (never newer than the runtime).
set -euo pipefail
dest=${1:?usage: fetch_headers.sh DEST}
version="1.21.0+dfsg-1"
sha256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
[ -f "$dest/onnxruntime_cxx_api.h" ] && exit 0
mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{lists/partial,archives/partial,etc/apt.conf.d,etc/preferences.d,etc/sources.list.d}
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$work/etc/sources.list"
opts=(-o Dir::Etc="$work/etc" -o Dir::Etc::SourceList="$work/etc/sources.list"
      -o Dir::Etc::SourceParts="$work/etc/sources.list.d" -o Dir::State::Lists="$work/lists"
      -o Dir::Cache::Archives="$work/archives" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${opts[@]}" -qq update
(cd "$work" && apt-get "${opts[@]}" -qq download "libonnxruntime-dev=$version")
deb=$(ls "$work"/libonnxruntime-dev_*.deb)
echo "$sha256  $deb" | sha256sum -c --quiet - || { echo "fetch_headers.sh: sha256 mismatch for $deb" >&2; exit 1; }
dpkg-deb -x "$deb" "$work/x"
mkdir -p "$dest"
cp -r "$work"/x/usr/include/onnxruntime/. "$dest"/
