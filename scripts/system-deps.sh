#!/usr/bin/env bash
# System packages the tests need: systemd (systemd-analyze verify/security and
# systemd-sysusers for the unit in systemd/) and procps (/bin/kill, the unit's
# ExecReload=). Root only; quiet and a no-op when everything is already present.
set -uo pipefail
need=()
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need+=(procps)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing ${need[*]} (run as root to install)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null &&
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
    echo "system-deps: could not install ${need[*]}" >&2
exit 0
