"""pika: publishing, consuming, acknowledgements, basic.get, requeue, confirms."""

import time

import pika
import pytest

from conftest import drain, unique, wait_for


def declare_temp_queue(channel, name=None):
    name = name or unique("q")
    # Exclusive: gone with the connection. Not auto-delete, which would delete it as soon
    # as its last consumer is cancelled.
    channel.queue_declare(name, exclusive=True)
    return name


def test_publish_consume_ack(connection, channel):
    q = declare_temp_queue(channel)
    for i in range(10):
        channel.basic_publish("", q, f"m{i}".encode())
    got = []

    def on_message(ch, method, _props, body):
        got.append((body, method.redelivered))
        ch.basic_ack(method.delivery_tag)

    tag = channel.basic_consume(q, on_message)
    wait_for(lambda: len(got) == 10, connection)
    assert got == [(f"m{i}".encode(), False) for i in range(10)]
    channel.basic_cancel(tag)
    # Everything was acked: nothing is left to redeliver.
    assert channel.queue_declare(q, passive=True).method.message_count == 0


def test_unacked_messages_return_when_the_channel_closes(connection):
    ch = connection.channel()
    q = declare_temp_queue(ch)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"once")
    consumer = connection.channel()
    method, _props, body = consumer.basic_get(q, auto_ack=False)
    assert body == b"once" and not method.redelivered
    consumer.close()
    # The broker requeues once it has processed the close; poll rather than race it.
    method = None
    deadline = time.monotonic() + 20
    while method is None and time.monotonic() < deadline:
        method, _props, body = ch.basic_get(q, auto_ack=True)
        if method is None:
            time.sleep(0.05)
    assert body == b"once"
    assert method.redelivered


def test_publisher_confirms(channel):
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    for i in range(100):
        # BlockingChannel.basic_publish waits for the broker's basic.ack and raises on nack.
        channel.basic_publish("", q, str(i).encode(), pika.BasicProperties(delivery_mode=2))
    assert channel.queue_declare(q, passive=True).method.message_count == 100
    assert drain(channel, q) == [str(i).encode() for i in range(100)]


def test_basic_get_and_get_empty(channel):
    q = declare_temp_queue(channel)
    method, props, body = channel.basic_get(q, auto_ack=True)
    assert (method, props, body) == (None, None, None)
    channel.confirm_delivery()
    channel.basic_publish("", q, b"a", pika.BasicProperties(content_type="text/plain",
                                                            headers={"k": "v"}))
    channel.basic_publish("", q, b"b")
    method, props, body = channel.basic_get(q, auto_ack=True)
    assert body == b"a"
    assert method.message_count == 1
    assert props.content_type == "text/plain"
    assert props.headers == {"k": "v"}
    method, _props, body = channel.basic_get(q, auto_ack=True)
    assert body == b"b" and method.message_count == 0
    assert channel.basic_get(q, auto_ack=True)[0] is None


@pytest.mark.parametrize("how", ["nack", "reject"])
def test_requeue_marks_redelivered(channel, how):
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    channel.basic_publish("", q, b"first")
    channel.basic_publish("", q, b"second")
    method, _props, body = channel.basic_get(q, auto_ack=False)
    assert body == b"first" and not method.redelivered
    if how == "nack":
        channel.basic_nack(method.delivery_tag, requeue=True)
    else:
        channel.basic_reject(method.delivery_tag, requeue=True)
    method, _props, body = channel.basic_get(q, auto_ack=False)
    # A requeued message goes back to its place at the head of the queue.
    assert body == b"first"
    assert method.redelivered
    channel.basic_ack(method.delivery_tag)
    method, _props, body = channel.basic_get(q, auto_ack=True)
    assert body == b"second" and not method.redelivered


def test_nack_without_requeue_drops_the_message(channel):
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    channel.basic_publish("", q, b"gone")
    method, _props, _body = channel.basic_get(q, auto_ack=False)
    channel.basic_nack(method.delivery_tag, requeue=False)
    assert channel.basic_get(q, auto_ack=True)[0] is None


def test_prefetch_limits_unacked_deliveries(connection, channel):
    q = declare_temp_queue(channel)
    channel.confirm_delivery()
    for i in range(10):
        channel.basic_publish("", q, str(i).encode())
    consumer = connection.channel()
    consumer.basic_qos(prefetch_count=3)
    got = []
    consumer.basic_consume(q, lambda ch, m, p, b: got.append((m.delivery_tag, b)))
    wait_for(lambda: len(got) >= 3, connection)
    # With 3 unacked deliveries out, the rest stays ready in the queue.
    connection.process_data_events(time_limit=0.5)
    assert [b for _, b in got] == [b"0", b"1", b"2"]
    assert channel.queue_declare(q, passive=True).method.message_count == 7
    # Each ack frees one slot of credit: exactly one more delivery.
    consumer.basic_ack(got[0][0])
    wait_for(lambda: len(got) >= 4, connection)
    connection.process_data_events(time_limit=0.5)
    assert [b for _, b in got] == [b"0", b"1", b"2", b"3"]
    assert channel.queue_declare(q, passive=True).method.message_count == 6
    # A multiple ack of everything frees all three remaining slots.
    consumer.basic_ack(got[-1][0], multiple=True)
    wait_for(lambda: len(got) >= 7, connection)
    connection.process_data_events(time_limit=0.5)
    assert [b for _, b in got] == [str(i).encode() for i in range(7)]


def test_ten_thousand_messages_arrive_in_order(connection, channel):
    q = declare_temp_queue(channel)
    n = 10_000
    for i in range(n):
        channel.basic_publish("", q, str(i).encode())
    consumer = connection.channel()
    consumer.basic_qos(prefetch_count=500)
    got = []

    def on_message(ch, method, _props, body):
        got.append(body)
        if len(got) % 100 == 0:
            ch.basic_ack(method.delivery_tag, multiple=True)

    consumer.basic_consume(q, on_message)
    wait_for(lambda: len(got) >= n, connection, timeout=150)
    assert got == [str(i).encode() for i in range(n)]


def test_large_message_with_small_frame_max(amqp_url):
    import os

    from conftest import pika_params

    conn = pika.BlockingConnection(pika_params(amqp_url, frame_max=4096))
    try:
        assert conn._impl.params.frame_max == 4096
        ch = conn.channel()
        q = declare_temp_queue(ch)
        ch.confirm_delivery()
        body = os.urandom(5 * 1024 * 1024)
        ch.basic_publish("", q, body)
        method, _props, got = ch.basic_get(q, auto_ack=True)
        assert method is not None
        assert len(got) == len(body)
        assert got == body
    finally:
        conn.close()
