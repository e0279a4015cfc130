// Client failover with the official Java client: a connection made from an address list
// with automatic recovery loses the compute node it is connected to (SIGKILL), recovers to
// another node in another zone, and finds the durable queue, its binding and every confirmed
// message there; the deliveries it had not acked come back with redelivered=true.

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Address;
import com.rabbitmq.client.BuiltinExchangeType;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DefaultConsumer;
import com.rabbitmq.client.Envelope;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import com.rabbitmq.client.Recoverable;
import com.rabbitmq.client.RecoveryListener;
import com.rabbitmq.client.ShutdownSignalException;

import java.io.IOException;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;

final class FailoverTest {
    static final int MESSAGES = 20;
    static final int HELD = 5;
    /** Hang guard for the failover (the queue's takeover included), not a timing assertion. */
    static final long FAILOVER_DEADLINE_MS = 45_000;

    interface ChannelOp<T> {
        T run(Channel ch) throws Exception;
    }

    /** Run op on a fresh channel until it succeeds: while the queue moves to a new owner an
     *  operation may fail with a channel error (404 "down or inaccessible"), after which a
     *  RabbitMQ client opens a new channel and tries again. */
    static <T> T retry(Connection conn, long deadline, String what, ChannelOp<T> op) throws Exception {
        Exception last = null;
        while (System.currentTimeMillis() < deadline) {
            Channel ch = null;
            try {
                ch = conn.createChannel();
                return op.run(ch);
            } catch (IOException | ShutdownSignalException | RetryableException e) {
                last = e;
                Thread.sleep(200);
            }
        }
        throw new AssertionError(what + ": still failing at the deadline: " + last);
    }

    static final class RetryableException extends Exception {
        RetryableException(String message) {
            super(message);
        }
    }

    static void addressListRecoveryFailsOver() throws Exception {
        WarrenJavaTests.WarrenDev dev = WarrenJavaTests.WarrenDev.start(3, 3);
        try {
            run(dev);
        } finally {
            dev.stop();
        }
    }

