#!/usr/bin/env bash
# Fetch the reference RWKV training kernels (BlinkDL/RWKV-LM) into third_party/RWKV-LM, for
# scripts/bench_kernels.py. third_party/ is git-ignored: the reference is never committed here.
#
#   scripts/fetch_reference_kernels.sh                 # shallow clone from GitHub
#   scripts/fetch_reference_kernels.sh --from GITDIR   # or export from a local clone / bare mirror
#
# Only the folders the benchmark reads are kept (the CUDA sources and the trainers' model.py files,
# which show how each kernel is called); the rest of the clone is deleted to keep the copy small.
set -euo pipefail

URL="https://github.com/BlinkDL/RWKV-LM.git"
DEST="$(cd "$(dirname "$0")/.." && pwd)/third_party/RWKV-LM"
PATHS=(RWKV-v4neo/cuda RWKV-v4neo/src/model.py RWKV-v5/cuda RWKV-v5/src/model.py
       RWKV-v7/train_temp/cuda RWKV-v7/train_temp/src/model.py LICENSE)

usage() { sed -n '2,9s/^# \{0,1\}//p' "$0"; }

FROM=""
while [ $# -gt 0 ]; do
    case "$1" in
        --from) FROM="${2:?--from needs a git directory}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "fetch_reference_kernels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

rm -rf "$DEST"
mkdir -p "$DEST"
if [ -n "$FROM" ]; then
    # A bare mirror or a clone: export the needed paths of its HEAD.
    git --git-dir="$FROM" archive HEAD "${PATHS[@]}" | tar -x -C "$DEST"
    COMMIT="$(git --git-dir="$FROM" rev-parse HEAD)"
else
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    git clone --depth 1 --quiet "$URL" "$TMP/RWKV-LM"
    git -C "$TMP/RWKV-LM" archive HEAD "${PATHS[@]}" | tar -x -C "$DEST"
    COMMIT="$(git -C "$TMP/RWKV-LM" rev-parse HEAD)"
fi
echo "$COMMIT" > "$DEST/COMMIT"
echo "reference kernels of BlinkDL/RWKV-LM at $COMMIT in $DEST ($(du -sh "$DEST" | cut -f1))"
