"""pika: details real applications depend on (properties and header types, heartbeats,
transactions, competing consumers, reserved names), with RabbitMQ's reply codes."""

import datetime
import decimal
import time

import pika
import pika.exceptions
import pytest

from conftest import drain, pika_params, unique, wait_for


def test_every_basic_property_round_trips(channel):
    q = unique("props")
    channel.queue_declare(q, exclusive=True)
    channel.confirm_delivery()
    stamp = 1_700_000_000
    headers = {
        "str": "text",
        "int": 42,
        "negative": -7,
        "big": 2**40,
        "bool": True,
        "bytes": b"\x00\x01raw",
        "decimal": decimal.Decimal("3.14"),
        "time": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "nested": {"a": 1, "b": ["x", 2, {"c": False}]},
        "list": [1, "two", b"3"],
        "none": None,
    }
    props = pika.BasicProperties(
        content_type="application/json", content_encoding="gzip", headers=headers,
        delivery_mode=2, priority=3, correlation_id="corr-1", reply_to="replies",
        expiration="60000", message_id="msg-1", timestamp=stamp, type="event.created",
        user_id="guest", app_id="warren-tests", cluster_id="c1")
    channel.basic_publish("", q, b"{}", props)
    _method, got, body = channel.basic_get(q, auto_ack=True)
    assert body == b"{}"
    for field in ["content_type", "content_encoding", "delivery_mode", "priority",
                  "correlation_id", "reply_to", "expiration", "message_id", "timestamp",
                  "type", "user_id", "app_id", "cluster_id"]:
        assert getattr(got, field) == getattr(props, field), field
    assert got.headers == headers


def test_user_id_must_match_the_connection_user(connection, channel):
    q = unique("user-id")
    channel.queue_declare(q, exclusive=True)
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.basic_publish("", q, b"x", pika.BasicProperties(user_id="someone-else"))
    assert err.value.reply_code == 406
    assert "someone-else" in err.value.reply_text
    assert connection.is_open


def test_reserved_amq_prefix_is_403(connection, channel):
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.queue_declare("amq.my-queue")
    assert err.value.reply_code == 403
    assert err.value.reply_text.startswith("ACCESS_REFUSED")
    ch = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.exchange_declare("amq.my-exchange", "direct")
    assert err.value.reply_code == 403


def test_predeclared_exchanges_exist(channel):
    for name, kind in [("amq.direct", "direct"), ("amq.fanout", "fanout"),
                       ("amq.topic", "topic"), ("amq.headers", "headers"),
                       ("amq.match", "headers")]:
        channel.exchange_declare(name, kind, passive=True)
        channel.exchange_declare(name, kind, durable=True)


