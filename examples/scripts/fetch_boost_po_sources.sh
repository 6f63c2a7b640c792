#!/usr/bin/env bash
# The GPU machines have Boost 1.83 headers but no Boost.Program_options library. This fetches the
# program_options sources of Boost 1.83 from Debian's boost1.83 source package (trixie) into
# .carry/boost_po (ignored by git), so that a GPU build can compile them in:
#   cmake ... -DHELIX_BOOST_PO_SOURCES=$PWD/.carry/boost_po     (see examples/scripts/gpu_check.sh)
# and the device tool can carry the folder (`carry: [".carry"]`). Run once per machine, here.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dest="$root/.carry/boost_po"
[ -f "$dest/options_description.cpp" ] && { echo "already there: $dest"; exit 0; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial"
cat > "$work/src.sources" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
o=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$work" -o Dir::State::Lists="$work/lists")
apt-get "${o[@]}" update -qq
(cd "$work" && apt-get "${o[@]}" source --download-only boost1.83 >/dev/null)
tar -xJf "$work"/boost1.83_*.orig.tar.xz -C "$work" --wildcards '*/libs/program_options/src/*'
mkdir -p "$dest"
cp "$work"/*/libs/program_options/src/*.cpp "$dest/"
echo "wrote $(ls "$dest" | wc -l) files to $dest"
