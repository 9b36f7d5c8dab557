#!/usr/bin/env bash
# mypy on the package as it is installed. setuptools' package-dir puts backends/ and conformance/ at
# adalora_core.backends and adalora_core.conformance; an editable install serves that mapping through
# an import hook, which static tools do not follow. So this lays the package out as a tree of links in
# build/typecheck (pyproject.toml's mypy_path) and runs mypy on it, the repository's files unchanged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tree=build/typecheck/adalora_core
rm -rf build/typecheck
mkdir -p "$tree"
for f in adalora_core/*.py adalora_core/*.pyi adalora_core/py.typed; do ln -s "$PWD/$f" "$tree/"; done
ln -s "$PWD/backends" "$tree/backends"
ln -s "$PWD/conformance" "$tree/conformance"
exec python -m mypy "$@"