    static void run(WarrenJavaTests.WarrenDev dev) throws Exception {
        Address[] addresses = new Address[dev.urls.size()];
        for (int i = 0; i < addresses.length; i++) {
            URI u = new URI(dev.urls.get(i));
            addresses[i] = new Address(u.getHost(), u.getPort());
        }
        ConnectionFactory f = new ConnectionFactory();
        f.setUsername("guest");
        f.setPassword("guest");
        f.setVirtualHost("/");
        f.setConnectionTimeout(5_000);
        f.setHandshakeTimeout(15_000);
        f.setAutomaticRecoveryEnabled(true);
        f.setTopologyRecoveryEnabled(true);
        f.setNetworkRecoveryInterval(500);

        String queue = WarrenJavaTests.unique("java-failover-q");
        String exchange = WarrenJavaTests.unique("java-failover-x");
        String key = "rk";
        Connection conn = f.newConnection(addresses);
        try {
            CountDownLatch recovered = new CountDownLatch(1);
            ((Recoverable) conn).addRecoveryListener(new RecoveryListener() {
                public void handleRecovery(Recoverable r) {
                    recovered.countDown();
                }

                public void handleRecoveryStarted(Recoverable r) {
                }
            });
            int firstPort = conn.getPort();
            String firstNode = "compute-" + portIndex(addresses, firstPort);

            Channel ch = conn.createChannel();
            ch.confirmSelect();
            ch.exchangeDeclare(exchange, BuiltinExchangeType.DIRECT, true);
            ch.queueDeclare(queue, true, false, false, null);
            ch.queueBind(queue, exchange, key);
            AtomicBoolean returned = new AtomicBoolean();
            ch.addReturnListener((code, text, x, rk, props, body) -> returned.set(true));
            List<String> bodies = new ArrayList<>();
            for (int i = 0; i < MESSAGES; i++) {
                String body = "j-" + i;
                bodies.add(body);
                ch.basicPublish(exchange, key, true, MessageProperties.PERSISTENT_BASIC, body.getBytes(StandardCharsets.UTF_8));
            }
            ch.waitForConfirmsOrDie(30_000);
            WarrenJavaTests.check(!returned.get(), "a message was unroutable before the failover");

            // Take HELD deliveries and ack none of them. After the failover the recovered
            // consumer (topology recovery) acks what it gets, and records it with its flag.
            AtomicBoolean failedOver = new AtomicBoolean();
            BlockingQueue<String> held = new LinkedBlockingQueue<>();
            Map<String, Boolean> got = new ConcurrentHashMap<>();
            Channel consumerChannel = conn.createChannel();
            consumerChannel.basicQos(HELD);
            consumerChannel.basicConsume(queue, false, new DefaultConsumer(consumerChannel) {
                @Override
                public void handleDelivery(String tag, Envelope env, AMQP.BasicProperties props, byte[] body) throws IOException {
                    String text = new String(body, StandardCharsets.UTF_8);
                    if (!failedOver.get()) {
                        held.add(env.isRedeliver() ? "redelivered before the failover: " + text : text);
                        return;
                    }
                    got.putIfAbsent(text, env.isRedeliver());
                    getChannel().basicAck(env.getDeliveryTag(), false);
                }
            });
            List<String> first = new ArrayList<>();
            for (int i = 0; i < HELD; i++) {
                String b = held.poll(30, TimeUnit.SECONDS);
                WarrenJavaTests.check(b != null, "only " + first.size() + " deliveries arrived");
                first.add(b);
            }
            WarrenJavaTests.checkEq(bodies.subList(0, HELD), first, "held deliveries");

            failedOver.set(true);
            dev.kill(firstNode);
            long deadline = System.currentTimeMillis() + FAILOVER_DEADLINE_MS;

            WarrenJavaTests.check(recovered.await(FAILOVER_DEADLINE_MS, TimeUnit.MILLISECONDS),
                    "the connection did not recover");
            int secondPort = conn.getPort();
            WarrenJavaTests.check(secondPort != firstPort, "recovered to the killed node's port " + secondPort);

            // The queue is there, and its binding routes a new confirmed message into it.
            retry(conn, deadline, "passive declare", c -> c.queueDeclarePassive(queue));
            retry(conn, deadline, "publish through the binding", c -> {
                AtomicBoolean ret = new AtomicBoolean();
                c.addReturnListener((code, text, x, rk, props, body) -> ret.set(true));
                c.confirmSelect();
                c.basicPublish(exchange, key, true, MessageProperties.PERSISTENT_BASIC, "after".getBytes(StandardCharsets.UTF_8));
                c.waitForConfirmsOrDie(30_000);
                if (ret.get()) throw new RetryableException("unroutable");
                c.close();
                return null;
            });

            // Every confirmed message comes back, to the recovered consumer or to basic.get;
            // the held ones as redelivered.
            retry(conn, deadline, "drain", c -> {
                while (got.size() < MESSAGES + 1) {
                    GetResponse r = c.basicGet(queue, false);
                    if (r == null) {
                        if (System.currentTimeMillis() > deadline) {
                            List<String> missing = new ArrayList<>(bodies);
                            missing.add("after");
                            missing.removeAll(got.keySet());
                            throw new AssertionError("missing after the failover: " + missing);
                        }
                        Thread.sleep(100);
                        continue;
                    }
                    got.putIfAbsent(new String(r.getBody(), StandardCharsets.UTF_8), r.getEnvelope().isRedeliver());
                    c.basicAck(r.getEnvelope().getDeliveryTag(), false);
                }
                return null;
            });
            List<String> expected = new ArrayList<>(bodies);
            expected.add("after");
            WarrenJavaTests.checkEq(new java.util.TreeSet<>(expected), new java.util.TreeSet<>(got.keySet()), "messages after the failover");
            for (String b : first) {
                WarrenJavaTests.check(got.get(b), b + " was held unacked but not flagged redelivered");
            }
            retry(conn, deadline, "clean up", c -> {
                c.queueDelete(queue);
                c.exchangeDelete(exchange);
                return null;
            });
        } finally {
            try {
                conn.abort(5_000);
            } catch (Exception ignored) {
                // already gone
            }
        }
    }

    static int portIndex(Address[] addresses, int port) {
        for (int i = 0; i < addresses.length; i++) {
            if (addresses[i].getPort() == port) return i;
        }
        throw new AssertionError("connected to unknown port " + port);
    }
}
