// Warren client tests with the official RabbitMQ Java client (com.rabbitmq.client), run by a
// tiny self-contained runner: no build tool, no downloads. Every test runs against a
// `warren dev` cluster this program starts (its own process group, killed at the end), or
// against WARREN_TEST_AMQP_URL when set.

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.AuthenticationFailureException;
import com.rabbitmq.client.BuiltinExchangeType;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DefaultConsumer;
import com.rabbitmq.client.Envelope;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import com.rabbitmq.client.ShutdownSignalException;

import java.io.BufferedReader;
import java.io.File;
import java.io.IOException;
import java.io.InputStreamReader;
import java.net.ServerSocket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.UUID;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

public final class WarrenJavaTests {
    interface Body {
        void run() throws Exception;
    }

    static final long TEST_TIMEOUT_SECONDS = 120;
    static String url;

    public static void main(String[] args) throws Exception {
        WarrenDev dev = null;
        String env = System.getenv("WARREN_TEST_AMQP_URL");
        int passed = 0;
        int failed = 0;
        try {
            if (env != null && !env.isEmpty()) {
                url = normalizeUrl(env);
            } else {
                dev = WarrenDev.start();
                url = dev.url;
            }
            Map<String, Body> tests = new LinkedHashMap<>();
            tests.put("publish_consume_ack_with_confirms", WarrenJavaTests::publishConsumeAckWithConfirms);
            tests.put("direct_routing", WarrenJavaTests::directRouting);
            tests.put("fanout_routing", WarrenJavaTests::fanoutRouting);
            tests.put("basic_get_and_get_empty", WarrenJavaTests::basicGet);
            tests.put("five_megabyte_message_small_frame_max", WarrenJavaTests::largeMessage);
            tests.put("passive_declare_missing_queue_is_404", WarrenJavaTests::passiveDeclareMissing);
            tests.put("wrong_credentials_are_refused", WarrenJavaTests::wrongCredentials);
            tests.put("mandatory_publish_to_nowhere_is_returned_312", WarrenJavaTests::mandatoryReturn);
            tests.put("deleting_a_queue_cancels_its_consumer", WarrenJavaTests::consumerCancelNotification);
            tests.put("qos_and_multiple_ack", WarrenJavaTests::qosAndMultipleAck);
            if (env == null || env.isEmpty()) {
                // Needs process control of its own three-node cluster.
                tests.put("address_list_recovery_fails_over_with_queue_binding_and_unacked_messages",
                        FailoverTest::addressListRecoveryFailsOver);
            }
            ExecutorService pool = Executors.newCachedThreadPool(r -> {
                Thread t = new Thread(r);
                t.setDaemon(true);
                return t;
            });
            for (Map.Entry<String, Body> test : tests.entrySet()) {
                Future<?> f = pool.submit(() -> {
                    test.getValue().run();
                    return null;
                });
                try {
                    f.get(TEST_TIMEOUT_SECONDS, TimeUnit.SECONDS);
                    System.out.println("PASS java::" + test.getKey());
                    passed++;
                } catch (TimeoutException e) {
                    f.cancel(true);
                    System.out.println("FAIL java::" + test.getKey() + ": timed out after " + TEST_TIMEOUT_SECONDS + "s");
                    failed++;
                } catch (java.util.concurrent.ExecutionException e) {
                    System.out.println("FAIL java::" + test.getKey() + ": " + e.getCause());
                    e.getCause().printStackTrace(System.out);
                    failed++;
                }
            }
        } catch (Exception e) {
            System.out.println("FAIL java::setup: " + e);
            failed++;
        } finally {
            if (dev != null) dev.stop();
        }
        System.out.println("java: " + passed + " passed, " + failed + " failed");
        System.exit(failed == 0 ? 0 : 1);
    }

    // ---- harness ----------------------------------------------------------------------

    static String normalizeUrl(String u) {
        u = u.trim();
        int afterScheme = u.indexOf("://") + 3;
        int slash = u.indexOf('/', afterScheme);
        if (slash == -1) return u + "/%2f";
        if (slash == u.length() - 1) return u + "%2f";
        return u;
    }

    static int freePort() throws IOException {
        try (ServerSocket s = new ServerSocket(0, 1, java.net.InetAddress.getLoopbackAddress())) {
            return s.getLocalPort();
        }
    }

