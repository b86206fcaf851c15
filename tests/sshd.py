"""A throwaway OpenSSH server on 127.0.0.1 for tests that need a real SSH remote.

`start_sshd(tmp)` generates a host key and a client key with ssh-keygen, writes its own sshd_config
(public keys only, no PAM, everything under tmp), starts Debian's /usr/sbin/sshd on a free port and waits
for its banner. `SSHServer.stop()` ends it. `require_sshd()` finds the binaries or, when absent, fails the
test under CI (CI=true) and skips it elsewhere: CI must never pass by silently skipping the SSH round trip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SBIN_PATH = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/usr/bin", os.environ.get("PATH", "")])
INSTALL_HINT = "install Debian's OpenSSH server: apt-get install -y openssh-server (.ci/run does this in CI)"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_sshd() -> tuple[str, str]:
    """Absolute paths of sshd and ssh-keygen; fail under CI, skip elsewhere, when either is missing."""
    if sys.platform == "win32":  # skipped under CI too: the remote round trip is tested on POSIX hosts
        pytest.skip("POSIX only: the SSH remote test runs Debian's OpenSSH sshd; not run on Windows")
    sshd = shutil.which("sshd", path=SBIN_PATH)
    keygen = shutil.which("ssh-keygen", path=SBIN_PATH)
    if sshd and keygen and sys.platform != "win32":
        return str(Path(sshd).resolve()), keygen
    missing = "sshd" if not sshd else "ssh-keygen" if not keygen else "a POSIX sshd"
    message = f"SSH remote test needs {missing} (looked in {SBIN_PATH}); {INSTALL_HINT}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass
class SSHServer:
    host: str
    port: int
    user: str
    client_key: Path  # private key accepted by the server
    host_public_key: str  # "ssh-ed25519 AAAA..." of the throwaway host key
    log: Path
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace", encoding="utf-8") if self.log.exists() else ""


def _keygen(keygen: str, path: Path, comment: str) -> None:
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_banner(port: int, process: subprocess.Popen, timeout: float) -> bool:
    """True once the server answers with an SSH banner; False if it exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def start_sshd(tmp: Path, attempts: int = 3, timeout: float = 15.0) -> SSHServer:
    """Start sshd for the current user; retried on another port if the chosen one got taken meanwhile."""
    sshd, keygen = require_sshd()
    tmp.mkdir(parents=True, exist_ok=True)
    host_key, client_key = tmp / "host_ed25519", tmp / "client_ed25519"
    _keygen(keygen, host_key, "throwaway-test-host")
    _keygen(keygen, client_key, "throwaway-test-client")
    authorized = tmp / "authorized_keys"
    authorized.write_text((tmp / "client_ed25519.pub").read_text(encoding="utf-8"), encoding="utf-8")
    import pwd  # POSIX only, like sshd itself

    user = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        # sshd started as root insists on its privilege separation directory, which only the
        # package's service unit creates; an empty root-owned folder is all it needs.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    errors = []
    for attempt in range(attempts):
        port = _free_port()
        config = tmp / "sshd_config"
        config.write_text(
            "\n".join([
                f"ListenAddress 127.0.0.1:{port}",
                f"HostKey {host_key}",
                f"PidFile {tmp / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",  # keys live in a world-readable tmp folder
                "PermitRootLogin prohibit-password",  # CI runs as root; keys only
                "Subsystem sftp internal-sftp",  # DVC talks SFTP; no dependency on sftp-server's path
                "LogLevel VERBOSE",
                "",
            ]),
            encoding="utf-8",
        )
        log = tmp / f"sshd-{attempt}.log"
        # -D: stay in the foreground so we own the process; -e: log to stderr (our log file).
        with log.open("wb") as log_file:
            process = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                       stdout=log_file, stderr=subprocess.STDOUT)
        server = SSHServer("127.0.0.1", port, user, client_key,
                           (tmp / "host_ed25519.pub").read_text(encoding="utf-8").strip(), log, process)
        if _wait_for_banner(port, process, timeout):
            return server
        server.stop()
        errors.append(f"port {port}: {server.log_text().strip() or 'no output'}")
    raise RuntimeError(f"sshd ({sshd}) did not start after {attempts} attempts:\n" + "\n".join(errors))
