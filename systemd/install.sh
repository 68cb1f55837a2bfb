#!/usr/bin/env bash
# Installs (or upgrades) iot-gateway as a systemd service. Idempotent: run it again after
# `npm run build` to upgrade; an existing /etc/iot-gateway/gateway.yaml is never overwritten.
# See docs/operations.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: systemd/install.sh [options]   (as root, from a built checkout: npm ci && npm run build)

  --source DIR     checkout to install from (default: the directory above this script)
  --prefix DIR     application directory (default: /opt/iot-gateway)
  --node PATH      node binary for ExecStart and the wrapper (default: `command -v node`)
  --destdir DIR    stage into DIR instead of / (also $DESTDIR): no user creation, no chown to
                   a missing user, no systemctl; for packaging and tests
  --deps MODE      copy (default): copy node_modules and prune dev dependencies offline;
                   ci: run `npm ci --omit=dev` in the prefix; none: leave node_modules out
  --now            enable and start (or restart, on upgrade) the service
  --dry-run        print what would be done, change nothing
  -h, --help       this text
EOF
}

die() {
  echo "install.sh: $*" >&2
  exit 1
}
say() { echo "install.sh: $*"; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE=$(cd "$SCRIPT_DIR/.." && pwd)
PREFIX=/opt/iot-gateway
NODE=""
DESTDIR=${DESTDIR:-}
DEPS=copy
NOW=0
DRY_RUN=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --source) SOURCE=${2:?--source needs a directory}; shift 2 ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --node) NODE=${2:?--node needs a path}; shift 2 ;;
    --destdir) DESTDIR=${2:?--destdir needs a directory}; shift 2 ;;
    --deps) DEPS=${2:?--deps needs copy, ci or none}; shift 2 ;;
    --now) NOW=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

SERVICE=iot-gateway
USER_NAME=iot-gateway
GROUP_NAME=iot-gateway
CONF_DIR=/etc/iot-gateway
SECRETS_DIR=$CONF_DIR/secrets
STATE_DIR=/var/lib/iot-gateway
UNIT_DIR=/etc/systemd/system
BIN_LINK=/usr/bin/iot-gateway
WRAPPER_MARK="# iot-gateway wrapper (systemd/install.sh)"

