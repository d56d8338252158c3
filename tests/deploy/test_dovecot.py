"""Feedback from where users flag: a real Dovecot (Debian's dovecot-imapd and dovecot-sieve) runs the shipped
IMAPSieve configuration and scripts (deploy/dovecot/) from a temporary directory, in front of a real API on
the session's broker. Moving a message into Junk over IMAP puts a spam flag with the user's identity on the
feedback topic, moving it out a ham flag, moving it to Trash nothing; and the pipe program never fails or
stalls the user's COPY when the API cannot record the flag."""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import consume_all

from services.bench.api_process import ApiProcess
from services.local.daemon import free_port, port_open, tail, wait_for, wait_until
from services.settings import REPO_ROOT, Settings

DEPLOY = REPO_ROOT / "deploy" / "dovecot"
PIPE_PROGRAM = DEPLOY / "flywheel-feedback"
INSTALLED_PREFIX = "/etc/dovecot/flywheel"
SHIPPED_URL = "sieve_env_flywheel_url = http://127.0.0.1:8000"

RELAY_KEY = "test-relay-key-mx1"
RELAY = "mx1"
KEYS = {RELAY_KEY: RELAY, "test-admin-key": "admin", "test-user-key": "carol"}
USERS = {"alice": "alice-secret", "bob": "bob-secret"}


def _tool(name: str, *candidates: str) -> str:
    """The path of a Dovecot program; a clear failure (never a skip) when the packages are missing."""
    found = shutil.which(name) or next((c for c in candidates if os.access(c, os.X_OK)), None)
    if found is None:
        pytest.fail(f"{name} is not installed: run `bash deploy/system-deps.sh` (Debian packages dovecot-imapd "
                    "and dovecot-sieve)", pytrace=False)
    return found


@dataclass(frozen=True)
class Accounts:
    """Who runs what: Dovecot's login and internal users and the unprivileged owner of the mail."""

    login_user: str
    internal_user: str
    mail_user: str
    mail_group: str
    privileged: bool
    """Root: Dovecot chroots its login processes and switches users. Otherwise everything runs as us."""


def _accounts() -> Accounts:
    """As root: the package's dovenull/dovecot users and nobody's mail; otherwise all of it as ourselves."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        return Accounts(me, me, me, grp.getgrgid(os.getegid()).gr_name, privileged=False)
    for user in ("dovenull", "dovecot"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.fail(f"user {user!r} is missing (made by the dovecot-core package): run `bash "
                        "deploy/system-deps.sh`", pytrace=False)
    nobody = pwd.getpwnam("nobody")
    return Accounts("dovenull", "dovecot", "nobody", grp.getgrgid(nobody.pw_gid).gr_name, privileged=True)


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def api(kafka: Settings, corpus: list, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """One API process on the session's broker that knows one relay key (identity ``mx1``)."""
    import random

    from services.bench.api import train_quick_version

    s = kafka.model_copy(update={
        "state_dir": tmp_path_factory.mktemp("dovecot-api-state"), "downloads_dir": kafka.downloads,
        "api_port": free_port(), "spamd_port": free_port(), "workers": 1,
        "api_keys": KEYS, "admin_identities": ["admin"], "relay_identities": [RELAY],
    })
    sub = random.Random(11).sample(corpus, 400)
    train_quick_version(s.registry, [m.raw for m in sub], [m.is_spam for m in sub], seed=5, promote=True)
    with ApiProcess(s, tmp_path_factory.mktemp("dovecot-api-logs") / "api.log").start() as proc:
        yield proc


@dataclass
class Dovecot:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    instance: str

    def log(self, lines: int = 60) -> str:
        return tail(self.root / "dovecot.log", lines) + "\n" + tail(self.root / "master.out", lines)

    def imap(self, user: str) -> imaplib.IMAP4:
        conn = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        conn.login(user, USERS[user])
        return conn


def render_snippet(root: Path, api_url: str) -> str:
    """The shipped 90-flywheel.conf with its install prefix and API address pointed at the test's."""
    text = (DEPLOY / "90-flywheel.conf").read_text()
    assert INSTALLED_PREFIX in text and SHIPPED_URL in text, "90-flywheel.conf no longer has the expected lines"
    return (text.replace(INSTALLED_PREFIX, str(root / "flywheel"))
            .replace(SHIPPED_URL, f"sieve_env_flywheel_url = {api_url}"))


