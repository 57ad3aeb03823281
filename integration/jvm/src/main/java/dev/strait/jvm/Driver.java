package dev.strait.jvm;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.JsonNodeFactory;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.CreateTopicsOptions;
import org.apache.kafka.clients.admin.DescribeClusterOptions;
import org.apache.kafka.clients.admin.ListTopicsOptions;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerGroupMetadata;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.KafkaException;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.config.ConfigException;
import org.apache.kafka.common.errors.ApiException;
import org.apache.kafka.common.errors.RetriableException;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.protocol.Errors;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.utils.AppInfoParser;

/**
 * One JVM hosting many Kafka clients for the Python tests. Protocol: one JSON object per line.
 *
 * <p>In: {@code {"id": 7, "op": "producer.send", "handle": 3, "timeout_ms": 30000, ...args}}.
 * Out: {@code {"id": 7, "ok": true, "result": ...}} or {@code {"id": 7, "ok": false, "error":
 * {"class", "kafka_error", "kafka_code", "message", "retriable"}}}. The first line out is {@code {"id": 0, "ok":
 * true, "result": {"ready": true, ...}}}.
 *
 * <p>Commands naming a handle run in order on that handle's own thread (KafkaConsumer is single
 * threaded, and a transaction's steps must not overtake each other); the rest run on a shared pool,
 * so a slow client never holds up another. Every Kafka call is bounded by the command's timeout_ms.
 * End of stdin closes every client and exits, so a dead test session never leaves a JVM behind.
 */
public final class Driver {
    static final ObjectMapper JSON = new ObjectMapper();
    static final JsonNodeFactory NODES = JsonNodeFactory.instance;
    static final Base64.Encoder B64 = Base64.getEncoder();
    static final Base64.Decoder UNB64 = Base64.getDecoder();

    record Handle(AutoCloseable client, ExecutorService thread) {}

    static final Map<Integer, Handle> HANDLES = new ConcurrentHashMap<>();
    static final AtomicInteger NEXT_HANDLE = new AtomicInteger(1);
    static final ExecutorService SHARED = Executors.newCachedThreadPool(daemon("shared"));
    static PrintStream out;

