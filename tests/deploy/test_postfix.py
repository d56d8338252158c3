"""A real MTA in front: Debian's Postfix and spamass-milter run from a temporary configuration (their own config,
queue and data directories, loopback ports chosen free, nothing system-wide), with Flywheel's spamd listener as
the milter's spamd. Mail sent over SMTP is delivered to a maildir with Flywheel's verdict headers (X-Spam-Flag,
X-Spam-Status), and on the listener whose milter has a reject score (``spamass-milter -r``) spam at or above it is
refused with an SMTP 5xx while ham still goes through.

Postfix's master must run as root (it opens its ports and switches to the ``postfix`` user), so the test needs
root, as ``make test`` runs here; the system's own Postfix service is neither needed nor touched."""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import random
import shutil
import signal
import smtplib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path

import pytest

from services.bench.api_process import ApiProcess
from services.local.daemon import free_port, port_open, tail, wait_until
from services.settings import Settings

pytestmark = pytest.mark.integration

DOMAIN = "flywheel.test"
RECIPIENT = f"alice@{DOMAIN}"
REJECT_SCORE = 6  # spamass-milter -r: an integer on spamd's scale (Flywheel's threshold is 5, its top 10)


def _tool(name: str, *candidates: str) -> str:
    """The path of a program from the packages; a clear failure (never a skip) when they are missing."""
    found = shutil.which(name) or next((c for c in candidates if os.access(c, os.X_OK)), None)
    if found is None:
        pytest.fail(f"{name} is not installed: run `bash deploy/system-deps.sh` (Debian packages postfix and "
                    "spamass-milter)", pytrace=False)
    return found


