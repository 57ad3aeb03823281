// Starts the Kroxylicious proxy (kroxylicious-runtime's public API) from a YAML config file.
//
// Why this file exists: kroxylicious-app, the artifact that carries Kroxylicious' own main class,
// is not served by the registry this machine reaches (no version of it resolves), while
// kroxylicious-runtime, -record-encryption and -kms-provider-hashicorp-vault do. The app's main adds
// only a banner and command-line parsing around exactly these calls: parse the configuration with
// ConfigParser, build a KafkaProxy with the default feature set, start it and block until SIGTERM.
// Built by install.sh with javac against the resolved jars.
import java.nio.file.Files;
import java.nio.file.Path;

import io.kroxylicious.proxy.KafkaProxy;
import io.kroxylicious.proxy.config.ConfigParser;
import io.kroxylicious.proxy.config.Configuration;
import io.kroxylicious.proxy.internal.config.Features;

public final class StraitBenchKroxylicious {
    public static void main(String[] args) throws Exception {
        if (args.length != 2 || !args[0].equals("--config")) {
            System.err.println("usage: StraitBenchKroxylicious --config proxy.yaml");
            System.exit(2);
        }
        ConfigParser parser = new ConfigParser();
        Configuration config;
        try (var in = Files.newInputStream(Path.of(args[1]))) {
            config = parser.parseConfiguration(in);
        }
        try (KafkaProxy proxy = new KafkaProxy(parser, config, Features.defaultFeatures())) {
            proxy.startup();
            System.out.println("strait-bench: kroxylicious started");
            proxy.block();
        }
    }
}
