#!/usr/bin/env bash
# Installs the Debian packages Flywheel runs against, only where missing: idempotent and quiet when all is there.
set -euo pipefail
need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v npm >/dev/null || need+=(npm)
command -v prometheus >/dev/null || need+=(prometheus)
command -v spamc >/dev/null || need+=(spamc)
[ -d /usr/share/spamassassin ] || need+=(spamassassin)
[ -x /usr/lib/dovecot/imap ] || need+=(dovecot-imapd)
[ -e /usr/lib/dovecot/modules/lib95_imap_sieve_plugin.so ] || need+=(dovecot-sieve)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  echo "==> system packages: all present"
  exit 0
fi
echo "==> system packages: installing ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "error: need root (or sudo) to apt-get install ${need[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Debian's prometheus post-install tries to start a service; in a container without init that fails harmlessly.
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || {
  echo "error: apt-get install ${need[*]} failed; install them by hand (Debian/Ubuntu package names)" >&2; exit 1; }
echo "==> system packages: done"
