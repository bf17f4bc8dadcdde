#!/usr/bin/env bash
# Prepare MIT streaming-llm for the MIT reference stage: export the pinned commit from a git clone (never
# vendored: the clone is the user's, or the image's, made where the network exists), apply our setup
# patch (scripts/mit/streaming-llm.patch, documented in scripts/mit/README.md), and record both in
# DEST/.streamkv-patch, which the stage copies into every MIT result.
#   scripts/mit/setup.sh SOURCE_CLONE COMMIT DEST
set -euo pipefail
source_clone=${1:?usage: setup.sh SOURCE_CLONE COMMIT DEST}
commit=${2:?usage: setup.sh SOURCE_CLONE COMMIT DEST}
dest=${3:?usage: setup.sh SOURCE_CLONE COMMIT DEST}
patch_file=$(cd "$(dirname "$0")" && pwd)/streaming-llm.patch

if ! git -C "$source_clone" cat-file -e "${commit}^{commit}" 2>/dev/null; then
    echo "streamkv: error: MIT_REPO=$source_clone is not a git clone of mit-han-lab/streaming-llm holding" \
         "commit $commit (git clone https://github.com/mit-han-lab/streaming-llm)" >&2
    exit 2
fi
tmp=$(mktemp -d "$(dirname "$dest")/.streaming-llm.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
git -C "$source_clone" archive "$commit" -- examples streaming_llm setup.py | tar -x -C "$tmp"
patch --quiet -d "$tmp" -p1 < "$patch_file"
printf 'commit %s\npatch %s\n' "$commit" "$(sha256sum "$patch_file" | cut -d' ' -f1)" > "$tmp/.streamkv-patch"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "MIT streaming-llm $commit, patched: $dest"
