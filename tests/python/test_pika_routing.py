"""pika: routing through each exchange type."""

import pika
import pika.exceptions
import pytest

from conftest import drain, unique


def setup_queues(channel, exchange, kind, bindings):
    """Declare an exchange and one queue per binding list; return {label: queue name}."""
    channel.exchange_declare(exchange, kind, auto_delete=True)
    names = {}
    for label, keys in bindings.items():
        q = unique(label)
        channel.queue_declare(q, exclusive=True, auto_delete=True)
        for key, arguments in keys:
            channel.queue_bind(q, exchange, routing_key=key, arguments=arguments)
        names[label] = q
    return names


def test_default_exchange_routes_by_queue_name(channel):
    channel.confirm_delivery()
    q = unique("q")
    channel.queue_declare(q, exclusive=True, auto_delete=True)
    channel.basic_publish("", q, b"direct to queue")
    assert drain(channel, q) == [b"direct to queue"]


def test_direct_exchange(channel):
    channel.confirm_delivery()
    x = unique("direct")
    qs = setup_queues(channel, x, "direct", {
        "orange": [("orange", None)],
        "black-green": [("black", None), ("green", None)],
        "also-orange": [("orange", None)],
    })
    for key in ["orange", "black", "green", "blue", "ORANGE"]:
        channel.basic_publish(x, key, key.encode())
    assert drain(channel, qs["orange"]) == [b"orange"]
    assert drain(channel, qs["black-green"]) == [b"black", b"green"]
    assert drain(channel, qs["also-orange"]) == [b"orange"]


def test_fanout_exchange_ignores_routing_key(channel):
    channel.confirm_delivery()
    x = unique("fanout")
    qs = setup_queues(channel, x, "fanout", {"a": [("", None)], "b": [("ignored", None)]})
    channel.basic_publish(x, "anything", b"1")
    channel.basic_publish(x, "", b"2")
    assert drain(channel, qs["a"]) == [b"1", b"2"]
    assert drain(channel, qs["b"]) == [b"1", b"2"]


def test_topic_exchange_wildcards(channel):
    channel.confirm_delivery()
    x = unique("topic")
    qs = setup_queues(channel, x, "topic", {
        "star": [("*.orange.*", None)],
        "hash": [("lazy.#", None), ("*.*.rabbit", None)],
        "all": [("#", None)],
        "exact": [("quick.orange.rabbit", None)],
    })
    keys = ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox",
            "lazy.brown.fox", "lazy.pink.rabbit", "quick.brown.fox",
            "orange", "quick.orange.male.rabbit", "lazy.orange.male.rabbit", "lazy", ""]
    for key in keys:
        channel.basic_publish(x, key, key.encode())
    assert drain(channel, qs["star"]) == [b"quick.orange.rabbit", b"lazy.orange.elephant",
                                          b"quick.orange.fox"]
    # lazy.pink.rabbit matches both bindings of one queue but is delivered once.
    assert drain(channel, qs["hash"]) == [b"quick.orange.rabbit", b"lazy.orange.elephant",
                                          b"lazy.brown.fox", b"lazy.pink.rabbit",
                                          b"lazy.orange.male.rabbit", b"lazy"]
    assert drain(channel, qs["all"]) == [k.encode() for k in keys]
    assert drain(channel, qs["exact"]) == [b"quick.orange.rabbit"]


def test_headers_exchange_all_and_any(channel):
    channel.confirm_delivery()
    x = unique("headers")
    qs = setup_queues(channel, x, "headers", {
        "all": [("", {"x-match": "all", "format": "pdf", "type": "report"})],
        "any": [("", {"x-match": "any", "format": "zip", "type": "log"})],
        "default-all": [("", {"format": "pdf"})],
    })
    def publish(body, headers):
        channel.basic_publish(x, "ignored", body, pika.BasicProperties(headers=headers))

    publish(b"pdf-report", {"format": "pdf", "type": "report"})
    publish(b"pdf-log", {"format": "pdf", "type": "log"})
    publish(b"zip-report", {"format": "zip", "type": "report"})
    publish(b"none", {})
    publish(b"no-headers", None)
    assert drain(channel, qs["all"]) == [b"pdf-report"]
    assert drain(channel, qs["any"]) == [b"pdf-log", b"zip-report"]
    assert drain(channel, qs["default-all"]) == [b"pdf-report", b"pdf-log"]


def test_unbind_stops_routing(channel):
    channel.confirm_delivery()
    x = unique("direct")
    qs = setup_queues(channel, x, "direct", {"q": [("k", None), ("k2", None)]})
    channel.basic_publish(x, "k", b"before")
    channel.queue_unbind(qs["q"], x, routing_key="k")
    channel.basic_publish(x, "k", b"after")
    channel.basic_publish(x, "k2", b"still bound")
    assert drain(channel, qs["q"]) == [b"before", b"still bound"]


def test_auto_delete_exchange_goes_with_its_last_binding(connection, channel):
    x = unique("direct")
    qs = setup_queues(channel, x, "direct", {"q": [("k", None)]})
    channel.exchange_declare(x, passive=True)
    channel.queue_unbind(qs["q"], x, routing_key="k")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        channel.exchange_declare(x, passive=True)
    assert err.value.reply_code == 404


def test_exchange_to_exchange_binding(channel):
    channel.confirm_delivery()
    src, dst = unique("src"), unique("dst")
    channel.exchange_declare(src, "topic", auto_delete=True)
    qs = setup_queues(channel, dst, "fanout", {"q": [("", None)]})
    channel.exchange_bind(destination=dst, source=src, routing_key="a.*")
    channel.basic_publish(src, "a.b", b"yes")
    channel.basic_publish(src, "b.a", b"no")
    assert drain(channel, qs["q"]) == [b"yes"]