def write_config(root: Path, port: int, instance: str, who: Accounts) -> Path:
    """A self-contained dovecot.conf: loopback IMAP on ``port``, users from a passwd-file, maildirs under
    ``root``, and the shipped Flywheel snippet included as an operator would."""
    (root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items()))
    conf = root / "dovecot.conf"
    # Without root Dovecot cannot chroot or chown its sockets to the dovecot group.
    unprivileged = "" if who.privileged else (
        f"default_internal_group = {who.mail_group}\nservice anvil {{\n  chroot =\n}}\n")
    login_chroot = "" if who.privileged else "  chroot =\n"
    conf.write_text(f"""\
instance_name = {instance}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_login_user = {who.login_user}
default_internal_user = {who.internal_user}
mail_uid = {who.mail_user}
mail_gid = {who.mail_group}
first_valid_uid = 1
first_valid_gid = 1
{unprivileged}mail_location = maildir:{root}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = home={root}/mail/%u
}}
namespace inbox {{
  inbox = yes
  mailbox Junk {{
    special_use = \\Junk
    auto = create
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = create
  }}
}}
service imap-login {{
{login_chroot}  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
!include {root}/90-flywheel.conf
""")
    return conf


def _instance_pids(instance: str) -> list[int]:
    """Live processes of this Dovecot instance (their command lines read ``dovecot-<instance>/...``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes()
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if f"dovecot-{instance}/".encode() in cmd and stat[0] != "Z":
                    out.append(int(entry.name))
    return out


def stop_dovecot(proc: subprocess.Popen[bytes], instance: str) -> None:
    """SIGTERM the master (it stops its children), then make sure nothing of the instance is left."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if wait_for(lambda: not _instance_pids(instance), 10.0):
        return
    left = _instance_pids(instance)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    raise RuntimeError(f"dovecot processes outlived their master (killed now): {left}")