    static final class WarrenDev {
        Process process;
        Path root;
        String url;
        /** One URL per compute node, compute-0 first. */
        List<String> urls = new ArrayList<>();

        static WarrenDev start() throws Exception {
            return start(1, 3);
        }

        /** A cluster of `compute` compute nodes over `zones` zones (`warren dev --compute --zones`). */
        static WarrenDev start(int compute, int zones) throws Exception {
            WarrenDev dev = new WarrenDev();
            dev.root = Files.createTempDirectory("warren-java-");
            String bin = System.getenv("WARREN_BIN");
            if (bin == null || bin.isEmpty()) {
                bin = new File("target/debug/warren").getAbsolutePath();
            }
            if (!new File(bin).exists()) {
                throw new IllegalStateException(bin + " not found: run `cargo build -p warren` or set WARREN_BIN");
            }
            File log = dev.root.resolve("warren-dev.log").toFile();
            // setsid: its own process group, so exactly this cluster is killed at the end. The
            // guard stops the cluster when our end of its stdin closes, even if the JVM dies.
            List<String> command = new ArrayList<>(Arrays.asList("setsid", "/bin/sh",
                    new File("tests/warren-dev-guard.sh").getAbsolutePath(), bin, "dev",
                    "--data-dir", dev.root.resolve("data").toString(),
                    // Any free ports, held by warren dev until it starts the nodes; the URLs say which.
                    "--amqp-port", "0",
                    "--http-port", String.valueOf(freePort())));
            if (compute != 1 || zones != 3) {
                command.addAll(Arrays.asList("--compute", String.valueOf(compute), "--zones", String.valueOf(zones)));
            }
            ProcessBuilder pb = new ProcessBuilder(command);
            pb.redirectError(ProcessBuilder.Redirect.appendTo(log));
            dev.process = pb.start();
            CompletableFuture<List<String>> ready = new CompletableFuture<>();
            Thread reader = new Thread(() -> {
                List<String> seen = new ArrayList<>();
                try (BufferedReader r = new BufferedReader(new InputStreamReader(dev.process.getInputStream(), StandardCharsets.UTF_8))) {
                    String line;
                    while ((line = r.readLine()) != null) {
                        if (line.trim().startsWith("amqp://")) {
                            seen.add(normalizeUrl(line.trim()));
                            if (seen.size() == compute) ready.complete(seen);
                        }
                    }
                } catch (IOException ignored) {
                    // the process went away
                }
                ready.completeExceptionally(new IllegalStateException("warren dev closed its output"));
            });
            reader.setDaemon(true);
            reader.start();
            try {
                dev.urls = ready.get(120, TimeUnit.SECONDS);
                dev.url = dev.urls.get(0);
            } catch (Exception e) {
                String tail = tail(log);
                dev.stop();
                throw new IllegalStateException("warren dev printed no amqp:// URL (" + e + "); log tail:\n" + tail);
            }
            return dev;
        }

        /** SIGKILL one node of this cluster, e.g. `kill("compute-1")`, and wait until it is gone. */
        void kill(String name) throws Exception {
            long pid = Long.parseLong(Files.readString(root.resolve("data").resolve("run").resolve(name + ".pid")).trim());
            ProcessHandle node = ProcessHandle.of(pid).orElseThrow(() -> new IllegalStateException(name + " is not running"));
            // Only a descendant of this cluster's guard, never a recycled pid.
            check(node.parent().flatMap(ProcessHandle::parent).map(ProcessHandle::pid).orElse(-1L) == process.pid(),
                    name + " (pid " + pid + ") is not part of this cluster");
            node.destroyForcibly();
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
            while (node.isAlive() && !isZombie(pid) && System.nanoTime() < deadline) Thread.sleep(20);
            check(!node.isAlive() || isZombie(pid), name + " did not die");
        }

        static boolean isZombie(long pid) {
            try {
                String stat = Files.readString(Path.of("/proc/" + pid + "/stat"));
                return stat.substring(stat.lastIndexOf(')') + 1).trim().startsWith("Z");
            } catch (IOException e) {
                return false;
            }
        }

        static String tail(File log) {
            try {
                List<String> lines = Files.readAllLines(log.toPath());
                return String.join("\n", lines.subList(Math.max(0, lines.size() - 40), lines.size()));
            } catch (IOException e) {
                return "";
            }
        }

