"""The service's Redis: a client from a URL, or a real redis-server started for the user.

    FACESET_REDIS_URL=redis://host:6379/0     # a Redis you run
    (unset)                                   # `EmbeddedRedis` starts redis-server, data in state_dir

The embedded server is the machine's `redis-server` (FACESET_REDIS_SERVER or PATH), listening on
a unix socket only (no port to clash with or expose) with its append-only file in
`state_dir/redis`, so templates and galleries survive a restart of the service.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

log = logging.getLogger(__name__)


class RedisNotFound(RuntimeError):
    pass


def connect(url: str) -> aioredis.Redis:
    """An asyncio client; short timeouts so a dead Redis answers 503 quickly instead of hanging requests."""
    return aioredis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=15,
                             retry_on_timeout=False)


async def ping(client: aioredis.Redis) -> str:
    """Raises when Redis does not answer; returns a short description when it does."""
    await client.ping()
    return "redis answered PING"


class EmbeddedRedis:
    """A redis-server child process owned by the service (started by `start`, stopped by `stop`)."""

    def __init__(self, state_dir: Path, binary: str | None = None) -> None:
        self.dir = Path(state_dir) / "redis"
        self.binary = binary or os.environ.get("FACESET_REDIS_SERVER") or shutil.which("redis-server")
        self.socket = self.dir / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def start(self, timeout: float = 10.0) -> str:
        if not self.binary:
            raise RedisNotFound("no Redis: set FACESET_REDIS_URL to a Redis server, or install redis-server "
                                "(e.g. apt-get install redis-server) so the service can start one")
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(self.dir), "--appendonly", "yes", "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait(timeout)
        log.info("started embedded redis-server (pid %d) with data in %s", self.process.pid, self.dir)
        return self.url

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace")[-500:]
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err} "
                                       f"(see {self.dir / 'redis.log'})")
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout} s (see {self.dir / 'redis.log'})")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: redis-server flushes its append-only file and exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