@pytest.fixture(scope="module")
def dovecot(api: ApiProcess) -> Iterator[Dovecot]:
    """Dovecot started from a config in a fresh directory, with the shipped scripts compiled by sievec."""
    dovecot_bin = _tool("dovecot", "/usr/sbin/dovecot")
    sievec = _tool("sievec", "/usr/bin/sievec")
    for part, package in (("imap", "dovecot-imapd"), ("modules/lib95_imap_sieve_plugin.so", "dovecot-sieve")):
        if not (Path("/usr/lib/dovecot") / part).exists():
            pytest.fail(f"/usr/lib/dovecot/{part} is missing: run `bash deploy/system-deps.sh` (Debian package "
                        f"{package})", pytrace=False)
    who = _accounts()
    mail_uid = pwd.getpwnam(who.mail_user).pw_uid
    mail_gid = grp.getgrnam(who.mail_group).gr_gid
    # Not under pytest's tmp_path: that is private to the user running pytest, and the mail user must reach
    # its maildirs, the scripts and the pipe program.
    root = Path(tempfile.mkdtemp(prefix="flywheel-dovecot-"))
    root.chmod(0o755)
    instance = f"flywheel-test-{uuid.uuid4().hex[:8]}"
    proc: subprocess.Popen[bytes] | None = None
    try:
        bin_dir = root / "flywheel" / "bin"
        bin_dir.mkdir(parents=True)
        for script in ("report-spam.sieve", "report-ham.sieve"):
            shutil.copy(DEPLOY / script, root / "flywheel" / script)
        shutil.copy(PIPE_PROGRAM, bin_dir / PIPE_PROGRAM.name)
        (bin_dir / PIPE_PROGRAM.name).chmod(0o755)
        key_file = root / "flywheel" / "relay.key"
        key_file.write_text(RELAY_KEY + "\n")
        # As the README says: readable by the mail user's group, by no one else.
        os.chown(key_file, os.geteuid(), mail_gid)
        key_file.chmod(0o640)
        (root / "mail").mkdir()
        os.chown(root / "mail", mail_uid, mail_gid)
        (root / "90-flywheel.conf").write_text(render_snippet(root, api.base_url))
        port = free_port()
        conf = write_config(root, port, instance, who)
        for script in ("report-spam.sieve", "report-ham.sieve"):
            out = subprocess.run([sievec, "-c", str(conf), str(root / "flywheel" / script)], check=False,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"sievec {script} failed:\n{out.stdout}{out.stderr}"
            assert (root / "flywheel" / script).with_suffix(".svbin").exists()
        with open(root / "master.out", "wb") as master_out:
            proc = subprocess.Popen([dovecot_bin, "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                    stdout=master_out, stderr=subprocess.STDOUT, start_new_session=True)

        def listening() -> bool:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {proc.returncode}:\n" + tail(root / "dovecot.log")
                                   + tail(root / "master.out"))
            return port_open(port)

        wait_until(listening, 30.0, f"dovecot listening on 127.0.0.1:{port}", interval_s=0.1)
        yield Dovecot(root, port, proc, instance)
    finally:
        if proc is not None:
            stop_dovecot(proc, instance)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------- helpers
def make_message(marker: str, sender: str = "offers@example.net") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <user@example.org>\r\nSubject: Your prize {marker}\r\n"
        f"Message-ID: <{marker}@example.net>\r\nDate: Mon, 01 Dec 2025 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Claim your prize now, reference {marker}.\r\nBest offers, zero risk.\r\n"
    ).encode()


def flags_for(settings: Settings, marker: str) -> list[dict[str, Any]]:
    """Feedback events whose message carries ``marker``, in topic order (one message id: one partition)."""
    out = []
    for event in consume_all(settings, settings.topic("feedback")):
        raw = base64.b64decode(event.get("raw") or "")
        if event.get("type") == "feedback" and marker.encode() in raw:
            out.append({**event, "raw_bytes": raw})
    return out


def only_uid(conn: imaplib.IMAP4, mailbox: str, marker: str) -> str:
    typ, _ = conn.select(mailbox)
    assert typ == "OK", f"select {mailbox}: {typ}"
    typ, data = conn.uid("SEARCH", "HEADER", "Subject", marker)
    assert typ == "OK"
    uids = data[0].split()
    assert len(uids) == 1, f"expected one message {marker} in {mailbox}, found {uids}"
    return uids[0].decode()


def move(conn: imaplib.IMAP4, marker: str, src: str, dst: str) -> None:
    uid = only_uid(conn, src, marker)
    typ, data = conn.uid("MOVE", uid, dst)
    assert typ == "OK", f"MOVE {src} -> {dst}: {typ} {data}"


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.integration
def test_moving_into_and_out_of_junk_flags_spam_then_ham(dovecot: Dovecot, api: ApiProcess) -> None:
    settings = api.settings
    log_start = (dovecot.root / "dovecot.log").stat().st_size
    marker = f"fw{uuid.uuid4().hex}"
    msg = make_message(marker)
    conn = dovecot.imap("alice")
    try:
        typ, data = conn.append("INBOX", None, None, msg)
        assert typ == "OK", data
        uid = only_uid(conn, "INBOX", marker)
        typ, data = conn.uid("COPY", uid, "Junk")  # a copy into Junk flags like a move does
        assert typ == "OK", data

        first = wait_until(lambda: flags_for(settings, marker), 30.0, f"a spam flag for {marker}",
                           interval_s=0.3)
        assert len(first) == 1, first
        flag = first[0]
        assert flag["reporter"] == f"{RELAY}:alice"
        assert flag["label"] == "spam"
        assert flag["raw_bytes"] == msg, "the message Flywheel received is not the one the user flagged"
        assert flag["message_id"] == hashlib.sha256(msg).hexdigest()[:32]

        move(conn, marker, "Junk", "Trash")   # deleting spam: no flag
        move(conn, marker, "Trash", "Junk")   # a MOVE into Junk: spam again
        move(conn, marker, "Junk", "INBOX")   # out of Junk: ham

        def settled() -> list[dict[str, Any]] | None:
            got = flags_for(settings, marker)
            return got if len(got) >= 3 and got[-1]["label"] == "ham" else None

        flags = wait_until(settled, 30.0, f"a ham flag for {marker}", interval_s=0.3)
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            conn.logout()
    assert [f["label"] for f in flags] == ["spam", "spam", "ham"], (
        "expected spam (COPY to Junk), nothing (Junk to Trash), spam (Trash to Junk), ham (Junk to INBOX): "
        f"got {[f['label'] for f in flags]}\n{dovecot.log()}")
    assert {f["reporter"] for f in flags} == {f"{RELAY}:alice"}
    assert {f["message_id"] for f in flags} == {flag["message_id"]}
    with open(dovecot.root / "dovecot.log", "rb") as f:
        f.seek(log_start)
        assert b"flywheel-feedback" not in f.read(), dovecot.log()


@pytest.mark.integration
def test_each_imap_user_flags_as_themselves(dovecot: Dovecot, api: ApiProcess) -> None:
    marker = f"fw{uuid.uuid4().hex}"
    conn = dovecot.imap("bob")
    try:
        assert conn.append("INBOX", None, None, make_message(marker, "deals@example.com"))[0] == "OK"
        move(conn, marker, "INBOX", "Junk")
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            conn.logout()
    flags = wait_until(lambda: flags_for(api.settings, marker), 30.0, f"bob's flag for {marker}", interval_s=0.3)
    assert [(f["reporter"], f["label"]) for f in flags] == [(f"{RELAY}:bob", "spam")]


@pytest.mark.integration
def test_a_refused_flag_is_logged_and_the_move_still_succeeds(dovecot: Dovecot, api: ApiProcess) -> None:
    """With a wrong relay key the API answers 401: the user's MOVE succeeds, Dovecot's log says why."""
    key_file = dovecot.root / "flywheel" / "relay.key"
    good = key_file.read_text()
    marker = f"fw{uuid.uuid4().hex}"
    conn = dovecot.imap("alice")
    try:
        key_file.write_text("not-a-key\n")
        assert conn.append("INBOX", None, None, make_message(marker))[0] == "OK"
        move(conn, marker, "INBOX", "Junk")
        only_uid(conn, "Junk", marker)  # the message did move
    finally:
        key_file.write_text(good)
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            conn.logout()
    line = wait_until(
        lambda: next((ln for ln in (dovecot.root / "dovecot.log").read_text().splitlines()
                      if "flywheel-feedback: spam flag for alice not recorded: HTTP 401" in ln), None),
        10.0, "the refusal in Dovecot's log")
    assert "API key" in line


# --------------------------------------------------------------------------------------------- pipe program
def run_pipe(*args: str, stdin: bytes = b"Subject: x\r\n\r\nbody\r\n", timeout_s: float = 30.0
             ) -> subprocess.CompletedProcess[str]:
    # As Dovecot runs it: a bare environment, the system python3, no project venv.
    return subprocess.run([str(PIPE_PROGRAM), *args], check=False, input=stdin.decode(), capture_output=True, text=True,
                          timeout=timeout_s, env={})


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "relay.key"
    p.write_text(RELAY_KEY + "\n")
    return p


@pytest.mark.unit
def test_pipe_program_exits_0_when_the_api_is_down(key_file: Path) -> None:
    port = free_port()  # nothing listens there
    out = run_pipe(f"--url=http://127.0.0.1:{port}", f"--key-file={key_file}", "spam", "alice")
    assert out.returncode == 0
    assert "spam flag for alice not recorded" in out.stderr and "unreachable" in out.stderr


@pytest.mark.unit
def test_pipe_program_gives_up_after_its_timeout(key_file: Path) -> None:
    """An API that accepts the connection and never answers: the program stops at --timeout, exits 0."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # connections complete in the backlog; nothing ever reads or answers
        port = server.getsockname()[1]
        start = time.monotonic()
        out = run_pipe(f"--url=http://127.0.0.1:{port}", f"--key-file={key_file}", "--timeout=1", "ham", "bob")
        took = time.monotonic() - start
    assert out.returncode == 0
    assert "no answer from" in out.stderr or "timed out" in out.stderr, out.stderr
    assert took < 15, f"the program ran {took:.1f}s with --timeout=1"


@pytest.mark.unit
@pytest.mark.parametrize("args, expected", [
    (("spam", "alice smith"), "is not 1..128 characters"),
    (("spam", "x" * 129), "is not 1..128 characters"),
    (("maybe", "alice"), "bad arguments"),
    (("--colour=red", "spam", "alice"), "unknown option"),
    (("--key-file=/nonexistent/relay.key", "spam", "alice"), "cannot read the relay key file"),
])
def test_pipe_program_refuses_bad_input_without_failing(args: tuple[str, ...], expected: str) -> None:
    out = run_pipe(f"--url=http://127.0.0.1:{free_port()}", *args)
    assert out.returncode == 0
    assert expected in out.stderr
    assert "unreachable" not in out.stderr, "it should not have tried to send"


@pytest.mark.unit
def test_pipe_program_skips_a_message_above_its_size_limit(key_file: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 5000
    out = run_pipe(f"--url=http://127.0.0.1:{free_port()}", f"--key-file={key_file}", "--max-bytes=1000",
                   "spam", "alice", stdin=big)
    assert out.returncode == 0
    assert "larger than 1000 bytes" in out.stderr
