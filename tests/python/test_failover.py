"""Client failover across compute nodes: a client configured with every compute node's
address loses the node it is connected to (SIGKILL) and carries on through another one, where
the durable queue, its binding and every confirmed message are still there; the deliveries it
had not acked come back with redelivered=True.

Warren lists the live compute nodes in the ``warren_cluster_nodes`` server property, but
RabbitMQ clients do not follow it on their own: failover comes from the address list a client
is given, or from one load-balanced name.
pika takes a list of ConnectionParameters and tries them in order on every connect (the
application reconnects); kombu takes ``amqp://a;amqp://b;...`` with a failover strategy and
switches hosts inside ``ensure``. aio-pika's RobustConnection reconnects to the one URL it
was given, so it fails over behind one load-balanced name (emulated here by a small TCP proxy
that sends each new connection to the first node that accepts it).
"""

import asyncio
import time

import aio_pika
import aio_pika.exceptions
import amqp.exceptions
import pika
import pika.exceptions
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from conftest import parse_url, pika_params, unique

# Hang guard for a failover (a takeover of the queue after the kill included), not a timing
# assertion: every step loops until it succeeds or this runs out.
FAILOVER_DEADLINE = 45.0
MESSAGES = 20
HELD = 5


def connect_any(urls, deadline):
    """Connect through an address list, as an application would: pika tries each address in
    turn; the application retries the whole list until its deadline."""
    params = [
        pika_params(url, connection_attempts=1, socket_timeout=5, blocked_connection_timeout=30)
        for url in urls
    ]
    while True:
        try:
            return pika.BlockingConnection(params)
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def connected_port(conn):
    """The AMQP port of the node a pika connection reached."""
    return conn._impl.params.port


def retry(what, deadline, conn, fn):
    """Run fn(channel) on a fresh channel until it succeeds: while the queue moves to a new
    owner, an operation may fail with a channel error, after which RabbitMQ clients open a new
    channel and try again. A mandatory publish that comes back unroutable is tried again too:
    a node learns of bindings made through another node within its topology refresh."""
    last = None
    while time.monotonic() < deadline:
        ch = conn.channel()
        try:
            return ch, fn(ch)
        except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.UnroutableError) as e:
            last = e
            if ch.is_open:
                ch.close()
            time.sleep(0.2)
    raise AssertionError(f"{what}: still failing at the deadline: {last!r}")


@pytest.mark.timeout(120)
def test_pika_address_list_fails_over_with_queue_binding_and_unacked_messages(cluster3):
    queue_name, exchange, key = unique("failover-q"), unique("failover-x"), "rk"
    bodies = [f"m-{i}".encode() for i in range(MESSAGES)]

    conn = connect_any(cluster3.urls, time.monotonic() + 30)
    first_node = cluster3.compute_of_port(connected_port(conn))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.exchange_declare(exchange, "direct", durable=True)
    ch.queue_declare(queue_name, durable=True)
    ch.queue_bind(queue_name, exchange, key)
    for body in bodies:
        # With confirms on, basic_publish returns only once the broker acked the message,
        # and raises on a nack or (mandatory) when it was unroutable.
        ch.basic_publish(
            exchange, key, body, pika.BasicProperties(delivery_mode=2), mandatory=True
        )

    # Take HELD deliveries and ack none of them.
    ch.basic_qos(prefetch_count=HELD)
    held = []
    ch.basic_consume(queue_name, lambda _c, m, _p, b: held.append((m, b)), auto_ack=False)
    deadline = time.monotonic() + 30
    while len(held) < HELD:
        assert time.monotonic() < deadline, f"only {len(held)} deliveries arrived"
        conn.process_data_events(time_limit=0.1)
    assert [b for _m, b in held] == bodies[:HELD]
    assert not any(m.redelivered for m, _b in held)

    cluster3.kill(first_node)

    # The client notices the loss of its node.
    deadline = time.monotonic() + 30
    with pytest.raises(pika.exceptions.AMQPError):
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)
    assert not conn.is_open

    deadline = time.monotonic() + FAILOVER_DEADLINE
    conn = connect_any(cluster3.urls, deadline)
    try:
        second_node = cluster3.compute_of_port(connected_port(conn))
        assert second_node != first_node
        assert cluster3.zone_of(second_node) != cluster3.zone_of(first_node)

        # The queue is there, and the binding routes a new confirmed message into it.
        retry("passive declare", deadline, conn, lambda c: c.queue_declare(queue_name, passive=True))

        def publish_after(c):
            c.confirm_delivery()
            c.basic_publish(
                exchange, key, b"after", pika.BasicProperties(delivery_mode=2), mandatory=True
            )

        retry("publish through the binding", deadline, conn, publish_after)

        # Every confirmed message comes back; the held ones as redelivered.
        got = {}

        def drain(c):
            while len(got) < MESSAGES + 1:
                method, _props, body = c.basic_get(queue_name, auto_ack=False)
                if method is None:
                    assert time.monotonic() < deadline, f"missing: {sorted(set(bodies) - set(got))}"
                    time.sleep(0.1)
                    continue
                # At least once: a delivery abandoned by a channel error (retried below)
                # comes again; the first one tells whether it was redelivered.
                got.setdefault(body, method.redelivered)
                c.basic_ack(method.delivery_tag)

        ch, _ = retry("drain", deadline, conn, drain)
        assert set(got) == set(bodies) | {b"after"}
        assert all(got[b] for b in bodies[:HELD]), got
        method, _p, _b = ch.basic_get(queue_name, auto_ack=True)
        assert method is None, "the queue holds more than was published"
        ch.queue_delete(queue_name)
        ch.exchange_delete(exchange)
    finally:
        if conn.is_open:
            conn.close()