[[ "$PREFIX" == /* && "$PREFIX" != "/" ]] || die "--prefix must be an absolute directory other than /"
[[ "$DEPS" =~ ^(copy|ci|none)$ ]] || die "--deps must be copy, ci or none"
if [[ -n "$DESTDIR" ]]; then
  DESTDIR=$(cd "$DESTDIR" 2>/dev/null && pwd) || die "--destdir $DESTDIR does not exist; create it first"
  [[ "$DESTDIR" != "/" ]] || DESTDIR=""
fi
if [[ -z "$DESTDIR" && $DRY_RUN -eq 0 && $(id -u) -ne 0 ]]; then
  die "run as root (sudo systemd/install.sh), or stage with --destdir DIR"
fi

[[ -f "$SOURCE/dist/cli.js" ]] || die "$SOURCE/dist/cli.js is missing; run 'npm ci && npm run build' in $SOURCE first"
[[ -f "$SOURCE/package.json" ]] || die "$SOURCE/package.json is missing; is --source a checkout of iot-gateway?"
[[ -f "$SCRIPT_DIR/iot-gateway.service" ]] || die "$SCRIPT_DIR/iot-gateway.service is missing"

if [[ -z "$NODE" ]]; then
  NODE=$(command -v node || true)
  [[ -n "$NODE" ]] || die "node is not on PATH; install Node.js 20+ or pass --node PATH"
fi
[[ "$NODE" == /* ]] || die "--node must be an absolute path"
if [[ -z "$DESTDIR" && ! -x "$NODE" ]]; then
  die "$NODE is not executable; pass --node PATH"
fi
case "$NODE $PREFIX" in
  /home/* | */home/* | /root/* | */root/*)
    say "warning: $NODE or $PREFIX is under /home or /root, which ProtectHome=yes hides from the service" ;;
esac

# Runs a command, or prints it under --dry-run.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "+ $*"
  else
    "$@"
  fi
}

# The service user exists on the target system (always true after step 1 unless staging).
have_user() { getent passwd "$USER_NAME" >/dev/null 2>&1; }

# chown that skips, with a note, when staging as non-root or for a system whose user does
# not exist here.
own() {
  local owner=$1 path=$2
  if [[ $(id -u) -ne 0 ]]; then
    say "note: not root; $path left owned by $(id -un) (staging)"
  elif [[ "$owner" == root:root ]] || have_user; then
    run chown "$owner" "$path"
  else
    say "note: user $USER_NAME does not exist here; $path left owned by root (staging)"
  fi
}

umask 022

# 1. System user and group: no home, no login shell.
if [[ -n "$DESTDIR" ]]; then
  say "staging into $DESTDIR: not creating user $USER_NAME (the target system's install does)"
else
  if ! getent group "$GROUP_NAME" >/dev/null; then
    run groupadd --system "$GROUP_NAME"
  fi
  if ! getent passwd "$USER_NAME" >/dev/null; then
    NOLOGIN=$(command -v nologin || echo /usr/sbin/nologin)
    run useradd --system --gid "$GROUP_NAME" --no-create-home --home-dir /nonexistent \
      --shell "$NOLOGIN" --comment "iot-gateway daemon" "$USER_NAME"
  fi
fi

# 2. The application, replaced as a whole so an upgrade never mixes old and new files.
TARGET=$DESTDIR$PREFIX
STAGE=$TARGET.new
say "installing $SOURCE into $TARGET"
run rm -rf "$STAGE"
run mkdir -p "$STAGE/docs" "$STAGE/config" "$STAGE/systemd"
run cp -R "$SOURCE/dist" "$STAGE/dist"
run cp "$SOURCE/package.json" "$STAGE/"
for f in package-lock.json README.md LICENSE docs/operations.md config/gateway.example.yaml \
  systemd/iot-gateway.service systemd/install.sh systemd/uninstall.sh; do
  if [[ -f "$SOURCE/$f" ]]; then run cp "$SOURCE/$f" "$STAGE/$f"; fi
done
case "$DEPS" in
  copy)
    [[ -d "$SOURCE/node_modules" ]] || die "$SOURCE/node_modules is missing; run 'npm ci' there or use --deps ci"
    run cp -R "$SOURCE/node_modules" "$STAGE/node_modules"
    # Offline: removes what the lockfile marks as dev-only; native addons stay as built.
    run npm --prefix "$STAGE" prune --omit=dev --no-audit --no-fund
    # prune leaves emptied scope folders (@vitest, ...) behind.
    run find "$STAGE/node_modules" -mindepth 1 -maxdepth 1 -type d -empty -delete
    ;;
  ci) run npm --prefix "$STAGE" ci --omit=dev --no-audit --no-fund ;;
  none) say "not installing node_modules (--deps none)" ;;
esac
run chmod -R u=rwX,go=rX "$STAGE"
run chmod 0755 "$STAGE/dist/cli.js"
if [[ $(id -u) -eq 0 ]]; then run chown -R root:root "$STAGE"; fi
if [[ -e "$TARGET" ]]; then
  run rm -rf "$TARGET.old"
  run mv "$TARGET" "$TARGET.old"
fi
run mkdir -p "$(dirname "$TARGET")"
run mv "$STAGE" "$TARGET"
run rm -rf "$TARGET.old"

# 3. /usr/bin/iot-gateway: a wrapper rather than a symlink, so it runs the same node as the
#    unit whatever dist/cli.js's shebang finds on PATH.
WRAPPER=$DESTDIR$BIN_LINK
if [[ -e "$WRAPPER" || -L "$WRAPPER" ]] && ! grep -qF "$WRAPPER_MARK" "$WRAPPER" 2>/dev/null; then
  die "$WRAPPER exists and was not written by this script; remove it or move it aside"
fi
run mkdir -p "$(dirname "$WRAPPER")"
if [[ $DRY_RUN -eq 1 ]]; then
  echo "+ write $WRAPPER (exec $NODE $PREFIX/dist/cli.js \"\$@\")"
else
  rm -f "$WRAPPER"
  printf '#!/bin/sh\n%s\nexec %s %s/dist/cli.js "$@"\n' "$WRAPPER_MARK" "$NODE" "$PREFIX" >"$WRAPPER"
  chmod 0755 "$WRAPPER"
fi

# 4. Configuration: root-owned, readable by the service group only; never overwritten.
run mkdir -p "$DESTDIR$CONF_DIR"
own "root:$GROUP_NAME" "$DESTDIR$CONF_DIR"
run chmod 0750 "$DESTDIR$CONF_DIR"
CONFIG=$DESTDIR$CONF_DIR/gateway.yaml
if [[ -e "$CONFIG" ]]; then
  say "keeping existing $CONF_DIR/gateway.yaml"
  mode=$(stat -c '%a' "$CONFIG")
  if (((8#$mode & 8#027) != 0)); then
    say "warning: $CONF_DIR/gateway.yaml has mode $mode; it may hold secrets, make it 0640 root:$GROUP_NAME"
  fi
else
  EXAMPLE=$SOURCE/config/gateway.example.yaml
  [[ -f "$EXAMPLE" ]] || die "$EXAMPLE is missing, and there is no $CONF_DIR/gateway.yaml to keep"
  run install -m 0640 "$EXAMPLE" "$CONFIG"
  own "root:$GROUP_NAME" "$CONFIG"
  say "created $CONF_DIR/gateway.yaml from the example: edit it, then start the service"
fi
# Secrets for LoadCredential=: systemd reads them as root, so the service user needs no access.
run mkdir -p "$DESTDIR$SECRETS_DIR"
own root:root "$DESTDIR$SECRETS_DIR"
run chmod 0700 "$DESTDIR$SECRETS_DIR"
if [[ $DRY_RUN -eq 0 ]]; then
  find "$DESTDIR$SECRETS_DIR" -type f ! -perm 0600 -exec chmod 0600 {} +
fi

# 5. State: systemd's StateDirectory= would create it too; doing it now lets an operator run
#    `sudo -u iot-gateway iot-gateway activity` before the first start.
run mkdir -p "$DESTDIR$STATE_DIR"
own "$USER_NAME:$GROUP_NAME" "$DESTDIR$STATE_DIR"
run chmod 0700 "$DESTDIR$STATE_DIR"

# 6. The unit, with this install's node and prefix.
UNIT=$DESTDIR$UNIT_DIR/$SERVICE.service
run mkdir -p "$DESTDIR$UNIT_DIR"
if [[ $DRY_RUN -eq 1 ]]; then
  echo "+ write $UNIT (ExecStart=$NODE $PREFIX/dist/cli.js ...)"
else
  sed -e "s|^ExecStart=/usr/bin/node |ExecStart=$NODE |" -e "s|/opt/iot-gateway|$PREFIX|g" \
    "$SCRIPT_DIR/iot-gateway.service" >"$UNIT.tmp"
  chmod 0644 "$UNIT.tmp"
  mv "$UNIT.tmp" "$UNIT"
fi

# 7. systemd itself, when there is one to talk to.
if [[ -n "$DESTDIR" ]]; then
  say "staged; on the target run: systemctl daemon-reload && systemctl enable --now $SERVICE"
elif ! command -v systemctl >/dev/null 2>&1 || [[ ! -d /run/systemd/system ]]; then
  say "systemd is not running on this machine; skipped daemon-reload and enable"
  say "when booted with systemd run: systemctl daemon-reload && systemctl enable --now $SERVICE"
else
  run systemctl daemon-reload
  if [[ $NOW -eq 1 ]]; then
    run systemctl enable "$SERVICE"
    # Start, or restart an upgraded install so the new code runs.
    run systemctl restart "$SERVICE"
  else
    run systemctl enable "$SERVICE"
    if systemctl is-active --quiet "$SERVICE"; then
      say "$SERVICE is running the previous version; 'systemctl restart $SERVICE' to upgrade it"
    else
      say "enabled; edit $CONF_DIR/gateway.yaml, then 'systemctl start $SERVICE'"
    fi
  fi
fi
say "done"
