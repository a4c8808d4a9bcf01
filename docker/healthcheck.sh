#!/usr/bin/env bash
# Healthy when each service the entrypoint started answers: JupyterLab's API and the SSH port.
set -euo pipefail
if [ "${JUPYTER:-on}" != "off" ]; then
  curl -fsS --max-time 5 "http://127.0.0.1:${JUPYTER_PORT:-8888}/api" >/dev/null
fi
if [ -f "${SSH_DIR:-/cache/sshd}/sshd.pid" ]; then
  timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/${SSH_PORT:-2222}"
fi
