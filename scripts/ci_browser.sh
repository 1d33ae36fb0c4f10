#!/usr/bin/env bash
# The reports in a real browser (`pytest -m browser`): installs Debian's Chromium and chromedriver when
# missing (non-interactive apt), the `browser` extra (Selenium), then opens freshly generated demo and
# compare reports at desktop and phone widths (tests/browser). Called by .ci/run after setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi
/usr/bin/chromium --version
. .venv/bin/activate
python -m pip install --quiet -e ".[browser]"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python -m pytest -m browser -q
