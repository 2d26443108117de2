#!/usr/bin/env bash
# System packages the tests need (systemd-analyze for unit verification). Root only;
# skipped quietly when already present or when not root.
set -uo pipefail
need=()
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing ${need[*]} (run as root to install)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
