#!/usr/bin/env bash
# instructkit container entrypoint: report the environment, start JupyterLab (token required) and,
# only when a public key is given, a hardened sshd; then run the command (default: a shell).
#
# Environment:
#   JUPYTER=on|off        JupyterLab on JUPYTER_PORT (8888), bound to JUPYTER_IP (0.0.0.0 in the container)
#   JUPYTER_TOKEN         the token; unset: a random one, printed once; set but empty: refused
#   SSH_PUBLIC_KEY        an authorized key for user tuner (or mount ~/.ssh/authorized_keys)
#   SSH_PORT              2222; SSH_ALLOW_FROM: comma-separated addresses/CIDRs allowed to log in
#   SSH_DIR               where host keys and sshd_config live (default /cache/sshd: kept across restarts)
#   WORKSPACE             Jupyter's root directory (default /workspace)
set -euo pipefail

log() { printf '[entrypoint] %s\n' "$*" >&2; }
fail() { printf '[entrypoint] error: %s\n' "$*" >&2; exit 2; }

USER_NAME="$(id -un)"
WORKSPACE="${WORKSPACE:-/workspace}"
SSH_DIR="${SSH_DIR:-/cache/sshd}"
SSH_PORT="${SSH_PORT:-2222}"
JUPYTER="${JUPYTER:-on}"
JUPYTER_PORT="${JUPYTER_PORT:-8888}"
JUPYTER_IP="${JUPYTER_IP:-0.0.0.0}"
pids=()

report_environment() {
  if command -v instructkit >/dev/null 2>&1; then
    instructkit env || log "instructkit env failed (exit $?): check the GPU runtime (docker run --gpus all)"
  else
    log "instructkit is not on PATH"
  fi
}

start_jupyter() {
  [ "$JUPYTER" = "off" ] && { log "JupyterLab off (JUPYTER=off)"; return; }
  local token
  if [ "${JUPYTER_TOKEN+set}" = "set" ]; then
    [ -n "$JUPYTER_TOKEN" ] || fail "JUPYTER_TOKEN is set but empty: without a token anyone who reaches port \
$JUPYTER_PORT can run code here. Set a token (e.g. JUPYTER_TOKEN=\$(openssl rand -hex 24)), unset it for a \
random one, or set JUPYTER=off."
    token="$JUPYTER_TOKEN"
  else
    token="$(python -c 'import secrets; print(secrets.token_hex(24))')"
    log "JupyterLab token (shown once): $token"
  fi
  # The token goes through the environment, not the command line, so `ps` does not show it.
  JUPYTER_TOKEN="$token" jupyter lab --no-browser --ip="$JUPYTER_IP" --port="$JUPYTER_PORT" \
    --ServerApp.root_dir="$WORKSPACE" --ServerApp.allow_remote_access=True \
    --ServerApp.port_retries=0 >"${JUPYTER_LOG:-/tmp/jupyter.log}" 2>&1 &
  pids+=("$!")
  log "JupyterLab on port $JUPYTER_PORT: http://127.0.0.1:$JUPYTER_PORT/lab?token=<token>"
}

authorized_keys() {
  local file="$HOME/.ssh/authorized_keys"
  if [ -n "${SSH_PUBLIC_KEY:-}" ]; then
    mkdir -p "$HOME/.ssh"
    if [ -e "$file" ] && [ ! -w "$file" ]; then
      fail "SSH_PUBLIC_KEY is set and $file is a read-only mount: use one of the two"
    fi
    printf '%s\n' "$SSH_PUBLIC_KEY" >"$file"
  fi
  [ -s "$file" ] || return 1
  chmod 700 "$HOME/.ssh"
  chmod 600 "$file" 2>/dev/null || true  # a read-only mount keeps its mode
}

write_sshd_config() {
  local allow="$USER_NAME" pattern
  if [ -n "${SSH_ALLOW_FROM:-}" ]; then
    allow=""
    IFS=',' read -ra patterns <<<"$SSH_ALLOW_FROM"
    for pattern in "${patterns[@]}"; do
      pattern="${pattern// /}"
      [[ "$pattern" =~ ^[0-9a-fA-F.:/*]+$ ]] || fail "SSH_ALLOW_FROM entry '$pattern' is not an address or CIDR"
      allow+="$USER_NAME@$pattern "
    done
  fi
  cat >"$SSH_DIR/sshd_config" <<CONFIG
# Written by the instructkit entrypoint at start; keys only, one user, no root.
Port $SSH_PORT
HostKey $SSH_DIR/ssh_host_ed25519_key
HostKey $SSH_DIR/ssh_host_rsa_key
PidFile $SSH_DIR/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
PermitRootLogin no
AllowUsers ${allow% }
UsePAM no
StrictModes yes
MaxAuthTries 3
LoginGraceTime 30
X11Forwarding no
AllowAgentForwarding no
AllowTcpForwarding local
PermitTunnel no
ClientAliveInterval 300
Subsystem sftp internal-sftp
CONFIG
}

start_sshd() {
  if ! authorized_keys; then
    log "SSH off: no SSH_PUBLIC_KEY and no ~/.ssh/authorized_keys"
    return
  fi
  command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || fail "SSH_PUBLIC_KEY is set but sshd is not installed"
  mkdir -p "$SSH_DIR"
  chmod 700 "$SSH_DIR"
  # Host keys are made here, at first start, never in an image layer; kept in SSH_DIR across restarts.
  [ -f "$SSH_DIR/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/ssh_host_ed25519_key"
  [ -f "$SSH_DIR/ssh_host_rsa_key" ] || ssh-keygen -q -t rsa -b 3072 -N '' -f "$SSH_DIR/ssh_host_rsa_key"
  write_sshd_config
  /usr/sbin/sshd -t -f "$SSH_DIR/sshd_config" || fail "sshd rejected $SSH_DIR/sshd_config"
  /usr/sbin/sshd -D -e -f "$SSH_DIR/sshd_config" 2>"${SSH_LOG:-/tmp/sshd.log}" &
  pids+=("$!")
  log "SSH on port $SSH_PORT for user $USER_NAME (keys only)"
  ssh-keygen -l -f "$SSH_DIR/ssh_host_ed25519_key.pub" >&2
}

stop_services() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  wait "${pids[@]}" 2>/dev/null || true
}

report_environment
start_jupyter
start_sshd

if [ "$#" -eq 0 ]; then
  # A shell on a terminal (docker run -it); detached (docker run -d, compose up -d), keep serving.
  if [ -t 0 ]; then set -- bash; else set -- sleep infinity; fi
fi
if [ -t 0 ]; then
  exec "$@"  # interactive: the command takes this process over (tini passes signals to it)
fi
# Run the command as a child, pass SIGTERM/SIGINT/SIGHUP on to it, and stop the services when it ends.
"$@" &
child=$!
# shellcheck disable=SC2329  # called from the traps below
forward() { kill -s "$1" "$child" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP
status=0
while true; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break  # a trapped signal interrupted wait; the command still runs
done
stop_services
exit "$status"
