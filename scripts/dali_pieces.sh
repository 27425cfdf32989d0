#!/usr/bin/env bash
# NVIDIA DALI onto a lent GPU machine in pieces: its wheels (~270 MB with nvImageCodec, nvTIFF, nvCOMP) are larger
# than what one `run` call carries (64 MiB with the working tree), but ignored paths and /tmp survive between calls
# while the machine is warm. See docs/dali.md.
#
#   here:    bash scripts/dali_pieces.sh prepare [MB]   # wheels for the device's Python 3.12 -> .dali1/ .. .daliN/
#                                                       # (MB per piece, default 55; the tree adds ~7 MB per call)
#   device:  bash scripts/dali_pieces.sh receive K      # one call per piece, carry [".daliK"]; back to back, so the
#                                                       # machine stays warm (it is released after ~30 s idle)
#   device:  bash scripts/dali_pieces.sh install        # joins the pieces, pip-installs them (no deps, no index)
#                                                       # into the device's Python, imports DALI
#            then STAGES="test_augment bench_data" bash scripts/gpu_check.sh 300 (carry [".devsite"]), in the same
#            or the next call. Installed into the environment itself, not a --target folder: two of the wheels ship
#            nvidia/__init__.py, which would shadow the image's own nvidia.* packages from a PYTHONPATH folder.
set -euo pipefail
STORE=/tmp/dali_pieces
# what the device image already has (docs: /work/.library/device/KINDS.md): not carried
HAVE='^(numpy|packaging|pyyaml|six|typing_extensions|wheel)-'

case "${1:-}" in
prepare)
    mb=${2:-55}
    work=$(mktemp -d)
    python3 -m pip download nvidia-dali-cuda130 --python-version 3.12 --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -q -d "$work/wheels"
    ( cd "$work/wheels" && ls | grep -Ev "$HAVE" > ../carry.txt && tar cf ../dali.tar -T ../carry.txt )
    rm -rf .dali[0-9]*
    split -b "${mb}M" -d -a 2 "$work/dali.tar" "$work/piece."
    n=0
    for piece in "$work"/piece.*; do
        n=$((n + 1))
        mkdir -p ".dali$n"
        mv "$piece" ".dali$n/dali.tar.$n"
        grep -qx "/.dali$n/" .git/info/exclude || echo "/.dali$n/" >> .git/info/exclude
    done
    (cd "$work" && sha256sum dali.tar | cut -d' ' -f1) > .dali1/dali.tar.sha256
    echo "$n pieces of <= $mb MB in .dali1/ .. .dali$n/ ($(du -sh "$work/dali.tar" | cut -f1) in all):"
    sed 's/^/  /' "$work/carry.txt"
    rm -rf "$work"
    ;;
receive)
    k=${2:?piece number}
    mkdir -p "$STORE"
    cp ".dali$k"/* "$STORE/"
    ls -l "$STORE"
    ;;
install)
    cd "$STORE"
    ls dali.tar.* | grep -v sha256 | sort -t. -k3 -n | xargs cat > dali.tar
    if [[ -f dali.tar.sha256 ]] && [[ "$(sha256sum dali.tar | cut -d' ' -f1)" != "$(cat dali.tar.sha256)" ]]; then
        echo "dali.tar does not match its checksum: a piece is missing or was cut short" >&2
        exit 1
    fi
    mkdir -p wheels && tar xf dali.tar -C wheels
    python3 -m pip install -q --no-deps --no-index wheels/*.whl
    python3 -c "import nvidia.dali as d, torch; print('DALI', d.__version__, 'torch', torch.__version__)"
    ;;
*)
    sed -n 2,16p "$0"
    exit 2
    ;;
esac
