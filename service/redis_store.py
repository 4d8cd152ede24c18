"""The service's Redis: a client from a URL, or a real redis-server started for the user.

    FACESET_REDIS_URL=redis://host:6379/0     # a Redis you run
    (unset)                                   # `EmbeddedRedis` starts redis-server, data in state_dir

The embedded server is the machine's `redis-server` (FACESET_REDIS_SERVER or PATH), listening on
a unix socket only (no port to clash with or expose) with its append-only file in
`state_dir/redis`, so templates and galleries survive a restart of the service, and no RDB
snapshots (`FileEraser` rewrites the one file that holds data).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

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


BUSY = ("aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress")  # INFO: a child runs or waits


class FileEraser:
    """Rewrites Redis's files after deletions, so erased data leaves its disk within a bound.

    Redis keeps every write in its append-only file until the file is rewritten, and the data set
    in its RDB snapshot until the next one: a deleted identity's id and vector stay on disk. After
    `erased()`, a background round rewrites the AOF (where it is on) and the RDB snapshot (where
    snapshots are configured), and clears the slow log if it holds our commands (their arguments
    are ids and vectors); at most one round per `interval` s, so a burst of deletions costs one.
    A rewrite writes the data set as it was when it began, so one already running when a deletion
    lands does not cover it: the round waits for it, then starts its own. A server that refuses
    the commands (renamed, denied by an ACL) gets one warning; the README says what to allow.
    """

    def __init__(self, client: aioredis.Redis, prefix: str, interval: float) -> None:
        self.client, self.prefix, self.interval = client, prefix, interval
        self._pending = asyncio.Event()
        self._last = -interval
        self._warned = self._running = False
        self._task: asyncio.Task | None = None

    def erased(self) -> None:
        self._pending.set()

    def start(self) -> None:
        """Runs one round at once too: deletions a stopped or crashed replica had not rewritten yet."""
        self._pending.set()
        self._task = asyncio.create_task(self._run())

    async def stop(self, timeout: float = 30.0) -> None:
        """Cancels the task; a round still owed runs now (bounded), so a deletion is not left to the next start."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._pending.is_set() or self._running:  # owed, or cut short by the cancel
            self._pending.clear()
            try:
                await asyncio.wait_for(self._round(), timeout)
            except asyncio.TimeoutError:
                log.warning("Redis's files were not rewritten within %.0f s of stopping; the next start rewrites them",
                            timeout)

    async def _run(self) -> None:
        while True:
            await self._pending.wait()
            await asyncio.sleep(max(0.0, self._last + self.interval - time.monotonic()))
            self._pending.clear()
            self._last = time.monotonic()
            self._running = True
            await self._round()
            self._running = False

    async def _round(self) -> None:
        try:
            await self.rewrite()
        except ResponseError as exc:  # refused: renamed or denied by an ACL
            if not self._warned:
                log.warning("Redis refused to rewrite its files (%s): deleted data stays in them until Redis "
                            "rewrites them on its own; allow BGREWRITEAOF, BGSAVE, CONFIG GET, INFO and SLOWLOG "
                            "(README, Erasure)", exc)
                self._warned = True
        except (RedisError, OSError) as exc:  # Redis away or the rewrite failed: try again next round
            log.warning("could not rewrite Redis's files (%s: %s); retrying", type(exc).__name__, exc)
            self._pending.set()

    async def rewrite(self) -> None:
        """One round: every kind of file Redis keeps rewritten after now, the slow log cleared of our commands."""
        if (await self.client.info("persistence"))["aof_enabled"]:
            await self._rewrite("BGREWRITEAOF", "aof_last_bgrewrite_status")
        if (await self.client.config_get("save")).get("save"):  # RDB snapshots are configured
            await self._rewrite("BGSAVE", "rdb_last_bgsave_status")
        if any(self.prefix.encode() in e["command"] for e in await self.client.slowlog_get(-1)):
            await self.client.slowlog_reset()

    async def _rewrite(self, command: str, status: str) -> None:
        """Runs `command` after any rewrite under way and waits for it; `status` is its outcome in INFO."""
        while True:
            await self._idle()
            try:
                await self.client.execute_command(command)
                break
            except ResponseError as exc:  # another rewrite started in between: wait for it too
                if "in progress" not in str(exc) and "child process" not in str(exc):
                    raise
        await self._idle()
        if (outcome := (await self.client.info("persistence"))[status]) != "ok":
            raise RedisError(f"{command} ended with status {outcome}")  # e.g. a full disk: retried

    async def _idle(self) -> None:
        while True:
            info = await self.client.info("persistence")
            if not any(info[field] for field in BUSY):
                return
            await asyncio.sleep(0.05)