    public static void main(String[] args) throws Exception {
        // The protocol owns the real stdout; anything a library prints goes to stderr instead.
        out = new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8);
        System.setOut(System.err);
        ObjectNode ready = NODES.objectNode().put("ready", true).put("kafka_clients", AppInfoParser.getVersion())
                .put("java", System.getProperty("java.version"));
        reply(0, ready);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line; (line = in.readLine()) != null; ) {
            if (line.isBlank()) continue;
            JsonNode cmd;
            try {
                cmd = JSON.readTree(line);
            } catch (Exception e) {
                fail(-1, e);
                continue;
            }
            if ("shutdown".equals(cmd.path("op").asText())) break;
            dispatch(cmd);
        }
        // Let commands already read finish (bounded), then close whatever the tests left open.
        SHARED.shutdown();
        SHARED.awaitTermination(10, TimeUnit.SECONDS);
        for (Handle h : HANDLES.values()) h.thread.shutdown();
        for (Handle h : HANDLES.values()) h.thread.awaitTermination(10, TimeUnit.SECONDS);
        for (Integer h : List.copyOf(HANDLES.keySet())) closeHandle(h, 5000);
        out.flush();
        System.exit(0);
    }

    static void dispatch(JsonNode cmd) {
        int id = cmd.path("id").asInt();
        ExecutorService where = SHARED;
        if (cmd.has("handle")) {
            Handle h = HANDLES.get(cmd.get("handle").asInt());
            if (h == null) {
                fail(id, new IllegalArgumentException("no such handle " + cmd.get("handle")));
                return;
            }
            where = h.thread;
        }
        where.execute(() -> {
            try {
                reply(id, run(cmd));
            } catch (Throwable t) {
                fail(id, t);
            }
        });
    }

    static JsonNode run(JsonNode cmd) throws Exception {
        String op = cmd.path("op").asText();
        long timeout = cmd.path("timeout_ms").asLong(30000);
        switch (op) {
            case "ping":
                return NODES.textNode("pong");
            case "admin.new":
                return newHandle(Admin.create(props(cmd, AdminClientConfig.configNames())));
            case "admin.create_topic": {
                NewTopic t = new NewTopic(cmd.get("topic").asText(), cmd.path("partitions").asInt(1),
                        (short) cmd.path("replication_factor").asInt(1));
                admin(cmd).createTopics(List.of(t), new CreateTopicsOptions().timeoutMs((int) timeout))
                        .all().get(timeout, TimeUnit.MILLISECONDS);
                return null;
            }
            case "admin.describe_cluster":
                return nodes(admin(cmd).describeCluster(new DescribeClusterOptions().timeoutMs((int) timeout))
                        .nodes().get(timeout, TimeUnit.MILLISECONDS));
            case "admin.list_topics": {
                // Admin.listTopics: one Metadata request for every topic, as a client sees them.
                ArrayNode names = NODES.arrayNode();
                admin(cmd).listTopics(new ListTopicsOptions().timeoutMs((int) timeout).listInternal(true)).names()
                        .get(timeout, TimeUnit.MILLISECONDS).stream().sorted().forEach(names::add);
                return names;
            }
            case "metadata":
                return Raw.metadata(props(cmd, AdminClientConfig.configNames()), strings(cmd.get("topics")), timeout);
            case "find_coordinator":
                return node(Raw.findCoordinator(props(cmd, AdminClientConfig.configNames()),
                        cmd.get("group").asText(), timeout));
            case "producer.new":
                return newHandle(new KafkaProducer<>(props(cmd, ProducerConfig.configNames()),
                        new ByteArraySerializer(), new ByteArraySerializer()));
            case "producer.send":
                return send(producer(cmd), cmd.get("topic").asText(), cmd.get("records"), timeout);
            // Transactions: each call blocks at most max.block.ms (set from the timeout by the Python side).
            case "producer.init_transactions":
                producer(cmd).initTransactions();
                return null;
            case "producer.begin_transaction":
                producer(cmd).beginTransaction();
                return null;
            case "producer.commit_transaction":
                producer(cmd).commitTransaction();
                return null;
            case "producer.abort_transaction":
                producer(cmd).abortTransaction();
                return null;
            case "producer.send_offsets": {
                // Offsets given explicitly (not read from a consumer handle) so no consumer is touched
                // from this producer's thread.
                Map<TopicPartition, OffsetAndMetadata> offsets = new HashMap<>();
                for (JsonNode o : cmd.get("offsets")) {
                    offsets.put(new TopicPartition(o.get("topic").asText(), o.get("partition").asInt()),
                            new OffsetAndMetadata(o.get("offset").asLong()));
                }
                producer(cmd).sendOffsetsToTransaction(offsets, new ConsumerGroupMetadata(cmd.get("group").asText()));
                return null;
            }
            case "consumer.new": {
                KafkaConsumer<byte[], byte[]> c = new KafkaConsumer<>(props(cmd, ConsumerConfig.configNames()),
                        new ByteArrayDeserializer(), new ByteArrayDeserializer());
                if (cmd.hasNonNull("assign")) {
                    // Manual assignment (no group protocol); where to start is auto.offset.reset's call
                    // unless seek_to_beginning.
                    List<TopicPartition> tps = new ArrayList<>();
                    for (JsonNode a : cmd.get("assign")) tps.add(new TopicPartition(a.get("topic").asText(), a.get("partition").asInt()));
                    c.assign(tps);
                    if (cmd.path("seek_to_beginning").asBoolean(false)) c.seekToBeginning(tps);
                } else {
                    c.subscribe(strings(cmd.get("topics")));
                }
                return newHandle(c);
            }
            case "consumer.poll":
                return records(consumer(cmd).poll(Duration.ofMillis(timeout)));
            case "consumer.assignment": {
                ArrayNode out = NODES.arrayNode();
                consumer(cmd).assignment().forEach(tp -> out.addObject().put("topic", tp.topic()).put("partition", tp.partition()));
                return out;
            }
            case "consumer.commit":
                consumer(cmd).commitSync(Duration.ofMillis(timeout));
                return null;
            case "close":
                closeHandle(cmd.get("handle").asInt(), timeout);
                return null;
            default:
                throw new IllegalArgumentException("unknown op " + op);
        }
    }

    /**
     * Sends every record, then waits (until the deadline) for each acknowledgement: one result per record.
     * A record's own "topic" (else the command's) and "timestamp" (CreateTime ms, else the producer's clock).
     */
    static JsonNode send(KafkaProducer<byte[], byte[]> p, String topic, JsonNode records, long timeout) {
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(timeout);
        List<Object> pending = new ArrayList<>(); // a Future, or the exception send() threw
        for (JsonNode r : records) {
            RecordHeaders headers = new RecordHeaders();
            for (JsonNode h : r.path("headers")) headers.add(h.get(0).asText(), bytes(h.get(1)));
            Integer partition = r.hasNonNull("partition") ? r.get("partition").asInt() : null;
            Long timestamp = r.hasNonNull("timestamp") ? r.get("timestamp").asLong() : null;
            String to = r.hasNonNull("topic") ? r.get("topic").asText() : topic;
            try {
                pending.add(p.send(new ProducerRecord<>(to, partition, timestamp, bytes(r.get("key")),
                        bytes(r.get("value")), headers)));
            } catch (Exception e) {
                pending.add(e);
            }
        }
        ArrayNode out = NODES.arrayNode();
        for (Object f : pending) {
            ObjectNode res = out.addObject();
            try {
                if (f instanceof Exception e) throw e;
                long left = Math.max(0, deadline - System.nanoTime());
                RecordMetadata md = ((Future<RecordMetadata>) f).get(left, TimeUnit.NANOSECONDS);
                res.put("topic", md.topic()).put("partition", md.partition()).put("offset", md.offset());
            } catch (java.util.concurrent.TimeoutException e) {
                res.set("error", error(new org.apache.kafka.common.errors.TimeoutException(
                        "not acknowledged within " + timeout + " ms")));
            } catch (Throwable e) {
                res.set("error", error(e));
            }
        }
        return out;
    }

    static JsonNode records(Iterable<ConsumerRecord<byte[], byte[]>> polled) {
        ArrayNode out = NODES.arrayNode();
        for (ConsumerRecord<byte[], byte[]> r : polled) {
            ArrayNode headers = NODES.arrayNode();
            for (Header h : r.headers()) headers.addArray().add(h.key()).add(b64(h.value()));
            out.addObject().put("topic", r.topic()).put("partition", r.partition()).put("offset", r.offset())
                    .put("timestamp", r.timestamp()).put("key", b64(r.key())).put("value", b64(r.value()))
                    .set("headers", headers);
        }
        return out;
    }

    /** The command's "conf" object as client properties; a name the client does not know is an error, not a warning. */
    static Map<String, Object> props(JsonNode cmd, Set<String> known) {
        Map<String, Object> props = new HashMap<>();
        cmd.path("conf").fields().forEachRemaining(e -> {
            if (!known.contains(e.getKey())) throw new ConfigException("unknown config " + e.getKey());
            // As strings: Kafka parses every config type from a string, while a JSON number could be the
            // wrong boxed type (Integer for a LONG config).
            if (!e.getValue().isNull()) props.put(e.getKey(), e.getValue().asText());
        });
        return props;
    }

    static JsonNode newHandle(AutoCloseable client) {
        int h = NEXT_HANDLE.getAndIncrement();
        HANDLES.put(h, new Handle(client, Executors.newSingleThreadExecutor(daemon("handle-" + h))));
        return NODES.numberNode(h);
    }

    static void closeHandle(int h, long timeout) {
        Handle handle = HANDLES.remove(h);
        if (handle == null) return;
        Duration d = Duration.ofMillis(timeout);
        try {
            if (handle.client instanceof Admin a) a.close(d);
            else if (handle.client instanceof KafkaProducer<?, ?> p) p.close(d);
            else if (handle.client instanceof KafkaConsumer<?, ?> c) c.close(d);
        } finally {
            handle.thread.shutdown();
        }
    }

    static Object client(JsonNode cmd) {
        Handle h = HANDLES.get(cmd.path("handle").asInt());
        if (h == null) throw new IllegalArgumentException("handle " + cmd.path("handle") + " is closed");
        return h.client;
    }

    static Admin admin(JsonNode cmd) {
        return (Admin) client(cmd);
    }

    @SuppressWarnings("unchecked")
    static KafkaProducer<byte[], byte[]> producer(JsonNode cmd) {
        return (KafkaProducer<byte[], byte[]>) client(cmd);
    }

    @SuppressWarnings("unchecked")
    static KafkaConsumer<byte[], byte[]> consumer(JsonNode cmd) {
        return (KafkaConsumer<byte[], byte[]>) client(cmd);
    }

    static List<String> strings(JsonNode array) {
        if (array == null || array.isNull()) return null;
        List<String> out = new ArrayList<>();
        array.forEach(n -> out.add(n.asText()));
        return out;
    }

    static byte[] bytes(JsonNode b64) {
        return b64 == null || b64.isNull() ? null : UNB64.decode(b64.asText());
    }

    static String b64(byte[] b) {
        return b == null ? null : B64.encodeToString(b);
    }

    static ObjectNode node(Node n) {
        return NODES.objectNode().put("id", n.id()).put("host", n.host()).put("port", n.port());
    }

    static ArrayNode nodes(Iterable<Node> ns) {
        ArrayNode out = NODES.arrayNode();
        ns.forEach(n -> out.add(node(n)));
        return out;
    }

    /** Exception class, Kafka error name (for broker errors) and message of the most telling cause. */
    static ObjectNode error(Throwable t) {
        while ((t instanceof ExecutionException || t instanceof CompletionException
                || (t.getClass() == KafkaException.class)) && t.getCause() != null) {
            t = t.getCause();
        }
        ObjectNode e = NODES.objectNode().put("class", t.getClass().getName()).put("message", String.valueOf(t.getMessage()))
                .put("retriable", t instanceof RetriableException);
        // Only a protocol error code's own exception class names it: client-side ApiExceptions (TLS
        // handshake failures, say) would otherwise borrow whatever code a superclass maps to.
        Errors code = Errors.forException(t);
        boolean own = t instanceof ApiException && code.exception() != null && code.exception().getClass() == t.getClass();
        e.put("kafka_error", own ? code.name() : null);
        if (own) e.put("kafka_code", code.code());
        else e.putNull("kafka_code");
        return e;
    }

    static void reply(int id, JsonNode result) {
        ObjectNode msg = NODES.objectNode().put("id", id).put("ok", true);
        msg.set("result", result);
        write(msg);
    }

    static void fail(int id, Throwable t) {
        ObjectNode msg = NODES.objectNode().put("id", id).put("ok", false);
        msg.set("error", error(t));
        write(msg);
    }

    static void write(ObjectNode msg) {
        String line;
        try {
            line = JSON.writeValueAsString(msg);
        } catch (Exception e) {
            line = "{\"id\":" + msg.path("id").asInt() + ",\"ok\":false,\"error\":{\"class\":\"" + e.getClass().getName()
                    + "\",\"message\":\"answer not serializable\",\"kafka_error\":null,\"kafka_code\":null,\"retriable\":false}}";
        }
        synchronized (Driver.class) {
            out.println(line);
            out.flush();
        }
    }

    static java.util.concurrent.ThreadFactory daemon(String name) {
        AtomicInteger n = new AtomicInteger();
        return r -> {
            Thread t = new Thread(r, "strait-" + name + "-" + n.incrementAndGet());
            t.setDaemon(true);
            return t;
        };
    }
}
