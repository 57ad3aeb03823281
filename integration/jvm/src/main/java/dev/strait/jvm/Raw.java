package dev.strait.jvm;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.util.List;
import java.util.Map;
import org.apache.kafka.clients.ApiVersions;
import org.apache.kafka.clients.ClientRequest;
import org.apache.kafka.clients.ClientResponse;
import org.apache.kafka.clients.ClientUtils;
import org.apache.kafka.clients.DefaultHostResolver;
import org.apache.kafka.clients.ManualMetadataUpdater;
import org.apache.kafka.clients.NetworkClient;
import org.apache.kafka.clients.NetworkClientUtils;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.errors.TimeoutException;
import org.apache.kafka.common.message.FindCoordinatorRequestData;
import org.apache.kafka.common.message.FindCoordinatorResponseData;
import org.apache.kafka.common.message.MetadataResponseData;
import org.apache.kafka.common.metrics.Metrics;
import org.apache.kafka.common.protocol.Errors;
import org.apache.kafka.common.requests.AbstractRequest;
import org.apache.kafka.common.requests.AbstractResponse;
import org.apache.kafka.common.requests.FindCoordinatorRequest;
import org.apache.kafka.common.requests.FindCoordinatorResponse;
import org.apache.kafka.common.requests.MetadataRequest;
import org.apache.kafka.common.requests.MetadataResponse;
import org.apache.kafka.common.utils.LogContext;
import org.apache.kafka.common.utils.Time;

/**
 * Single requests to the bootstrap server through the Java client's own NetworkClient (same TLS
 * channel, ApiVersions negotiation and request classes as KafkaProducer/Admin). Needed because the
 * public API hides them: Admin.describeCluster prefers DescribeCluster over Metadata, and no public
 * call returns the broker list a Metadata response carries or the bare FindCoordinator answer.
 */
final class Raw {
    private Raw() {}

    /** Metadata for `topics` (null: none, so the answer only carries brokers). */
    static JsonNode metadata(Map<String, Object> conf, List<String> topics, long timeoutMs) throws Exception {
        MetadataRequest.Builder req = new MetadataRequest.Builder(topics == null ? List.of() : topics, false);
        MetadataResponse resp = (MetadataResponse) call(conf, req, timeoutMs);
        ObjectNode out = Driver.NODES.objectNode();
        out.set("brokers", Driver.nodes(resp.brokers()));
        ObjectNode ts = out.putObject("topics");
        for (MetadataResponseData.MetadataResponseTopic t : resp.data().topics()) {
            ObjectNode tn = ts.putObject(t.name());
            Errors err = Errors.forCode(t.errorCode());
            tn.put("error", err == Errors.NONE ? null : err.name());
            ArrayNode parts = tn.putArray("partitions");
            t.partitions().forEach(p -> parts.add(p.partitionIndex()));
            // Listed is not yet writable: a new topic's partitions appear before their leaders do.
            ArrayNode leaderless = tn.putArray("leaderless");
            t.partitions().stream().filter(p -> p.leaderId() < 0 || p.errorCode() != 0)
                    .forEach(p -> leaderless.add(p.partitionIndex()));
        }
        return out;
    }

    /** The group's coordinator; retried (until the deadline) while the broker says it is not there yet. */
    static Node findCoordinator(Map<String, Object> conf, String group, long timeoutMs) throws Exception {
        long deadline = System.currentTimeMillis() + timeoutMs;
        while (true) {
            FindCoordinatorRequest.Builder req = new FindCoordinatorRequest.Builder(new FindCoordinatorRequestData()
                    .setKeyType(FindCoordinatorRequest.CoordinatorType.GROUP.id()).setCoordinatorKeys(List.of(group)));
            FindCoordinatorResponse resp = (FindCoordinatorResponse) call(conf, req, Math.max(1, deadline - System.currentTimeMillis()));
            // v4+ answers per key; older versions (converted by the builder) at the top level.
            FindCoordinatorResponseData d = resp.data();
            FindCoordinatorResponseData.Coordinator c = d.coordinators().isEmpty()
                    ? new FindCoordinatorResponseData.Coordinator().setErrorCode(d.errorCode()).setErrorMessage(d.errorMessage())
                            .setNodeId(d.nodeId()).setHost(d.host()).setPort(d.port())
                    : d.coordinators().get(0);
            Errors err = Errors.forCode(c.errorCode());
            if (err == Errors.NONE) return new Node(c.nodeId(), c.host(), c.port());
            if (!(err.exception() instanceof org.apache.kafka.common.errors.RetriableException)
                    || System.currentTimeMillis() >= deadline) {
                throw err.exception(c.errorMessage());
            }
            // Retriable (coordinator still loading): ask again; each call is a fresh connection.
        }
    }

    static AbstractResponse call(Map<String, Object> conf, AbstractRequest.Builder<?> req, long timeoutMs) throws Exception {
        AdminClientConfig cfg = new AdminClientConfig(conf);
        Time time = Time.SYSTEM;
        Metrics metrics = new Metrics(time);
        NetworkClient client = ClientUtils.createNetworkClient(cfg, "strait-raw", metrics, "strait-raw",
                new LogContext("[strait-raw] "), new ApiVersions(), time, 1, (int) timeoutMs,
                new ManualMetadataUpdater(), new DefaultHostResolver());
        try {
            // The bootstrap host as written, not resolved, so TLS checks (and sends SNI for) that name.
            String first = cfg.getList(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG).get(0);
            int colon = first.lastIndexOf(':');
            Node node = new Node(-1, first.substring(0, colon), Integer.parseInt(first.substring(colon + 1)));
            if (!NetworkClientUtils.awaitReady(client, node, time, timeoutMs)) {
                throw new TimeoutException("no connection to " + first + " within " + timeoutMs + " ms");
            }
            ClientRequest cr = client.newClientRequest(node.idString(), req, time.milliseconds(), true, (int) timeoutMs, null);
            ClientResponse resp = NetworkClientUtils.sendAndReceive(client, cr, time);
            if (resp.versionMismatch() != null) throw resp.versionMismatch();
            if (resp.wasTimedOut()) throw new TimeoutException("no answer from " + first + " within " + timeoutMs + " ms");
            return resp.responseBody();
        } finally {
            client.close();
            metrics.close();
        }
    }
}