        void stop() {
            try {
                long pgid = process.pid();
                new ProcessBuilder("kill", "-KILL", "--", "-" + pgid).inheritIO().start().waitFor(10, TimeUnit.SECONDS);
                process.waitFor(10, TimeUnit.SECONDS);
            } catch (Exception ignored) {
                process.destroyForcibly();
            }
            deleteTree(root.toFile());
        }

        static void deleteTree(File f) {
            File[] children = f.listFiles();
            if (children != null) for (File c : children) deleteTree(c);
            f.delete();
        }
    }

    static Connection connect() throws Exception {
        return factory().newConnection();
    }

    static ConnectionFactory factory() throws Exception {
        ConnectionFactory f = new ConnectionFactory();
        f.setUri(url);
        f.setConnectionTimeout(15_000);
        f.setHandshakeTimeout(15_000);
        f.setAutomaticRecoveryEnabled(false);
        return f;
    }

    static String unique(String prefix) {
        return prefix + "-" + UUID.randomUUID().toString().substring(0, 12);
    }

    static void check(boolean condition, String what) {
        if (!condition) throw new AssertionError(what);
    }

    static void checkEq(Object expected, Object actual, String what) {
        if (!java.util.Objects.equals(expected, actual)) {
            throw new AssertionError(what + ": expected <" + expected + "> but was <" + actual + ">");
        }
    }

    static List<String> drain(Channel ch, String queue) throws IOException {
        List<String> out = new ArrayList<>();
        GetResponse r;
        while ((r = ch.basicGet(queue, true)) != null) {
            out.add(new String(r.getBody(), StandardCharsets.UTF_8));
        }
        return out;
    }

    // ---- tests ------------------------------------------------------------------------

    static void publishConsumeAckWithConfirms() throws Exception {
        try (Connection conn = connect()) {
            Channel ch = conn.createChannel();
            String q = ch.queueDeclare(unique("java-q"), false, true, false, null).getQueue();
            ch.confirmSelect();
            for (int i = 0; i < 50; i++) {
                ch.basicPublish("", q, MessageProperties.PERSISTENT_TEXT_PLAIN, ("m" + i).getBytes(StandardCharsets.UTF_8));
            }
            ch.waitForConfirmsOrDie(30_000);
            checkEq(50, ch.queueDeclarePassive(q).getMessageCount(), "ready after confirms");

            Channel consumerChannel = conn.createChannel();
            BlockingQueue<String> got = new LinkedBlockingQueue<>();
            consumerChannel.basicConsume(q, false, new DefaultConsumer(consumerChannel) {
                @Override
                public void handleDelivery(String tag, Envelope env, AMQP.BasicProperties props, byte[] body) throws IOException {
                    String text = new String(body, StandardCharsets.UTF_8);
                    // Ack first: once the test has seen the last message it closes the channel.
                    getChannel().basicAck(env.getDeliveryTag(), false);
                    got.add(text + (env.isRedeliver() ? "!" : "") + "|" + props.getDeliveryMode() + "|" + props.getContentType());
                }
            });
            for (int i = 0; i < 50; i++) {
                String m = got.poll(60, TimeUnit.SECONDS);
                checkEq("m" + i + "|2|text/plain", m, "delivery " + i);
            }
            consumerChannel.close();
            checkEq(0, ch.queueDeclarePassive(q).getMessageCount(), "ready after acks");
        }
    }

    static void directRouting() throws Exception {
        try (Connection conn = connect()) {
            Channel ch = conn.createChannel();
            ch.confirmSelect();
            String x = unique("java-direct");
            ch.exchangeDeclare(x, BuiltinExchangeType.DIRECT, false, true, null);
            String red = ch.queueDeclare(unique("red"), false, true, false, null).getQueue();
            String blue = ch.queueDeclare(unique("blue"), false, true, false, null).getQueue();
            ch.queueBind(red, x, "red");
            ch.queueBind(blue, x, "blue");
            ch.queueBind(blue, x, "navy");
            for (String key : new String[] {"red", "blue", "navy", "green", "Red"}) {
                ch.basicPublish(x, key, null, key.getBytes(StandardCharsets.UTF_8));
            }
            ch.waitForConfirmsOrDie(30_000);
            checkEq(List.of("red"), drain(ch, red), "red queue");
            checkEq(List.of("blue", "navy"), drain(ch, blue), "blue queue");
        }
    }