@pytest.mark.timeout(120)
def test_kombu_failover_urls_switch_host_and_keep_queue_and_messages(cluster3):
    queue_name, exchange_name, key = unique("kombu-failover-q"), unique("kombu-failover-x"), "rk"
    exchange = Exchange(exchange_name, type="direct", durable=True)
    queue = Queue(queue_name, exchange=exchange, routing_key=key, durable=True)
    conn = Connection(
        ";".join(cluster3.urls),
        failover_strategy="round-robin",
        transport_options={"confirm_publish": True},
        connect_timeout=5,
    )
    try:
        conn.ensure_connection(max_retries=10, interval_start=0.2, interval_step=0.2)
        first_port = int(conn.host.rsplit(":", 1)[1])
        first_node = cluster3.compute_of_port(first_port)

        producer = Producer(conn.default_channel, exchange=exchange, routing_key=key)
        queue(conn.default_channel).declare()
        publish = conn.ensure(
            producer, producer.publish, max_retries=30, interval_start=0.2, interval_step=0.2,
            interval_max=1,
        )
        bodies = [f"k-{i}" for i in range(MESSAGES)]
        for body in bodies:
            publish(body, delivery_mode=2, serializer="json")

        cluster3.kill(first_node)

        # The next publish meets the dead connection; ensure switches to the next URL,
        # reconnects and publishes there (declaring the queue and its binding first, as
        # kombu applications do, so the new node routes it whatever its topology cache holds).
        deadline = time.monotonic() + FAILOVER_DEADLINE
        while True:
            try:
                publish("after", delivery_mode=2, serializer="json", declare=[queue])
                break
            except amqp.exceptions.NotFound:
                # 404 "down or inaccessible" while the queue moves to a new owner, as
                # RabbitMQ answers for a queue whose node is down: retry on a new channel.
                assert time.monotonic() < deadline, "the queue never came back"
                time.sleep(0.2)
                producer.revive(conn.channel())
        second_port = int(conn.host.rsplit(":", 1)[1])
        assert second_port != first_port

        got = []

        def on_message(body, message):
            got.append(body)
            message.ack()

        with Consumer(conn.channel(), queues=[queue], callbacks=[on_message], accept=["json"]):
            while len(got) < MESSAGES + 1:
                assert time.monotonic() < deadline, f"missing: {sorted(set(bodies + ['after']) - set(got))}"
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
        assert sorted(got) == sorted(bodies + ["after"])
        queue(conn.default_channel).delete()
        exchange(conn.default_channel).delete()
    finally:
        conn.release()


@pytest.mark.timeout(120)
def test_transient_queues_are_shared_and_go_with_their_node(cluster3):
    """A non-durable queue declared through one node is used through another; an exclusive
    one is locked (405) to every other connection; when their node is killed, both are gone
    and a client that fails over declares them afresh, as against a RabbitMQ cluster that
    loses the node of a transient queue."""
    transient, exclusive = unique("transient-q"), unique("exclusive-q")
    home = pika.BlockingConnection(pika_params(cluster3.urls[0]))
    other = pika.BlockingConnection(pika_params(cluster3.urls[1]))
    try:
        ch = home.channel()
        ch.confirm_delivery()
        ch.queue_declare(transient)
        ch.queue_declare(exclusive, exclusive=True)
        for i in range(3):
            ch.basic_publish("", transient, f"t-{i}".encode())

        och = other.channel()
        och.confirm_delivery()
        assert och.queue_declare(transient, passive=True).method.message_count == 3
        och.basic_publish("", transient, b"t-3")
        och.basic_publish("", exclusive, b"for the owner")
        got = []
        for _ in range(4):
            method, _props, body = och.basic_get(transient, auto_ack=True)
            assert method is not None
            got.append(body)
        assert got == [b"t-0", b"t-1", b"t-2", b"t-3"]
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as locked:
            other.channel().queue_declare(exclusive, passive=True)
        assert locked.value.reply_code == 405
        method, _props, body = ch.basic_get(exclusive, auto_ack=True)
        assert body == b"for the owner"

        cluster3.kill("compute-0")

        # Declared again through the survivor: the declaration waits until the dead node
        # is known to be gone, then both queues are new and empty.
        och = other.channel()
        assert och.queue_declare(transient).method.message_count == 0
        assert och.queue_declare(exclusive, exclusive=True).method.message_count == 0
        och.confirm_delivery()
        och.basic_publish("", exclusive, b"mine now")
        method, _props, body = och.basic_get(exclusive, auto_ack=True)
        assert body == b"mine now"
        och.queue_delete(transient)
    finally:
        for conn in (home, other):
            try:
                if conn.is_open:
                    conn.close()
            except pika.exceptions.AMQPError:
                pass


