"""pika: what a client sees when things go wrong (reply codes as RabbitMQ sends them)."""

import pika
import pika.exceptions
import pytest

from conftest import parse_url, pika_params, unique


def test_passive_declare_of_missing_queue_closes_the_channel_with_404(connection, channel):
    name = unique("missing")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.queue_declare(name, passive=True)
    assert err.value.reply_code == 404
    assert err.value.reply_text.startswith("NOT_FOUND")
    assert name in err.value.reply_text
    assert channel.is_closed
    # Only the channel died: the connection goes on serving.
    assert connection.is_open
    other = connection.channel()
    other.queue_declare(name, exclusive=True, auto_delete=True)
    assert other.queue_declare(name, passive=True).method.message_count == 0


def test_passive_declare_of_missing_exchange_closes_the_channel_with_404(connection, channel):
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.exchange_declare(unique("missing-x"), passive=True)
    assert err.value.reply_code == 404
    assert connection.is_open


def test_mandatory_publish_to_nowhere_is_returned_with_312(channel):
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as err:
        channel.basic_publish("", unique("nobody-home"), b"lost?", mandatory=True)
    (returned,) = err.value.messages
    assert returned.method.reply_code == 312
    assert returned.method.reply_text == "NO_ROUTE"
    assert returned.body == b"lost?"


def test_mandatory_return_without_confirms(connection, channel):
    returned = []
    channel.add_on_return_callback(lambda ch, method, props, body: returned.append((method, body)))
    x = unique("x")
    channel.exchange_declare(x, "direct", auto_delete=True)
    channel.basic_publish(x, "unbound-key", b"bounce", mandatory=True)
    # A synchronous round trip on the same channel: the return precedes its reply.
    channel.exchange_declare(x, passive=True)
    connection.process_data_events(time_limit=0)
    assert len(returned) == 1
    method, body = returned[0]
    assert (method.reply_code, method.reply_text, method.exchange, method.routing_key) == (
        312, "NO_ROUTE", x, "unbound-key")
    assert body == b"bounce"


def test_non_mandatory_publish_to_nowhere_is_dropped_and_confirmed(channel):
    channel.confirm_delivery()
    channel.basic_publish("", unique("nobody-home"), b"dropped")


def test_wrong_credentials_are_refused(amqp_url):
    params = pika_params(amqp_url, credentials=pika.PlainCredentials("guest", "wrong-password"))
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as err:
        pika.BlockingConnection(params)
    assert "ACCESS_REFUSED" in str(err.value)
    assert "403" in str(err.value)
    # The broker still accepts the right credentials.
    pika.BlockingConnection(pika_params(amqp_url)).close()


def test_unknown_vhost_is_refused(amqp_url):
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as err:
        pika.BlockingConnection(pika_params(amqp_url, virtual_host=unique("no-such-vhost")))
    assert "NOT_ALLOWED" in str(err.value)
    assert "530" in str(err.value)


def test_redeclare_with_different_durability_is_406(connection, channel):
    name = unique("q")
    channel.queue_declare(name, durable=False, auto_delete=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.queue_declare(name, durable=True, auto_delete=True)
    assert err.value.reply_code == 406
    assert err.value.reply_text.startswith("PRECONDITION_FAILED")
    connection.channel().queue_delete(name)


def test_ack_of_unknown_delivery_tag_is_406(connection, channel):
    channel.basic_ack(delivery_tag=42)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.queue_declare(unique("after-bad-ack"), exclusive=True)
    assert err.value.reply_code == 406
    assert "unknown delivery tag 42" in err.value.reply_text
    assert connection.is_open