    static void fanoutRouting() throws Exception {
        try (Connection conn = connect()) {
            Channel ch = conn.createChannel();
            ch.confirmSelect();
            String x = unique("java-fanout");
            ch.exchangeDeclare(x, BuiltinExchangeType.FANOUT, false, true, null);
            List<String> queues = new ArrayList<>();
            for (int i = 0; i < 3; i++) {
                String q = ch.queueDeclare(unique("fan"), false, true, false, null).getQueue();
                ch.queueBind(q, x, "key-" + i);
                queues.add(q);
            }
            ch.basicPublish(x, "whatever", null, "one".getBytes(StandardCharsets.UTF_8));
            ch.basicPublish(x, "", null, "two".getBytes(StandardCharsets.UTF_8));
            ch.waitForConfirmsOrDie(30_000);
            for (String q : queues) checkEq(List.of("one", "two"), drain(ch, q), "fanout queue " + q);
        }
    }

    static void basicGet() throws Exception {
        try (Connection conn = connect()) {
            Channel ch = conn.createChannel();
            String q = ch.queueDeclare(unique("java-get"), false, true, false, null).getQueue();
            checkEq(null, ch.basicGet(q, true), "get on an empty queue");
            ch.confirmSelect();
            AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                    .contentType("application/json").messageId("id-1").priority(3)
                    .headers(Map.of("x-trace", "abc")).build();
            ch.basicPublish("", q, props, "{\"a\":1}".getBytes(StandardCharsets.UTF_8));
            ch.basicPublish("", q, null, "second".getBytes(StandardCharsets.UTF_8));
            ch.waitForConfirmsOrDie(30_000);
            GetResponse r = ch.basicGet(q, false);
            check(r != null, "first get returned nothing");
            checkEq("{\"a\":1}", new String(r.getBody(), StandardCharsets.UTF_8), "body");
            checkEq(1, r.getMessageCount(), "message count after first get");
            checkEq("application/json", r.getProps().getContentType(), "content type");
            checkEq("id-1", r.getProps().getMessageId(), "message id");
            checkEq(3, r.getProps().getPriority(), "priority");
            checkEq("abc", String.valueOf(r.getProps().getHeaders().get("x-trace")), "header");
            check(!r.getEnvelope().isRedeliver(), "first get is not a redelivery");
            ch.basicReject(r.getEnvelope().getDeliveryTag(), true);
            GetResponse again = ch.basicGet(q, true);
            checkEq("{\"a\":1}", new String(again.getBody(), StandardCharsets.UTF_8), "requeued body");
            check(again.getEnvelope().isRedeliver(), "requeued message is marked redelivered");
            checkEq(List.of("second"), drain(ch, q), "rest");
        }
    }

    static void largeMessage() throws Exception {
        ConnectionFactory f = factory();
        f.setRequestedFrameMax(4096);
        try (Connection conn = f.newConnection()) {
            checkEq(4096, conn.getFrameMax(), "negotiated frame_max");
            Channel ch = conn.createChannel();
            String q = ch.queueDeclare(unique("java-large"), false, true, false, null).getQueue();
            ch.confirmSelect();
            byte[] body = new byte[5 * 1024 * 1024];
            new Random(42).nextBytes(body);
            ch.basicPublish("", q, null, body);
            ch.waitForConfirmsOrDie(60_000);
            GetResponse r = ch.basicGet(q, true);
            check(r != null, "large message missing");
            checkEq(body.length, r.getBody().length, "length");
            check(Arrays.equals(body, r.getBody()), "large body differs");
        }
    }

    static void passiveDeclareMissing() throws Exception {
        try (Connection conn = connect()) {
            Channel ch = conn.createChannel();
            String name = unique("java-missing");
            try {
                ch.queueDeclarePassive(name);
                throw new AssertionError("passive declare of a missing queue succeeded");
            } catch (IOException e) {
                ShutdownSignalException sse = (ShutdownSignalException) e.getCause();
                check(!sse.isHardError(), "must be a channel error, not a connection error");
                AMQP.Channel.Close close = (AMQP.Channel.Close) sse.getReason();
                checkEq(404, close.getReplyCode(), "reply code");
                check(close.getReplyText().startsWith("NOT_FOUND"), close.getReplyText());
            }
            check(conn.isOpen(), "connection survives a channel error");
            Channel other = conn.createChannel();
            other.queueDeclare(name, false, true, false, null);
            checkEq(0, other.queueDeclarePassive(name).getMessageCount(), "declared afterwards");
        }
    }