def test_redeclare_exchange_with_another_type_is_406(connection, channel):
    x = unique("x")
    channel.exchange_declare(x, "direct", auto_delete=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.exchange_declare(x, "fanout", auto_delete=True)
    assert err.value.reply_code == 406
    assert err.value.reply_text.startswith("PRECONDITION_FAILED")
    connection.channel().exchange_delete(x)


def test_unknown_exchange_type_is_a_connection_error_503(amqp_url):
    conn = pika.BlockingConnection(pika_params(amqp_url))
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as err:
        ch.exchange_declare(unique("x"), "no-such-type")
    assert err.value.reply_code == 503
    assert err.value.reply_text.startswith("COMMAND_INVALID")


def test_default_exchange_cannot_be_bound(connection, channel):
    q = unique("q")
    channel.queue_declare(q, exclusive=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.queue_bind(q, "", routing_key="x")
    assert err.value.reply_code == 403


def test_transactions_commit_and_rollback(channel):
    q = unique("tx")
    channel.queue_declare(q, exclusive=True)
    channel.tx_select()
    channel.basic_publish("", q, b"rolled back")
    assert channel.queue_declare(q, passive=True).method.message_count == 0
    channel.tx_rollback()
    channel.basic_publish("", q, b"committed")
    channel.tx_commit()
    assert drain(channel, q) == [b"committed"]


def test_competing_consumers_share_and_never_duplicate(amqp_url, channel):
    q = unique("work")
    channel.queue_declare(q)
    try:
        consumers = [pika.BlockingConnection(pika_params(amqp_url)) for _ in range(2)]
        got = {0: [], 1: []}
        for i, conn in enumerate(consumers):
            ch = conn.channel()
            ch.basic_qos(prefetch_count=1)

            def on_message(c, m, p, b, i=i):
                got[i].append(b)
                c.basic_ack(m.delivery_tag)

            ch.basic_consume(q, on_message)
        channel.confirm_delivery()
        n = 200
        for k in range(n):
            channel.basic_publish("", q, str(k).encode())
        deadline = time.monotonic() + 60
        while len(got[0]) + len(got[1]) < n and time.monotonic() < deadline:
            for conn in consumers:
                conn.process_data_events(time_limit=0.01)
        everything = sorted(int(b) for b in got[0] + got[1])
        assert everything == list(range(n)), "lost or duplicated deliveries"
        # Round-robin among consumers with credit: both did part of the work.
        assert got[0] and got[1]
        for part in got.values():
            ids = [int(b) for b in part]
            assert ids == sorted(ids), "each consumer sees queue order"
        for conn in consumers:
            conn.close()
    finally:
        channel.queue_delete(q)


def test_unacked_deliveries_go_to_another_consumer_when_a_connection_dies(amqp_url, channel):
    q = unique("handover")
    channel.queue_declare(q)
    try:
        channel.confirm_delivery()
        for k in range(5):
            channel.basic_publish("", q, str(k).encode())
        first = pika.BlockingConnection(pika_params(amqp_url))
        held = []
        first.channel().basic_consume(q, lambda c, m, p, b: held.append(b))
        wait_for(lambda: len(held) == 5, first)
        first.close()  # never acked
        _m, _p, _b = None, None, None
        again = []
        while len(again) < 5:
            method, _props, body = channel.basic_get(q, auto_ack=True)
            if method is None:
                channel.connection.process_data_events(time_limit=0.05)
                continue
            again.append((body, method.redelivered))
        assert again == [(str(k).encode(), True) for k in range(5)]
    finally:
        channel.queue_delete(q)


def test_heartbeats_keep_an_idle_connection_alive(amqp_url):
    conn = pika.BlockingConnection(pika_params(amqp_url, heartbeat=1))
    try:
        assert conn._impl.params.heartbeat == 1
        # pika drops a connection that hears nothing for a few heartbeat intervals, and the
        # broker drops one whose client stays silent: idle for a while, both must keep it.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.5)
        assert conn.is_open
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q, b"alive")
        assert ch.basic_get(q, auto_ack=True)[2] == b"alive"
    finally:
        if conn.is_open:
            conn.close()


def test_direct_reply_to_rpc(amqp_url, connection, channel):
    """RPC over amq.rabbitmq.reply-to, as Celery's rpc backend and Spring's RabbitTemplate use."""
    requests = unique("rpc")
    channel.queue_declare(requests)
    replies = []
    channel.basic_consume("amq.rabbitmq.reply-to",
                          lambda c, m, p, b: replies.append((b, p.correlation_id)),
                          auto_ack=True)
    channel.basic_publish("", requests, b"2+3", pika.BasicProperties(
        reply_to="amq.rabbitmq.reply-to", correlation_id="call-1"))

    server = pika.BlockingConnection(pika_params(amqp_url))
    try:
        sch = server.channel()
        method, props, body = None, None, None
        deadline = time.monotonic() + 20
        while method is None and time.monotonic() < deadline:
            method, props, body = sch.basic_get(requests, auto_ack=True)
            if method is None:
                server.process_data_events(time_limit=0.05)
        assert body == b"2+3"
        # The broker rewrote reply_to into an address for this one consumer.
        assert props.reply_to.startswith("amq.rabbitmq.reply-to.")
        sch.basic_publish("", props.reply_to, b"5",
                          pika.BasicProperties(correlation_id=props.correlation_id))
        sch.queue_delete(requests)
    finally:
        server.close()
    wait_for(lambda: replies, connection)
    assert replies == [(b"5", "call-1")]
