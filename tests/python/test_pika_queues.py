"""pika: queue lifecycle and per-queue features (purge, delete, exclusivity, TTL,
dead-lettering, priorities, server-named queues, consumer cancellation)."""

import time

import pika
import pika.exceptions
import pytest

from conftest import drain, pika_params, unique, wait_for


def test_server_named_queue(channel):
    result = channel.queue_declare("", exclusive=True)
    name = result.method.queue
    assert name.startswith("amq.gen-")
    channel.confirm_delivery()
    channel.basic_publish("", name, b"to a generated name")
    assert drain(channel, name) == [b"to a generated name"]


def test_declare_ok_counts_ready_messages_and_consumers(channel):
    q = unique("counts")
    channel.queue_declare(q, exclusive=True)
    channel.confirm_delivery()
    for i in range(3):
        channel.basic_publish("", q, str(i).encode())
    ok = channel.queue_declare(q, passive=True).method
    assert (ok.queue, ok.message_count, ok.consumer_count) == (q, 3, 0)


def test_purge_and_delete_report_message_counts(channel):
    q = unique("purge")
    channel.queue_declare(q)
    channel.confirm_delivery()
    for i in range(5):
        channel.basic_publish("", q, str(i).encode())
    assert channel.queue_purge(q).method.message_count == 5
    assert channel.queue_declare(q, passive=True).method.message_count == 0
    channel.basic_publish("", q, b"left")
    assert channel.queue_delete(q).method.message_count == 1
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.queue_declare(q, passive=True)
    assert err.value.reply_code == 404


def test_delete_if_empty_refuses_a_non_empty_queue(connection, channel):
    q = unique("if-empty")
    channel.queue_declare(q)
    channel.confirm_delivery()
    channel.basic_publish("", q, b"x")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.queue_delete(q, if_empty=True)
    assert err.value.reply_code == 406
    assert connection.channel().queue_delete(q).method.message_count == 1


def test_exclusive_queue_is_locked_to_its_connection(amqp_url, channel):
    q = unique("exclusive")
    channel.queue_declare(q, exclusive=True)
    other = pika.BlockingConnection(pika_params(amqp_url))
    try:
        ch = other.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            ch.queue_declare(q, passive=True)
        assert err.value.reply_code == 405
        assert err.value.reply_text.startswith("RESOURCE_LOCKED")
    finally:
        other.close()


def test_exclusive_queue_goes_with_its_connection(amqp_url, connection):
    q = unique("exclusive-gone")
    owner = pika.BlockingConnection(pika_params(amqp_url))
    owner.channel().queue_declare(q, exclusive=True)
    owner.close()
    # The queue goes once the broker has seen its owner go, which (in RabbitMQ too) may be a
    # moment after connection.close-ok: until then it is still locked (405).
    codes = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ch = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            ch.queue_declare(q, passive=True)
        codes.append(err.value.reply_code)
        if codes[-1] != 405:
            break
        time.sleep(0.05)
    assert codes[-1] == 404, codes
    assert set(codes) <= {404, 405}, codes


def test_publish_to_missing_exchange_closes_the_channel_with_404(connection, channel):
    x = unique("no-such-exchange")
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.basic_publish(x, "k", b"nowhere")
    assert err.value.reply_code == 404
    assert x in err.value.reply_text
    assert connection.is_open


def test_dead_letter_on_reject(channel):
    dlx = unique("dlx")
    dlq = unique("dlq")
    q = unique("work")
    channel.exchange_declare(dlx, "fanout", auto_delete=True)
    channel.queue_declare(dlq, exclusive=True)
    channel.queue_bind(dlq, dlx)
    channel.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": dlx})
    channel.confirm_delivery()
    channel.basic_publish("", q, b"poison", pika.BasicProperties(headers={"attempt": 1}))
    method, _props, _body = channel.basic_get(q, auto_ack=False)
    channel.basic_reject(method.delivery_tag, requeue=False)
    wait_for(lambda: channel.queue_declare(dlq, passive=True).method.message_count == 1,
             channel.connection)
    method, props, body = channel.basic_get(dlq, auto_ack=True)
    assert body == b"poison"
    assert props.headers["attempt"] == 1
    (death,) = props.headers["x-death"]
    assert death["queue"] == q
    assert death["reason"] == "rejected"
    assert death["count"] == 1
    assert death["exchange"] == ""
    assert death["routing-keys"] == [q]


def test_zero_ttl_drops_messages_no_one_is_waiting_for(channel):
    q = unique("ttl0")
    dlq = unique("expired")
    channel.queue_declare(dlq, exclusive=True)
    channel.queue_declare(q, exclusive=True, arguments={
        "x-message-ttl": 0,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dlq,
    })
    channel.confirm_delivery()
    channel.basic_publish("", q, b"too late")
    wait_for(lambda: channel.queue_declare(dlq, passive=True).method.message_count == 1,
             channel.connection)
    assert channel.basic_get(q, auto_ack=True)[0] is None
    _method, props, body = channel.basic_get(dlq, auto_ack=True)
    assert body == b"too late"
    assert props.headers["x-death"][0]["reason"] == "expired"


def test_per_message_expiration_zero(channel):
    q = unique("expiration")
    channel.queue_declare(q, exclusive=True)
    channel.confirm_delivery()
    channel.basic_publish("", q, b"expired", pika.BasicProperties(expiration="0"))
    channel.basic_publish("", q, b"kept")
    assert drain(channel, q) == [b"kept"]


def test_priority_queue_delivers_highest_priority_first(channel):
    q = unique("priority")
    channel.queue_declare(q, exclusive=True, arguments={"x-max-priority": 10})
    channel.confirm_delivery()
    for body, priority in [(b"low", 1), (b"none", None), (b"high", 9), (b"mid", 5),
                           (b"high2", 9), (b"over", 200)]:
        channel.basic_publish("", q, body, pika.BasicProperties(priority=priority))
    # A priority above x-max-priority counts as the maximum (10, above 9); no priority counts
    # as 0; equal priorities keep FIFO order.
    assert drain(channel, q) == [b"over", b"high", b"high2", b"mid", b"low", b"none"]


def test_max_length_drops_from_the_head(channel):
    q = unique("max-length")
    channel.queue_declare(q, exclusive=True, arguments={"x-max-length": 2})
    channel.confirm_delivery()
    for i in range(5):
        channel.basic_publish("", q, str(i).encode())
    assert drain(channel, q) == [b"3", b"4"]


def test_deleting_a_queue_cancels_its_consumers(connection, channel):
    q = unique("cancel-notify")
    channel.queue_declare(q)
    consumer_channel = connection.channel()
    cancelled = []
    consumer_channel.add_on_cancel_callback(lambda frame: cancelled.append(frame.method))
    tag = consumer_channel.basic_consume(q, lambda *args: None)
    channel.queue_delete(q)
    wait_for(lambda: cancelled, connection)
    assert cancelled[0].consumer_tag == tag
    assert consumer_channel.is_open


def test_basic_cancel_stops_deliveries(connection, channel):
    q = unique("cancel")
    channel.queue_declare(q, exclusive=True)
    got = []
    tag = channel.basic_consume(q, lambda ch, m, p, b: got.append(b), auto_ack=True)
    ch2 = connection.channel()
    ch2.confirm_delivery()
    ch2.basic_publish("", q, b"1")
    wait_for(lambda: got == [b"1"], connection)
    channel.basic_cancel(tag)
    ch2.basic_publish("", q, b"2")
    assert ch2.queue_declare(q, passive=True).method.message_count == 1
    assert got == [b"1"]