@pytest.fixture(scope="module")
def api(kafka: Settings, corpus: list, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """One API process with its spamd listener and a model trained on part of the corpus."""
    from services.bench.api import train_quick_version

    s = kafka.model_copy(update={
        "state_dir": tmp_path_factory.mktemp("postfix-api-state"), "downloads_dir": kafka.downloads,
        "api_port": free_port(), "spamd_port": free_port(), "workers": 1,
    })
    sub = random.Random(21).sample(corpus, 700)
    train_quick_version(s.registry, [m.raw for m in sub], [m.is_spam for m in sub], seed=21, promote=True)
    with ApiProcess(s, tmp_path_factory.mktemp("postfix-api-logs") / "api.log").start() as proc:
        yield proc


def _spamd_score(api: ApiProcess, raw: bytes) -> float:
    """What spamc reports for ``raw`` ("score/threshold"): how the messages below are chosen."""
    out = subprocess.run([_tool("spamc"), "-d", "127.0.0.1", "-p", str(api.settings.spamd_port), "-c"],
                         input=raw, capture_output=True, timeout=60)
    return float(out.stdout.decode().split("/", 1)[0])


@pytest.fixture(scope="module")
def mail(api: ApiProcess, corpus: list) -> dict[str, bytes]:
    """A real ham message Flywheel calls ham, and a real spam message it scores at or above the reject score."""
    rng = random.Random(5)
    hams = [m.raw for m in corpus if not m.is_spam and "easy" in m.group and 1000 < len(m.raw) < 20000]
    spams = [m.raw for m in corpus if m.is_spam and 2000 < len(m.raw) < 20000]
    ham = next((r for r in rng.sample(hams, 20) if _spamd_score(api, r) < 4.0), None)
    spam = next((r for r in rng.sample(spams, 20) if _spamd_score(api, r) >= REJECT_SCORE + 1), None)
    assert ham is not None and spam is not None, "no corpus message scored as the test needs"
    return {"ham": ham, "spam": spam}


@dataclass
class Mta:
    root: Path
    tag_port: int  # smtpd whose milter only adds headers
    reject_port: int  # smtpd whose milter also rejects at REJECT_SCORE
    maildir: Path

    def log(self) -> str:
        return "\n".join(tail(p, 40) for p in sorted(self.root.glob("*.log")))

    def delivered(self) -> list[bytes]:
        new = self.maildir / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


_SERVICES = """\
pickup    unix  n  -  n  60  1  pickup
cleanup   unix  n  -  n  -   0  cleanup
qmgr      unix  n  -  n  300 1  qmgr
rewrite   unix  -  -  n  -   -  trivial-rewrite
bounce    unix  -  -  n  -   0  bounce
defer     unix  -  -  n  -   0  bounce
trace     unix  -  -  n  -   0  bounce
verify    unix  -  -  n  -   1  verify
flush     unix  n  -  n  1000? 0 flush
proxymap  unix  -  -  n  -   -  proxymap
smtp      unix  -  -  n  -   -  smtp
relay     unix  -  -  n  -   -  smtp
showq     unix  n  -  n  -   -  showq
error     unix  -  -  n  -   -  error
retry     unix  -  -  n  -   -  error
discard   unix  -  -  n  -   -  discard
virtual   unix  -  n  n  -   -  virtual
anvil     unix  -  -  n  -   1  anvil
scache    unix  -  -  n  -   1  scache
postlog   unix-dgram n - n - 1  postlogd
"""


def write_postfix_config(root: Path, tag_port: int, reject_port: int, tag_milter: int, reject_milter: int) -> Path:
    """main.cf and master.cf of a loopback-only Postfix that delivers ``RECIPIENT`` to a maildir under ``root``;
    each smtpd listener names its own milter (the lines an operator adds to main.cf are in deploy/postfix/)."""
    cfg = root / "cfg"
    cfg.mkdir()
    nobody = pwd.getpwnam("nobody")
    (cfg / "mailboxes").write_text(f"{RECIPIENT} alice/\n")
    (cfg / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = texthash:{cfg}/mailboxes
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
milter_default_action = tempfail
milter_protocol = 6
smtputf8_enable = no
biff = no
maillog_file_prefixes = {root}
maillog_file = {root}/postfix.log
""")
    (cfg / "master.cf").write_text(
        f"127.0.0.1:{tag_port} inet n - n - - smtpd -o smtpd_milters=inet:127.0.0.1:{tag_milter}\n"
        f"127.0.0.1:{reject_port} inet n - n - - smtpd -o smtpd_milters=inet:127.0.0.1:{reject_milter}\n"
        + _SERVICES)
    (root / "queue").mkdir()
    (root / "data").mkdir()
    (root / "mail").mkdir()
    postfix = pwd.getpwnam("postfix")
    os.chown(root / "data", postfix.pw_uid, postfix.pw_gid)
    os.chown(root / "mail", nobody.pw_uid, nobody.pw_gid)
    return cfg


def _stop(proc: subprocess.Popen[bytes], stop: list[str] | None = None, pid_file: Path | None = None) -> None:
    """Stop one process this test started: its own stop command (Postfix), else SIGTERM; then wait for it. For
    Postfix the master's pid file is read too: a master still starting when ``stop`` ran is sent SIGTERM."""
    if stop is not None:
        subprocess.run(stop, capture_output=True, timeout=60)
    elif proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if pid_file is None:
        return
    with contextlib.suppress(FileNotFoundError, ValueError):
        master = int(pid_file.read_text().strip())
        with contextlib.suppress(ProcessLookupError):
            os.kill(master, signal.SIGTERM)
            wait_until(lambda: not Path(f"/proc/{master}").exists(), 30, f"Postfix master {master} to exit")


@pytest.fixture(scope="module")
def mta(api: ApiProcess) -> Iterator[Mta]:
    """Postfix (``postfix start-fg`` on a temporary config directory) with two spamass-milters in front of
    Flywheel's spamd: one tags only, one also rejects at ``REJECT_SCORE``. Everything stops at the end."""
    if os.geteuid() != 0:
        pytest.skip("Postfix's master runs as root (make test runs as root here)")
    postfix = _tool("postfix", "/usr/sbin/postfix")
    milter = _tool("spamass-milter", "/usr/sbin/spamass-milter")
    _tool("spamc")
    root = Path(tempfile.mkdtemp(prefix="flywheel-postfix-"))
    root.chmod(0o755)  # the postfix and nobody users walk into it
    procs: list[tuple[subprocess.Popen[bytes], list[str] | None, Path | None]] = []
    try:
        tag_port, reject_port, tag_milter, reject_milter = (free_port() for _ in range(4))
        cfg = write_postfix_config(root, tag_port, reject_port, tag_milter, reject_milter)
        spamd = ["--", "-d", "127.0.0.1", "-p", str(api.settings.spamd_port)]
        for port, extra, name in ((tag_milter, [], "tag"), (reject_milter, ["-r", str(REJECT_SCORE)], "reject")):
            with (root / f"milter-{name}.log").open("wb") as out:
                procs.append((subprocess.Popen([milter, "-p", f"inet:{port}@127.0.0.1", *extra, *spamd],
                                               stdout=out, stderr=subprocess.STDOUT), None, None))
        check = subprocess.run([postfix, "-c", str(cfg), "check"], capture_output=True, timeout=60)
        assert check.returncode == 0, check.stderr.decode() + tail(root / "postfix.log", 20)
        with (root / "master.log").open("wb") as out:
            procs.append((subprocess.Popen([postfix, "-c", str(cfg), "start-fg"], stdout=out,
                                           stderr=subprocess.STDOUT), [postfix, "-c", str(cfg), "stop"],
                          root / "queue" / "pid" / "master.pid"))
        m = Mta(root, tag_port, reject_port, root / "mail" / "alice")
        for port in (tag_port, reject_port, tag_milter, reject_milter):
            wait_until(functools.partial(port_open, port), 60, f"port {port}")
        yield m
    finally:
        for proc, stop, pid_file in reversed(procs):
            _stop(proc, stop, pid_file)
        shutil.rmtree(root, ignore_errors=True)


def _send(port: int, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        refused = smtp.sendmail("sender@example.org", [RECIPIENT], raw)
        assert refused == {}


def _wait_delivered(mta: Mta, n: int) -> list[bytes]:
    wait_until(lambda: len(mta.delivered()) >= n, 60, f"{n} delivered messages ({mta.log()})")
    return mta.delivered()


def _subject(raw: bytes) -> str:
    return str(message_from_bytes(raw).get("Subject", ""))


def test_delivered_mail_carries_flywheel_verdict_headers(mta: Mta, mail: dict[str, bytes]) -> None:
    before = len(mta.delivered())
    _send(mta.tag_port, mail["ham"])
    _send(mta.tag_port, mail["spam"])
    got = _wait_delivered(mta, before + 2)[before:]
    by_subject = {_subject(raw): message_from_bytes(raw) for raw in got}
    ham = by_subject[_subject(mail["ham"])]
    spam = by_subject[_subject(mail["spam"])]
    assert str(ham["X-Spam-Status"]).startswith("No,"), ham["X-Spam-Status"]
    assert ham["X-Spam-Flag"] is None
    assert str(spam["X-Spam-Status"]).startswith("Yes,"), spam["X-Spam-Status"]
    assert str(spam["X-Spam-Flag"]).strip() == "YES"
    assert "Flywheel" in str(spam["X-Spam-Checker-Version"])
    assert " required=5.0" in str(spam["X-Spam-Status"])


def test_spam_at_or_above_the_reject_score_gets_an_smtp_5xx(mta: Mta, mail: dict[str, bytes]) -> None:
    before = len(mta.delivered())
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _send(mta.reject_port, mail["spam"])
    assert 500 <= refused.value.smtp_code < 600, refused.value
    _send(mta.reject_port, mail["ham"])  # the same listener still delivers ham
    got = _wait_delivered(mta, before + 1)[before:]
    assert [_subject(r) for r in got] == [_subject(mail["ham"])]
