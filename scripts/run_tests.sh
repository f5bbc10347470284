#!/usr/bin/env bash
# Build and install the package with its test extras, then run the test suite.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip >/dev/null
# parity: torch (CPU wheel) and transformers for the parity and converter tests; about
# 30 s to install here
python -m pip install ".[test,parity]"
# Run from outside the source tree so the installed package (with its compiled
# libraries) is what gets imported.
cd tests
set +e
python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
# 5 = no tests collected: not a failure of the code under test.
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests"
    exit 0
fi
exit "$status"
