#!/usr/bin/env bash
# Create .venv-0.8.1/ in the repository root: Python 3.12+ with the published
# fastapi-async-sqlalchemy 0.8.1 (which needs 3.12) and what the compat scenarios in tests/compat/
# import. tests/test_against_081.py runs every scenario with this interpreter and with ours and
# compares the outputs. Idempotent: a stamp file makes a second run instant.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-0.8.1
stamp="$venv/.installed-0.8.1"
packages=(fastapi-async-sqlalchemy==0.8.1 fastapi httpx aiosqlite asyncpg asyncmy)

if [ -f "$stamp" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

# Python 3.12 first (found as .ci/run finds it), then any newer one.
python=""
for version in 3.12 3.13 3.14; do
  candidate=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python 2>/dev/null \
    | sort -V | tail -n 1 || true)
  [ -n "$candidate" ] || candidate=$(command -v "python$version" || true)
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
    2>/dev/null; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "compat-venv.sh: no Python 3.12 or newer found (looked in pyenv's versions/3.12.* to" >&2
  echo "3.14.* and for python3.12 to python3.14 on PATH); fastapi-async-sqlalchemy 0.8.1 needs" >&2
  echo "one. Install it, e.g. 'pyenv install 3.12', and run this again." >&2
  exit 1
fi

echo "compat-venv.sh: creating $venv with $python"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "${packages[@]}"
"$venv/bin/python" -c 'import importlib.metadata as m; assert m.version("fastapi-async-sqlalchemy") == "0.8.1"'
touch "$stamp"
echo "compat-venv.sh: $venv ready"
