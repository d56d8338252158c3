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
[ -x /usr/sbin/postfix ] || need+=(postfix)
[ -x /usr/sbin/spamass-milter ] || need+=(spamass-milter)
command -v rspamd >/dev/null || need+=(rspamd)
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
# Postfix is installed for the end-to-end test, which runs its own from a temporary configuration: "No
# configuration" writes no /etc/postfix/main.cf, so the package's service has nothing to start and holds no port 25.
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -qq
# Debian's prometheus post-install tries to start a service; in a container without init that fails harmlessly.
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || {
  echo "error: apt-get install ${need[*]} failed; install them by hand (Debian/Ubuntu package names)" >&2; exit 1; }
# Where an init system runs the packages' services, the ones the tests start themselves stay off.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  for unit in postfix spamass-milter rspamd; do
    case " ${need[*]} " in *" $unit "*) $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true ;; esac
  done
fi
echo "==> system packages: done"
