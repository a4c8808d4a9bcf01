#!/usr/bin/env bash
# Services the container tests run for real on this machine (make test runs this first; idempotent):
# Debian's openssh-server, a user `tuner` like the image's, and JupyterLab in a virtual environment
# that `tuner` can execute (the project's .venv may point into /root, which other users cannot enter);
# and Debian's headless Chromium with its chromedriver for the studio's browser tests.
set -euo pipefail
JUPYTER_ENV="${INSTRUCTKIT_TEST_JUPYTER_ENV:-/opt/instructkit-test/jupyter}"

if [ "$(id -u)" -ne 0 ]; then
  echo "test services: not root, so openssh-server, user tuner, $JUPYTER_ENV and chromium are not set up;" \
       "the container and studio browser tests that need them will say so" >&2
  exit 0
fi
if [ ! -x /usr/sbin/sshd ]; then
  apt-get install -y --no-install-recommends openssh-server >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends openssh-server >/dev/null; }
  # Only the binary is wanted here: no system-wide sshd is left running on port 22.
  if command -v service >/dev/null 2>&1; then service ssh stop >/dev/null 2>&1 || true; fi
fi
if ! id tuner >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash tuner
fi
# sshd refuses a locked account ('!' in /etc/shadow) even for keys when PAM is off; '*' is "no password".
usermod -p '*' tuner
if [ ! -x "$JUPYTER_ENV/bin/jupyter-lab" ]; then
  /usr/bin/python3 -m venv "$JUPYTER_ENV"
  "$JUPYTER_ENV/bin/pip" install --quiet "jupyterlab>=4.2" 2>&1 | grep -v "^WARNING: Location" || true
  [ -x "$JUPYTER_ENV/bin/jupyter-lab" ] || { echo "test services: installing JupyterLab failed" >&2; exit 1; }
fi
chmod -R a+rX "$(dirname "$JUPYTER_ENV")"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null; }
fi
echo "test services: sshd $(/usr/sbin/sshd -V 2>&1 | head -1 || true), user tuner, JupyterLab in $JUPYTER_ENV," \
     "$(chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
