#!/usr/bin/env bash
# Removes iot-gateway installed by systemd/install.sh. Keeps the configuration
# (/etc/iot-gateway) and the queues and logs (/var/lib/iot-gateway) unless --purge.
# See docs/operations.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: systemd/uninstall.sh [options]   (as root)

  --prefix DIR     application directory (default: /opt/iot-gateway)
  --destdir DIR    operate on a staged root instead of / (also $DESTDIR): no systemctl, no userdel
  --purge          also delete /etc/iot-gateway, /var/lib/iot-gateway (undelivered messages
                   and unreplicated logs with it) and the iot-gateway user and group
  --dry-run        print what would be done, change nothing
  -h, --help       this text
EOF
}

die() {
  echo "uninstall.sh: $*" >&2
  exit 1
}
say() { echo "uninstall.sh: $*"; }

PREFIX=/opt/iot-gateway
DESTDIR=${DESTDIR:-}
PURGE=0
DRY_RUN=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --destdir) DESTDIR=${2:?--destdir needs a directory}; shift 2 ;;
    --purge) PURGE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

SERVICE=iot-gateway
USER_NAME=iot-gateway
GROUP_NAME=iot-gateway
CONF_DIR=/etc/iot-gateway
STATE_DIR=/var/lib/iot-gateway
UNIT=/etc/systemd/system/$SERVICE.service
BIN_LINK=/usr/bin/iot-gateway
WRAPPER_MARK="# iot-gateway wrapper (systemd/install.sh)"

# Guards every rm -rf below against an empty or root prefix.
[[ "$PREFIX" == /* && "$PREFIX" != "/" ]] || die "--prefix must be an absolute directory other than /"
if [[ -n "$DESTDIR" ]]; then
  DESTDIR=$(cd "$DESTDIR" 2>/dev/null && pwd) || die "--destdir $DESTDIR does not exist"
  [[ "$DESTDIR" != "/" ]] || DESTDIR=""
fi
if [[ -z "$DESTDIR" && $DRY_RUN -eq 0 && $(id -u) -ne 0 ]]; then
  die "run as root (sudo systemd/uninstall.sh)"
fi

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "+ $*"
  else
    "$@"
  fi
}

SYSTEMD=0
if [[ -n "$DESTDIR" ]]; then
  say "operating on $DESTDIR: not calling systemctl"
elif ! command -v systemctl >/dev/null 2>&1 || [[ ! -d /run/systemd/system ]]; then
  say "systemd is not running on this machine; skipped stop and disable"
else
  SYSTEMD=1
fi

# 1. Stop (graceful: STOPPING=1, queues flushed, bounded by TimeoutStopSec) and disable.
if [[ $SYSTEMD -eq 1 ]]; then
  run systemctl disable --now "$SERVICE" || say "warning: could not stop or disable $SERVICE"
fi

# 2. The unit, the wrapper and the application.
run rm -f "$DESTDIR$UNIT"
if [[ $SYSTEMD -eq 1 ]]; then
  run systemctl daemon-reload
  run systemctl reset-failed "$SERVICE" 2>/dev/null || true
fi
if [[ -e "$DESTDIR$BIN_LINK" ]]; then
  if grep -qF "$WRAPPER_MARK" "$DESTDIR$BIN_LINK" 2>/dev/null; then
    run rm -f "$DESTDIR$BIN_LINK"
  else
    say "leaving $BIN_LINK: it was not written by install.sh"
  fi
fi
run rm -rf "$DESTDIR$PREFIX" "$DESTDIR$PREFIX.new" "$DESTDIR$PREFIX.old"

# 3. Data and identity, only on request.
if [[ $PURGE -eq 1 ]]; then
  run rm -rf "$DESTDIR$CONF_DIR" "$DESTDIR$STATE_DIR"
  if [[ -z "$DESTDIR" ]]; then
    if getent passwd "$USER_NAME" >/dev/null; then run userdel "$USER_NAME"; fi
    if getent group "$GROUP_NAME" >/dev/null; then run groupdel "$GROUP_NAME"; fi
  fi
  say "purged configuration, state, user and group"
else
  say "kept $CONF_DIR and $STATE_DIR (queued messages and logs); --purge deletes them"
fi
say "done"