    static void wrongCredentials() throws Exception {
        ConnectionFactory f = factory();
        f.setPassword("wrong-password");
        try {
            f.newConnection().close();
            throw new AssertionError("connected with a wrong password");
        } catch (AuthenticationFailureException e) {
            check(e.getMessage().contains("ACCESS_REFUSED"), e.getMessage());
        }
        try (Connection conn = connect()) {
            check(conn.isOpen(), "right credentials still work");
        }
    }

    static void mandatoryReturn() throws Exception {
        try (Connection conn = connect()) {
            Channel ch = conn.createChannel();
            BlockingQueue<String> returned = new LinkedBlockingQueue<>();
            ch.addReturnListener((replyCode, replyText, exchange, routingKey, props, body) ->
                    returned.add(replyCode + " " + replyText + " " + routingKey + " " + new String(body, StandardCharsets.UTF_8)));
            ch.confirmSelect();
            String nowhere = unique("nowhere");
            ch.basicPublish("", nowhere, true, null, "bounce".getBytes(StandardCharsets.UTF_8));
            // The return comes before the confirm of the same message.
            ch.waitForConfirmsOrDie(30_000);
            checkEq("312 NO_ROUTE " + nowhere + " bounce", returned.poll(30, TimeUnit.SECONDS), "basic.return");
        }
    }

    static void consumerCancelNotification() throws Exception {
        try (Connection conn = connect()) {
            Channel ch = conn.createChannel();
            String q = ch.queueDeclare(unique("java-cancel"), false, false, false, null).getQueue();
            Channel consumerChannel = conn.createChannel();
            CompletableFuture<String> cancelled = new CompletableFuture<>();
            String tag = consumerChannel.basicConsume(q, false, new DefaultConsumer(consumerChannel) {
                @Override
                public void handleCancel(String consumerTag) {
                    cancelled.complete(consumerTag);
                }
            });
            ch.queueDelete(q);
            checkEq(tag, cancelled.get(30, TimeUnit.SECONDS), "cancelled consumer tag");
            check(consumerChannel.isOpen(), "the consumer's channel stays open");
        }
    }

    static void qosAndMultipleAck() throws Exception {
        try (Connection conn = connect()) {
            Channel ch = conn.createChannel();
            String q = ch.queueDeclare(unique("java-qos"), false, true, false, null).getQueue();
            ch.confirmSelect();
            for (int i = 0; i < 10; i++) ch.basicPublish("", q, null, String.valueOf(i).getBytes(StandardCharsets.UTF_8));
            ch.waitForConfirmsOrDie(30_000);
            Channel consumerChannel = conn.createChannel();
            consumerChannel.basicQos(4);
            BlockingQueue<Long> tags = new LinkedBlockingQueue<>();
            BlockingQueue<String> bodies = new LinkedBlockingQueue<>();
            consumerChannel.basicConsume(q, false, new DefaultConsumer(consumerChannel) {
                @Override
                public void handleDelivery(String tag, Envelope env, AMQP.BasicProperties props, byte[] body) {
                    bodies.add(new String(body, StandardCharsets.UTF_8));
                    tags.add(env.getDeliveryTag());
                }
            });
            List<Long> first = new ArrayList<>();
            for (int i = 0; i < 4; i++) first.add(tags.poll(30, TimeUnit.SECONDS));
            // Four unacked deliveries out: the other six wait.
            checkEq(6, ch.queueDeclarePassive(q).getMessageCount(), "ready with 4 unacked");
            consumerChannel.basicAck(first.get(3), true);
            for (int i = 0; i < 4; i++) check(tags.poll(30, TimeUnit.SECONDS) != null, "delivery after multiple ack");
            checkEq(2, ch.queueDeclarePassive(q).getMessageCount(), "ready after multiple ack");
            List<String> seen = new ArrayList<>(bodies);
            checkEq(List.of("0", "1", "2", "3", "4", "5", "6", "7"), seen, "order");
        }
    }
}
