"""aio-pika (asyncio): a confirmed round trip and a consumer iterator."""

import asyncio

import aio_pika

from conftest import unique


def test_async_round_trip(amqp_url):
    async def main():
        conn = await aio_pika.connect(amqp_url, timeout=15)
        async with conn:
            channel = await conn.channel(publisher_confirms=True)
            queue = await channel.declare_queue(unique("aio"), exclusive=True)
            for i in range(20):
                await channel.default_exchange.publish(
                    aio_pika.Message(body=str(i).encode(), message_id=str(i)),
                    routing_key=queue.name,
                )
            got = []
            async with queue.iterator() as it:
                async for message in it:
                    async with message.process():
                        got.append((message.body, message.message_id))
                    if len(got) == 20:
                        break
            return got

    got = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert got == [(str(i).encode(), str(i)) for i in range(20)]
