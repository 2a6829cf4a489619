#!/usr/bin/env bash
# The HF bridge against the oldest supported transformers (5.17, the GPU machine's release).
#
# A venv that sees the system's packages (torch, triton, pytest) gets transformers==5.17.0, which shadows
# the installed one; then the tests that compare effdecode with transformers' generate run from this
# checkout (not the whole suite). Reuses the venv when it exists.
#
#   scripts/hf_compat.sh                     # transformers 5.17.0 in /tmp/venv-tf517
#   HF_COMPAT_VERSION=5.20.0 scripts/hf_compat.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${HF_COMPAT_VERSION:-5.17.0}"
VENV="${HF_COMPAT_VENV:-/tmp/venv-tf$(echo "$VERSION" | tr -d . | cut -c1-3)}"
PYTHON="${PYTHON:-python}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "transformers==$VERSION"
got="$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
if [ "$got" != "$VERSION" ]; then
    echo "hf_compat: expected transformers $VERSION in $VENV, got $got" >&2
    exit 1
fi
echo "hf_compat: transformers $got ($VENV)"

# Tests that compare with transformers' generate (greedy identity, fallbacks, errors, scores, threads),
# plus the fuzz cases with an "hf" check; float64 only and no Triton-interpreter kernels (those do not
# touch the bridge), ~2 min on 2 cores. The checkout goes first on the path (an editable install may point
# elsewhere).
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_engine_equivalence.py \
    tests/test_reliability.py \
    tests/test_fuzz.py \
    -k "not triton and not dtype0 and not 3-dtype1 and (not test_fuzz_case or hf)" \
    "$@"
