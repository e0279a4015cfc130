"""kombu (the AMQP layer under Celery): producer and consumer through a topic exchange."""

import kombu

from conftest import parse_url, unique


def kombu_connection(url):
    host, port, user, password, vhost = parse_url(url)
    return kombu.Connection(hostname=host, port=port, userid=user, password=password,
                            virtual_host=vhost, transport="pyamqp", connect_timeout=15)


def test_topic_round_trip_like_celery(amqp_url):
    exchange = kombu.Exchange(unique("celery-like"), type="topic", durable=True,
                              auto_delete=True)
    tasks = kombu.Queue(unique("tasks"), exchange=exchange, routing_key="tasks.#",
                        auto_delete=True)
    other = kombu.Queue(unique("other"), exchange=exchange, routing_key="reports.*",
                        auto_delete=True)
    received = []
    with kombu_connection(amqp_url) as conn:
        with conn.channel() as channel:
            producer = kombu.Producer(channel, exchange=exchange)

            def on_message(body, message):
                received.append((message.delivery_info["routing_key"], body,
                                 message.content_type))
                message.ack()

            with kombu.Consumer(channel, queues=[tasks, other], callbacks=[on_message],
                                accept=["json"]):
                producer.publish({"task": "add", "args": [2, 3]}, routing_key="tasks.add",
                                 serializer="json", declare=[tasks, other],
                                 delivery_mode=2, retry=False)
                producer.publish({"task": "mul", "args": [4, 5]},
                                 routing_key="tasks.math.mul", serializer="json",
                                 retry=False)
                producer.publish({"ignored": True}, routing_key="nobody.cares",
                                 serializer="json", retry=False)
                producer.publish({"report": 1}, routing_key="reports.daily",
                                 serializer="json", retry=False)
                while len(received) < 3:
                    conn.drain_events(timeout=30)
    by_key = {key: (body, ctype) for key, body, ctype in received}
    assert by_key == {
        "tasks.add": ({"task": "add", "args": [2, 3]}, "application/json"),
        "tasks.math.mul": ({"task": "mul", "args": [4, 5]}, "application/json"),
        "reports.daily": ({"report": 1}, "application/json"),
    }
    # Per queue, order is publish order.
    assert [k for k, _, _ in received if k.startswith("tasks.")] == ["tasks.add",
                                                                     "tasks.math.mul"]


def test_simple_queue_get(amqp_url):
    with kombu_connection(amqp_url) as conn:
        name = unique("simple")
        q = conn.SimpleQueue(name, queue_opts={"auto_delete": True})
        try:
            q.put({"hello": "world"}, serializer="json")
            msg = q.get(block=True, timeout=30)
            assert msg.payload == {"hello": "world"}
            msg.ack()
            assert q.qsize() == 0
        finally:
            q.close()