def advertised_nodes(url):
    """The `warren_cluster_nodes` server property a fresh connection to `url` announces."""
    conn = pika.BlockingConnection(pika_params(url, connection_attempts=1, socket_timeout=5))
    try:
        value = conn._impl.server_properties.get("warren_cluster_nodes", "")
    finally:
        conn.close()
    if isinstance(value, bytes):
        value = value.decode()
    return set(filter(None, value.split(",")))


@pytest.mark.timeout(120)
def test_server_properties_advertise_the_live_compute_nodes(cluster3):
    addrs = {f"127.0.0.1:{parse_url(url)[1]}" for url in cluster3.urls}
    # Every node joins the membership shortly after it starts listening.
    deadline = time.monotonic() + 30
    while advertised_nodes(cluster3.urls[1]) != addrs:
        assert time.monotonic() < deadline, advertised_nodes(cluster3.urls[1])
        time.sleep(0.2)

    cluster3.kill("compute-0")
    # Once its lease lapses, the dead node leaves the list every other node advertises.
    deadline = time.monotonic() + 30
    expected = addrs - {f"127.0.0.1:{parse_url(cluster3.urls[0])[1]}"}
    for url in cluster3.urls[1:]:
        while advertised_nodes(url) != expected:
            assert time.monotonic() < deadline, advertised_nodes(url)
            time.sleep(0.2)


class LoadBalancer:
    """One name in front of every compute node, as a TCP load balancer gives clients: each
    new connection goes to the first node that accepts it."""

    def __init__(self, ports):
        self.ports = list(ports)
        self.last_port = None
        self.server = None
        self.tasks = set()

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, client_reader, client_writer):
        for port in self.ports:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            self.last_port = port
            for task in (
                asyncio.create_task(self._pipe(client_reader, writer)),
                asyncio.create_task(self._pipe(reader, client_writer)),
            ):
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            return
        client_writer.close()

    @staticmethod
    async def _pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self):
        self.server.close()
        for task in list(self.tasks):
            task.cancel()


@pytest.mark.timeout(120)
def test_aio_pika_robust_connection_behind_one_name_fails_over(cluster3):
    queue_name, exchange_name, key = unique("aio-failover-q"), unique("aio-failover-x"), "rk"
    bodies = [f"a-{i}".encode() for i in range(MESSAGES)]

    async def main():
        lb = LoadBalancer(parse_url(url)[1] for url in cluster3.urls)
        port = await lb.start()
        conn = await aio_pika.connect_robust(
            f"amqp://guest:guest@127.0.0.1:{port}/%2f", timeout=10, reconnect_interval=0.5
        )
        try:
            first_node = cluster3.compute_of_port(lb.last_port)
            channel = await conn.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=HELD)
            exchange = await channel.declare_exchange(
                exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
            )
            queue = await channel.declare_queue(queue_name, durable=True)
            await queue.bind(exchange, key)
            for body in bodies:
                await exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=key,
                    mandatory=True,
                )

            held, got = [], {}
            failed_over = asyncio.Event()

            async def on_message(message):
                if not failed_over.is_set():
                    held.append((message.body, message.redelivered))
                    return
                got.setdefault(message.body, message.redelivered)
                await message.ack()

            await queue.consume(on_message)
            deadline = time.monotonic() + 30
            while len(held) < HELD:
                assert time.monotonic() < deadline, f"only {len(held)} deliveries arrived"
                await asyncio.sleep(0.05)
            assert held == [(b, False) for b in bodies[:HELD]]

            failed_over.set()
            cluster3.kill(first_node)

            # The robust connection reconnects through the same name, reaches another node,
            # and restores its channel, exchange, queue, binding and consumer there.
            deadline = time.monotonic() + FAILOVER_DEADLINE
            while True:
                try:
                    await exchange.publish(
                        aio_pika.Message(b"after", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=key,
                        mandatory=True,
                        timeout=5,
                    )
                    break
                except (aio_pika.exceptions.AMQPError, asyncio.TimeoutError, ConnectionError, RuntimeError) as e:
                    assert time.monotonic() < deadline, f"publishing after the failover: {e!r}"
                    await asyncio.sleep(0.2)
            assert cluster3.compute_of_port(lb.last_port) != first_node
            while len(got) < MESSAGES + 1:
                missing = sorted((set(bodies) | {b"after"}) - set(got))
                assert time.monotonic() < deadline, f"missing after the failover: {missing}"
                await asyncio.sleep(0.05)
            assert set(got) == set(bodies) | {b"after"}
            assert all(got[b] for b in bodies[:HELD]), got
            await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()
        finally:
            await conn.close()
            await lb.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=110))
