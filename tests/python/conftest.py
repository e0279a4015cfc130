"""Shared harness for Warren's Python client tests.

Every test session starts its own ``warren dev`` cluster on free ports in a temporary
directory and kills exactly that process group at the end, unless WARREN_TEST_AMQP_URL
names a running broker (e.g. RabbitMQ from scripts/rabbitmq.sh), which is then used instead.
"""

import os
import pathlib
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid

import pika
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
READY_TIMEOUT = 120.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def normalize_url(url):
    """Read a URL whose path is a lone '/' as naming the default vhost '/'."""
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/%2f"))
    return url


def parse_url(url):
    """(host, port, user, password, vhost) of an amqp:// URL."""
    parts = urllib.parse.urlsplit(url)
    vhost = urllib.parse.unquote(parts.path[1:]) if parts.path else "/"
    return (
        parts.hostname,
        parts.port or 5672,
        urllib.parse.unquote(parts.username or "guest"),
        urllib.parse.unquote(parts.password or "guest"),
        vhost,
    )


class WarrenDev:
    """A `warren dev` cluster in its own process group.

    With ``compute=N`` it runs N compute nodes over ``zones`` zones (``warren dev --compute N
    --zones Z``); ``urls`` then holds one URL per compute node, compute-0 first.
    """

    # Starts tried when a port picked free was taken by another test before the node bound it.
    START_ATTEMPTS = 3

    def __init__(self, compute=1, zones=3, extra_args=()):
        self.compute = compute
        self.zones = zones
        self.bin = os.environ.get("WARREN_BIN", str(ROOT / "target" / "debug" / "warren"))
        if not os.path.exists(self.bin):
            raise RuntimeError(f"{self.bin} not found: run `cargo build -p warren` or set WARREN_BIN")
        for attempt in range(1, self.START_ATTEMPTS + 1):
            try:
                self._start(compute, zones, extra_args)
                return
            except RuntimeError as e:
                if "Address already in use" not in str(e) or attempt == self.START_ATTEMPTS:
                    raise
                print(f"warren dev lost a port to another process; starting again ({e})")

    def _start(self, compute, zones, extra_args):
        self.root = tempfile.mkdtemp(prefix="warren-pytest-")
        self.log_path = os.path.join(self.root, "warren-dev.log")
        self.log = open(self.log_path, "ab")
        # The guard stops the cluster when our end of its stdin closes, even if this process
        # dies without cleaning up.
        self.proc = subprocess.Popen(
            [
                "/bin/sh", str(ROOT / "tests" / "warren-dev-guard.sh"),
                self.bin, "dev",
                "--data-dir", os.path.join(self.root, "data"),
                # Any free ports, held by warren dev until it starts the nodes; the URLs say which.
                "--amqp-port", "0",
                "--http-port", str(free_port()),
            ]
            + (["--compute", str(compute), "--zones", str(zones)] if compute != 1 or zones != 3 else [])
            + list(extra_args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,  # own process group: killed as one
        )
        lines = queue.Queue()

        def read():
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("amqp://"):
                    lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        self.urls = []
        deadline = time.monotonic() + READY_TIMEOUT
        while len(self.urls) < compute:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                tail = self.log_tail()
                port_taken = "Address already in use" in self.log_tail(n=None)
                self.stop()
                cause = " (Address already in use)" if port_taken else ""
                raise RuntimeError(f"warren dev printed no amqp:// URL{cause}; log tail:\n{tail}")
            self.urls.append(normalize_url(line))
        self.url = self.urls[0]

    def pid_of(self, name):
        """The pid `warren dev` recorded for a node, e.g. ``pid_of("compute-1")``."""
        with open(os.path.join(self.root, "data", "run", f"{name}.pid")) as f:
            return int(f.read().strip())

    def zone_of(self, name):
        """The zone of a node (compute-i and storage-i run in zone i mod zones)."""
        i = int(name.rsplit("-", 1)[1])
        return "zone-" + chr(ord("a") + i % self.zones)

    def compute_of_port(self, port):
        """The name of the compute node listening on an AMQP port."""
        for i, url in enumerate(self.urls):
            if parse_url(url)[1] == port:
                return f"compute-{i}"
        raise KeyError(f"no compute node on port {port}")

    def kill(self, name):
        """SIGKILL one node of this cluster and wait until it is gone."""
        pid = self.pid_of(name)
        # Only a member of this cluster's process group, never a recycled pid.
        if os.getpgid(pid) != self.proc.pid:
            raise RuntimeError(f"{name} (pid {pid}) is not part of this cluster")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return
            except (OSError, IndexError):
                return
            time.sleep(0.02)
        raise RuntimeError(f"{name} (pid {pid}) did not die")

    def log_tail(self, n=40):
        """The last ``n`` lines of the cluster's log (all of it with ``n=None``)."""
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
                return "\n".join(lines if n is None else lines[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the guard stops warren dev gracefully
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def amqp_url():
    env = os.environ.get("WARREN_TEST_AMQP_URL")
    if env:
        yield normalize_url(env)
        return
    dev = WarrenDev()
    try:
        yield dev.url
    finally:
        dev.stop()


@pytest.fixture
def cluster3():
    """A fresh three-zone cluster with one compute node per zone, for tests that kill nodes."""
    if os.environ.get("WARREN_TEST_AMQP_URL"):
        pytest.skip("needs process control of a warren dev cluster")
    dev = WarrenDev(compute=3, zones=3)
    try:
        yield dev
    finally:
        dev.stop()


def pika_params(url, **overrides):
    host, port, user, password, vhost = parse_url(url)
    options = dict(
        host=host,
        port=port,
        virtual_host=vhost,
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=1,
        socket_timeout=15,
        stack_timeout=30,
        blocked_connection_timeout=60,
    )
    options.update(overrides)
    return pika.ConnectionParameters(**options)


@pytest.fixture
def connection(amqp_url):
    conn = pika.BlockingConnection(pika_params(amqp_url))
    try:
        yield conn
    finally:
        if conn.is_open:
            conn.close()


@pytest.fixture
def channel(connection):
    return connection.channel()


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def drain(channel, queue_name):
    """Every message now in the queue, by basic.get with auto-ack."""
    bodies = []
    while True:
        method, _props, body = channel.basic_get(queue_name, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)


def wait_for(predicate, connection, timeout=20.0):
    """Process I/O until predicate() holds; fail after timeout (a hang guard, not a timing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        connection.process_data_events(time_limit=0.1)
