"""Real Redis deployments for tests: a three-master Cluster and a Sentinel-watched pair.

    with RedisCluster3(tmp_path) as cluster:     # 3 masters, all 16384 slots, cluster_state:ok
        cluster.url                              # "redis+cluster://127.0.0.1:p1,...:p2,...:p3"
        cluster.nodes[0].client()                # a sync client of one node

    with SentinelDeployment(tmp_path) as deployment:  # master, replica, one sentinel
        deployment.url                           # "redis+sentinel://127.0.0.1:<port>/egress-test"
        deployment.master.port                   # the node the sentinel names now
        deployment.failover()                    # SENTINEL FAILOVER; returns once swapped

Every process listens on loopback only, writes nothing but its log (and the files Cluster and
Sentinel keep their state in) under the test's directory, and is stopped by its pid (SIGTERM,
then SIGKILL) whatever happens, a failed start-up included. The methods block: from a
coroutine, call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from tests.polling import wait_until
from tests.redisserver import RedisServer, _free_port

__all__ = [
    "SERVICE",
    "RedisCluster3",
    "SentinelDeployment",
    "redis_cluster_fixture",
    "sentinel_deployment_fixture",
]

SERVICE = "egress-test"
"""The master's name in the sentinel's config (the service of :attr:`SentinelDeployment.url`)."""

SLOTS = 16384
READY_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 20.0


_QUICK_SYNC = ("--repl-diskless-sync-delay", "0")  # a replica syncs at once, not after 5 s


class _ConfiguredServer(RedisServer):
    """A ``redis-server`` started with extra arguments (or a config file first)."""

    def __init__(
        self, directory: Path, *, extra: Sequence[str] = (), config: Path | None = None
    ) -> None:
        super().__init__(directory)
        self.extra = list(extra)
        self.config = config

    def _spawn(self, port: int) -> None:
        executable = shutil.which("redis-server")
        assert executable is not None, "redis-server is not installed (apt-get install redis)"
        self._port_trying = port
        head = [executable] if self.config is None else [executable, str(self.config)]
        self.proc = subprocess.Popen(
            [
                *head,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(self.log_path),
                *self.extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _info(client: redis.Redis, section: str) -> dict[str, str]:
    """``INFO``/``CLUSTER INFO`` text as a dict (the sync client parses INFO; not CLUSTER)."""
    raw = client.execute_command(*section.split())  # type: ignore[no-untyped-call]
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


class _Deployment:
    """Start several servers in order; stop them all (by pid), whatever happened."""

    servers: list[RedisServer]

    def stop(self) -> None:
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.stop()

    def _start_all(self, servers: Sequence[RedisServer]) -> None:
        for server in servers:
            self.servers.append(server)
            server.start()

    def _logs(self) -> str:
        return "\n".join(f"{s.directory.name}: {s._log_tail()[-600:]}" for s in self.servers)


class RedisCluster3(_Deployment):
    """Three ``--cluster-enabled`` masters on loopback, joined by ``redis-cli --cluster create``
    (no replicas), ready once every node says ``cluster_state:ok``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers = []
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisCluster3:
        try:
            for index in range(3):
                node = _ConfiguredServer(
                    self.directory / f"node{index}",
                    extra=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                        # The bus port is another free port, not port + 10000 (which may be
                        # taken or above 65535).
                        "--cluster-port",
                        str(_free_port()),
                    ],
                )
                self._start_all([node])
                self.nodes.append(node)
            self._create()
            wait_until(
                self._ready,
                "every cluster node reports cluster_state:ok with 3 masters",
                timeout=READY_TIMEOUT_S,
                every=0.05,
                detail=self._logs,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        executable = shutil.which("redis-cli")
        assert executable is not None, "redis-cli is not installed (apt-get install redis)"
        done = subprocess.run(
            [
                executable,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=READY_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"redis-cli --cluster create exited {done.returncode}:"
                f" {done.stdout.decode(errors='replace')[-1500:]}"
                f" {done.stderr.decode(errors='replace')[-500:]}"
            )

    def _ready(self) -> bool:
        for node in self.nodes:
            with node.client() as client:
                info = _info(client, "CLUSTER INFO")
            if info.get("cluster_state") != "ok" or info.get("cluster_size") != "3":
                return False
            if info.get("cluster_known_nodes") != "3":
                return False
        return True

    def masters(self) -> list[tuple[int, int]]:
        """``(port, slots served)`` of each master, as the first node sees the cluster."""
        with self.nodes[0].client() as client:
            shards = client.execute_command("CLUSTER", "SLOTS")
        served: dict[int, int] = {}
        for start, end, primary, *_replicas in shards:
            port = int(primary[1])
            served[port] = served.get(port, 0) + int(end) - int(start) + 1
        return sorted(served.items())

    def __enter__(self) -> RedisCluster3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SentinelDeployment(_Deployment):
    """A master, its replica (``--replicaof``), and one sentinel watching them with quorum 1
    and short timeouts, ready once the sentinel knows the replica and the replica is in sync.
    :attr:`master` and :attr:`replica` follow :meth:`failover`."""

    def __init__(self, directory: Path, *, down_after_ms: int = 1000) -> None:
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.servers = []
        self.master: RedisServer = _ConfiguredServer(directory / "a", extra=_QUICK_SYNC)
        self.replica: RedisServer = RedisServer(directory / "b")  # replaced at start
        self.sentinel: RedisServer = RedisServer(directory / "sentinel")  # replaced at start

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{SERVICE}"

    def start(self) -> SentinelDeployment:
        try:
            self._start_all([self.master])
            self.replica = _ConfiguredServer(
                self.directory / "b",
                extra=[*_QUICK_SYNC, "--replicaof", "127.0.0.1", str(self.master.port)],
            )
            self._start_all([self.replica])
            config = self.directory / "sentinel" / "sentinel.conf"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(  # the sentinel rewrites this file with what it learns
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinel = _ConfiguredServer(config.parent, config=config, extra=["--sentinel"])
            self._start_all([self.sentinel])
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def sentinel_client(self) -> redis.Redis:
        return self.sentinel.client()

    def master_port(self) -> int:
        """The master's port as the sentinel reports it now."""
        with self.sentinel_client() as client:
            _host, port = client.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def wait_ready(self) -> None:
        """Until the sentinel names :attr:`master`, knows :attr:`replica` as a healthy replica
        of it, no failover is in progress, and the replica's link to the master is up."""
        wait_until(
            self._ready,
            f"sentinel names 127.0.0.1:{self.master.port} as master with a synced replica",
            timeout=READY_TIMEOUT_S,
            every=0.05,
            detail=self._logs,
            ignoring=(redis.exceptions.ConnectionError,),
        )

    def failover(self) -> float:
        """``SENTINEL FAILOVER``, then wait until the sentinel names the replica as master and
        the replica says it is one. Swaps :attr:`master` and :attr:`replica`; returns the
        seconds the switch took as seen from here."""
        self.wait_ready()
        started = time.monotonic()
        with self.sentinel_client() as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        promoted = self.replica
        wait_until(
            lambda: self.master_port() == promoted.port and self._role(promoted) == "master",
            f"sentinel promotes 127.0.0.1:{promoted.port}",
            timeout=FAILOVER_TIMEOUT_S,
            every=0.02,
            detail=self._logs,
            ignoring=(redis.exceptions.ConnectionError,),
        )
        took = time.monotonic() - started
        self.master, self.replica = promoted, self.master
        return took

    def _ready(self) -> bool:
        with self.sentinel_client() as client:
            state = client.sentinel_master(SERVICE)
            replicas = client.sentinel_slaves(SERVICE)
        if int(state["port"]) != self.master.port or state["is_sdown"] or state["is_odown"]:
            return False
        if "failover" in str(state["flags"]):
            return False
        ours = [r for r in replicas if int(r["port"]) == self.replica.port]
        if not ours or ours[0]["is_sdown"] or ours[0].get("role-reported") != "slave":
            return False
        if ours[0].get("master-link-status") != "ok":
            return False
        with self.replica.client() as client:
            info = _info(client, "INFO replication")
        return info.get("master_link_status") == "up" and info.get("master_port") == str(
            self.master.port
        )

    def _role(self, server: RedisServer) -> str:
        with server.client() as client:
            return _info(client, "INFO replication").get("role", "")

    def __enter__(self) -> SentinelDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(name="redis_cluster")
def redis_cluster_fixture(tmp_path: Path) -> Iterator[RedisCluster3]:
    """A fresh three-master cluster for one test."""
    with RedisCluster3(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture(name="sentinel_deployment")
def sentinel_deployment_fixture(tmp_path: Path) -> Iterator[SentinelDeployment]:
    """A fresh master, replica and sentinel for one test."""
    with SentinelDeployment(tmp_path / "sentinel") as deployment:
        yield deployment
