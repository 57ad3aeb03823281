use super::*;
use serde_json::json;

fn kc(name: &str, servers: &[&str], expected: Option<u64>) -> Command {
    Command::Apply {
        kind: Kind::KafkaCluster,
        name: name.into(),
        labels: BTreeMap::new(),
        spec: json!({ "bootstrap_servers": servers }),
        expected_revision: expected,
    }
}

fn del(name: &str, expected: Option<u64>) -> Command {
    Command::Delete {
        kind: Kind::KafkaCluster,
        name: name.into(),
        expected_revision: expected,
    }
}

#[derive(Debug)]
enum Want {
    Changed(u64),
    Unchanged(u64),
    Deleted(u64),
    Status(u64),
    Noop,
    Conflict,
    NotFound,
    Exists,
    Invalid(&'static str),
}

fn check(out: &Result<Outcome, CommandError>, want: &Want) -> bool {
    match (out, want) {
        (
            Ok(Outcome::Applied {
                resource,
                changed: true,
            }),
            Want::Changed(r),
        ) => resource.revision == *r,
        (
            Ok(Outcome::Applied {
                resource,
                changed: false,
            }),
            Want::Unchanged(r),
        ) => resource.revision == *r,
        (Ok(Outcome::Deleted { revision }), Want::Deleted(r)) => revision == r,
        (Ok(Outcome::StatusUpdated { resource }), Want::Status(r)) => resource.revision == *r,
        (Ok(Outcome::Noop), Want::Noop) => true,
        (Err(CommandError::Conflict { .. }), Want::Conflict) => true,
        (Err(CommandError::NotFound { .. }), Want::NotFound) => true,
        (Err(CommandError::AlreadyExists { .. }), Want::Exists) => true,
        (Err(CommandError::Invalid { errors, .. }), Want::Invalid(path)) => {
            errors.iter().any(|e| e.path == *path)
        }
        _ => false,
    }
}

#[test]
fn command_sequences() {
    let status = Command::UpdateStatus {
        kind: Kind::KafkaCluster,
        name: "a".into(),
        status: json!({"ok": true}),
    };
    let cases: Vec<(&str, Vec<(Command, Want)>)> = vec![
        (
            "create then idempotent re-apply",
            vec![
                (kc("a", &["h:1"], None), Want::Changed(1)),
                (kc("a", &["h:1"], None), Want::Unchanged(1)),
            ],
        ),
        (
            "update bumps revision",
            vec![
                (kc("a", &["h:1"], None), Want::Changed(1)),
                (kc("a", &["h:2"], None), Want::Changed(2)),
            ],
        ),
        (
            "cas create must not exist",
            vec![
                (kc("a", &["h:1"], Some(0)), Want::Changed(1)),
                (kc("a", &["h:2"], Some(0)), Want::Exists),
            ],
        ),
        (
            "cas update on revision",
            vec![
                (kc("a", &["h:1"], None), Want::Changed(1)),
                (kc("a", &["h:2"], Some(7)), Want::Conflict),
                (kc("a", &["h:2"], Some(1)), Want::Changed(2)),
            ],
        ),
        (
            "cas update of missing",
            vec![(kc("a", &["h:1"], Some(3)), Want::NotFound)],
        ),
        ("delete missing", vec![(del("a", None), Want::NotFound)]),
        (
            "delete with cas",
            vec![
                (kc("a", &["h:1"], None), Want::Changed(1)),
                (del("a", Some(5)), Want::Conflict),
                (del("a", Some(1)), Want::Deleted(2)),
                (del("a", None), Want::NotFound),
            ],
        ),
        (
            "status update",
            vec![
                (status.clone(), Want::NotFound),
                (kc("a", &["h:1"], None), Want::Changed(1)),
                (status.clone(), Want::Status(2)),
                // Re-applying the same spec keeps the status and the revision.
                (kc("a", &["h:1"], None), Want::Unchanged(2)),
            ],
        ),
        (
            "invalid does not consume a revision",
            vec![
                (kc("a", &[], None), Want::Invalid("spec.bootstrap_servers")),
                (
                    kc("a", &["nohost"], None),
                    Want::Invalid("spec.bootstrap_servers[0]"),
                ),
                (kc("Bad_Name", &["h:1"], None), Want::Invalid("name")),
                (kc("b", &["h:1"], None), Want::Changed(1)),
            ],
        ),
        ("noop", vec![(Command::Noop, Want::Noop)]),
    ];
    for (name, steps) in cases {
        let mut st = State::new(100);
        for (i, (cmd, want)) in steps.iter().enumerate() {
            let (out, _) = st.apply(cmd);
            assert!(
                check(&out, want),
                "case '{name}' step {i}: got {out:?}, want {want:?}"
            );
        }
    }
}

#[test]
fn spec_validation_paths() {
    let cases: Vec<(Kind, Value, Option<&str>)> = vec![
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","bootstrap":"127.0.0.1:19092",
                   "brokers":{"advertised_host":"127.0.0.1","port_range":"19100-19199"}}),
            None,
        ),
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","bootstrap":"127.0.0.1:19092",
                   "brokers":{"advertised_host":"127.0.0.1","port_range":"19199-19100"}}),
            Some("spec.brokers.port_range"),
        ),
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","bootstrap":"127.0.0.1:19150",
                   "brokers":{"advertised_host":"127.0.0.1","port_range":"19100-19199"}}),
            Some("spec.brokers.port_range"),
        ),
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","bootstrap":"127.0.0.1:19092",
                   "brokers":{"advertised_host":"127.0.0.1","port_range":"1-2","extra":1}}),
            Some("spec.brokers.extra"),
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"tls":{"server_nam":"x"}}),
            Some("spec.tls.server_nam"),
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"tls":{"ca_pem":"x","identity":"svid"}}),
            None,
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"tls":{"ca_pem":"x","identity":"svid",
                   "client_cert_file":"/c","client_key_file":"/k"}}),
            Some("spec.tls.identity"),
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"tls":{"ca_pem":"x","identity":"spire"}}),
            Some("spec.tls.identity"),
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"sasl":{"mechanism":"SCRAM-SHA-512",
                   "username":"edge","password_file":"/etc/strait/kafka-password"}}),
            None,
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"sasl":{"mechanism":"PLAIN",
                   "username_env":"KAFKA_USER","password_env":"KAFKA_PASSWORD"}}),
            None,
        ),
        (
            // A secret never gets into the log: there is no field for it.
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"sasl":{"mechanism":"PLAIN",
                   "username":"edge","password":"hunter2"}}),
            Some("spec.sasl.password"),
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"sasl":{"mechanism":"PLAIN","username":"edge"}}),
            Some("spec.sasl"),
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"sasl":{"mechanism":"PLAIN","username":"edge",
                   "password_env":"A","password_file":"/b"}}),
            Some("spec.sasl"),
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"sasl":{"mechanism":"GSSAPI","username":"edge",
                   "password_env":"A"}}),
            Some("spec.sasl.mechanism"),
        ),
        (
            Kind::KafkaCluster,
            json!({"bootstrap_servers":["a:1"],"sasl":{"mechanism":"PLAIN","username":" ",
                   "password_env":"A"}}),
            Some("spec.sasl.username"),
        ),
        (
            Kind::AuthorizationPolicy,
            json!({"rules":[{"principal":"spiffe://east/*","allow":["read","write"],"topics":["orders-*"],
                    "not_before":"2026-01-01T00:00:00Z","not_after":"2027-01-01T00:00:00Z"}]}),
            None,
        ),
        (
            Kind::AuthorizationPolicy,
            json!({"rules":[{"principal":"p","allow":["fly"],"topics":["t"]}]}),
            Some("spec.rules[0].allow[0]"),
        ),
        (
            Kind::AuthorizationPolicy,
            json!({"rules":[{"principal":"p","allow":["read"],"topics":["t"],"not_after":"yesterday"}]}),
            Some("spec.rules[0].not_after"),
        ),
        (
            Kind::AuthorizationPolicy,
            json!({"rules":[{"principal":"p","allow":["read"],"topics":["t"],
                    "not_before":"2027-01-01T00:00:00Z","not_after":"2026-01-01T00:00:00Z"}]}),
            Some("spec.rules[0].not_after"),
        ),
        (
            Kind::EncryptionPolicy,
            json!({"rules":[{"topics":["pay-*"],"kms":"vault-east","kek_template":"KEK-$(topicName)"}]}),
            None,
        ),
        (
            Kind::EncryptionPolicy,
            json!({"rules":[]}),
            Some("spec.rules"),
        ),
        (
            Kind::KmsRealm,
            json!({"provider":"vault"}),
            Some("spec.endpoints"),
        ),
        (
            Kind::KmsRealm,
            json!({"provider":"aws","region":"us-east-1"}),
            None,
        ),
        (
            Kind::KmsRealm,
            json!({"provider":"broker","endpoints":["https://kms-1:7443"],"backend":"vault-east"}),
            None,
        ),
        (
            Kind::KmsRealm,
            json!({"provider":"broker","endpoints":["kms-1:7443"]}),
            Some("spec.endpoints[0]"),
        ),
        (
            Kind::KmsRealm,
            json!({"provider":"local","credentials_ref":"keys.json","backend":"x"}),
            Some("spec.backend"),
        ),
        (
            Kind::MeshPeer,
            json!({"edge":"edge-east","peer":"edge-west","addresses":["10.0.0.2:7443"],
                   "spiffe_id":"spiffe://west.example/edge/edge-west","transport":"quic",
                   "may_assert":["spiffe://west.example/*"],"exports":["orders"]}),
            None,
        ),
        (
            Kind::MeshPeer,
            json!({"edge":"edge-east","spiffe_id":"west/edge","transport":"udp"}),
            Some("spec.spiffe_id"),
        ),
        (
            Kind::MeshPeer,
            json!({"edge":"edge-east","spiffe_id":"spiffe://w/edge/x","transport":"udp"}),
            Some("spec.transport"),
        ),
        (
            Kind::VirtualCluster,
            json!({"edge":"e","remote":{"peer":"p","virtual_cluster":"v"},"bootstrap":"h:1",
                   "brokers":{"advertised_host":"h","port_range":"100-110"}}),
            None,
        ),
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","remote":{"peer":"p","virtual_cluster":"v"},"bootstrap":"h:1",
                   "brokers":{"advertised_host":"h","port_range":"100-110"}}),
            Some("spec"),
        ),
        (
            Kind::Edge,
            json!({"mesh":{"listen":"nope"}}),
            Some("spec.mesh.listen"),
        ),
        (
            Kind::Edge,
            json!({"mesh":{"services":[{"name":"kms","address":"127.0.0.1:7600"}],
                           "forwards":[{"listen":"127.0.0.1:7601","peer":"edge-east","service":"kms"}]}}),
            None,
        ),
        (
            Kind::Edge,
            json!({"mesh":{"services":[{"name":"kms","address":"127.0.0.1:7600"},
                                       {"name":"kms","address":"127.0.0.1:7602"}]}}),
            Some("spec.mesh.services[1].name"),
        ),
        (
            Kind::Edge,
            json!({"mesh":{"forwards":[{"listen":"127.0.0.1:7601","peer":"e","service":"kms"},
                                       {"listen":"127.0.0.1:7601","peer":"e","service":"kms"}]}}),
            Some("spec.mesh.forwards[1].listen"),
        ),
        (
            Kind::Edge,
            json!({"mesh":{"services":[{"name":"kms","address":"127.0.0.1:7600","tls":true}]}}),
            Some("spec.mesh.services[0].tls"),
        ),
        (
            Kind::MeshPeer,
            json!({"edge":"edge-east","spiffe_id":"spiffe://w/edge/x","export_services":["kms","a/b"]}),
            Some("spec.export_services[1]"),
        ),
        (
            Kind::KmsRealm,
            json!({"provider":"broker","endpoints":["https://127.0.0.1:7601"],"server_name":"kms.east.example"}),
            None,
        ),
        (
            Kind::KmsRealm,
            json!({"provider":"broker","endpoints":["https://127.0.0.1:7601"],"server_name":"kms east"}),
            Some("spec.server_name"),
        ),
        (
            Kind::KmsRealm,
            json!({"provider":"vault","endpoints":["http://v:8200"],"server_name":"v"}),
            Some("spec.server_name"),
        ),
        (
            Kind::KmsRealm,
            json!({"provider":"gcp"}),
            Some("spec.provider"),
        ),
        (
            Kind::TrustBundle,
            json!({"trust_domain":"east","pem":"nope"}),
            Some("spec.pem"),
        ),
        (Kind::TrustBundle, json!({"pem":"x"}), Some("spec")),
        (
            Kind::TrustBundle,
            json!({"trust_domain":"spiffe://East","pem":"-----BEGIN CERTIFICATE-----"}),
            Some("spec.trust_domain"),
        ),
        (
            Kind::FailoverGroup,
            json!({"primary":"a","standby":["a"]}),
            Some("spec.standby[0]"),
        ),
        (
            Kind::FailoverGroup,
            json!({"primary":"a","standby":["b"]}),
            None,
        ),
        (Kind::Edge, json!({}), None),
        (
            Kind::AccessRule,
            json!({"identities":["spiffe://example.org/ns/ops/sa/*"],"role":"reader"}),
            None,
        ),
        (
            Kind::AccessRule,
            json!({"identities":[],"role":"reader"}),
            Some("spec.identities"),
        ),
        (
            Kind::AccessRule,
            json!({"identities":["example.org/admin/x"],"role":"admin"}),
            Some("spec.identities[0]"),
        ),
        (
            Kind::AccessRule,
            json!({"identities":["spiffe://a/b"],"role":"root"}),
            Some("spec.role"),
        ),
        (
            Kind::AccessRule,
            json!({"identities":["spiffe://a/b"],"role":"admin","extra":1}),
            Some("spec.extra"),
        ),
        // Fail closed: TLS without a client trust bundle is refused, not client_auth none.
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","bootstrap":"127.0.0.1:19092",
                   "brokers":{"advertised_host":"127.0.0.1","port_range":"19100-19199"},
                   "tls":{"cert_file":"/c.pem","key_file":"/k.pem"}}),
            Some("spec.tls.client_trust_bundles"),
        ),
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","bootstrap":"127.0.0.1:19092",
                   "brokers":{"advertised_host":"127.0.0.1","port_range":"19100-19199"},
                   "tls":{"cert_file":"/c.pem","key_file":"/k.pem","client_trust_bundles":["east"]}}),
            None,
        ),
        // The edge's own SVID instead of files, never both.
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","bootstrap":"127.0.0.1:19092",
                   "brokers":{"advertised_host":"127.0.0.1","port_range":"19100-19199"},
                   "tls":{"identity":"svid","client_trust_bundles":["east"]}}),
            None,
        ),
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","bootstrap":"127.0.0.1:19092",
                   "brokers":{"advertised_host":"127.0.0.1","port_range":"19100-19199"},
                   "tls":{"identity":"svid","cert_file":"/c.pem","client_trust_bundles":["east"]}}),
            Some("spec.tls"),
        ),
        (
            Kind::VirtualCluster,
            json!({"edge":"e","cluster":"c","bootstrap":"127.0.0.1:19092",
                   "brokers":{"advertised_host":"127.0.0.1","port_range":"19100-19199"},
                   "tls":{"client_trust_bundles":["east"]}}),
            Some("spec.tls"),
        ),
        (
            Kind::DenyList,
            json!({"spiffe_ids":["spiffe://example.org/ns/shop/sa/orders"],"reason":"key leaked"}),
            None,
        ),
        (
            Kind::DenyList,
            json!({"spiffe_ids":["spiffe://example.org/ns/shop/sa/orders","spiffe://example.org/ns/*"]}),
            Some("spec.spiffe_ids[1]"),
        ),
        (
            Kind::DenyList,
            json!({"spiffe_ids":["CN=orders"]}),
            Some("spec.spiffe_ids[0]"),
        ),
        (Kind::DenyList, json!({"ids":[]}), Some("spec.ids")),
        (Kind::KmsBroker, json!({}), None),
        (Kind::KmsBroker, json!({"description":"eu-west"}), None),
        (Kind::KmsBroker, json!({"name":"k1"}), Some("spec.name")),
        (
            Kind::KmsGrant,
            json!({"callers":["spiffe://west.example/edge/*"],"kms":["vault-east"],
                   "keks":["kek-*"],"operations":["unwrap"]}),
            None,
        ),
        (
            Kind::KmsGrant,
            json!({"callers":["spiffe://w/edge/*"],"kms":["*"],"operations":["unwrap","delete"]}),
            Some("spec.operations[1]"),
        ),
        (
            Kind::KmsGrant,
            json!({"callers":["west-edges"],"kms":["*"],"operations":["wrap"]}),
            Some("spec.callers[0]"),
        ),
        (
            Kind::KmsGrant,
            json!({"callers":[],"kms":["*"],"operations":["wrap"]}),
            Some("spec.callers"),
        ),
        (
            Kind::KekShred,
            json!({"kek":"kek-orders","kms":["vault-east"],"reason":"breach"}),
            None,
        ),
        (Kind::KekShred, json!({"kek":" "}), Some("spec.kek")),
        (
            Kind::KekShred,
            json!({"kek":"k","realms":["x"]}),
            Some("spec.realms"),
        ),
        (
            Kind::EncryptionPolicy,
            json!({"rules":[{"topics":["secret-*"],"kms":"vault-east","kek_template":"k",
                             "also_wrap_for":[{"kms":"vault-east","kek_template":"k"}]}]}),
            Some("spec.rules[0].also_wrap_for[0].kms"),
        ),
        (
            Kind::EncryptionPolicy,
            json!({"rules":[{"topics":["secret-*"],"kms":"vault-east","kek_template":"k",
                             "also_wrap_for":[{"kms":"aws-west","kek_template":"alias/k"}]}],
                   "keys_topic":{"also_read":["east.strait.keys"]}}),
            None,
        ),
    ];
    for (kind, spec, want) in cases {
        let got = kind.validate_spec(&spec);
        match (want, &got) {
            (None, Ok(())) => {}
            (Some(p), Err(errs)) if errs.iter().any(|e| e.path == p) => {}
            _ => panic!("{kind} {spec}: got {got:?}, want error at {want:?}"),
        }
    }
}

#[test]
fn a_kek_shred_is_never_deleted_nor_changed() {
    let shred = |kms: &[&str]| Command::Apply {
        kind: Kind::KekShred,
        name: "kek-orders".into(),
        labels: BTreeMap::new(),
        spec: json!({ "kek": "kek-orders", "kms": kms }),
        expected_revision: None,
    };
    let mut st = State::new(10);
    assert!(matches!(
        st.apply(&shred(&["vault-east"])).0,
        Ok(Outcome::Applied { changed: true, .. })
    ));
    assert!(matches!(
        st.apply(&shred(&["vault-east"])).0,
        Ok(Outcome::Applied { changed: false, .. })
    ));
    let (changed, events) = st.apply(&shred(&[]));
    assert!(
        matches!(
            &changed,
            Err(CommandError::Irreversible {
                what: "changed",
                ..
            })
        ),
        "{changed:?}"
    );
    assert!(events.is_empty());
    let (deleted, events) = st.apply(&Command::Delete {
        kind: Kind::KekShred,
        name: "kek-orders".into(),
        expected_revision: None,
    });
    let err = deleted.unwrap_err();
    assert!(matches!(
        err,
        CommandError::Irreversible {
            what: "deleted",
            ..
        }
    ));
    assert!(
        err.to_string().contains("a shredded KEK stays shredded"),
        "{err}"
    );
    assert!(events.is_empty());
    assert_eq!(st.revision(), 1);
}

#[test]
fn watch_history_and_compaction() {
    let mut st = State::new(3);
    for i in 0..5 {
        let (out, ev) = st.apply(&kc("a", &[&format!("h:{}", i + 1)], None));
        assert!(out.is_ok());
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].revision, i + 1);
    }
    assert_eq!(st.revision(), 5);
    assert_eq!(st.compacted_revision(), 2);
    let revs: Vec<u64> = st.events_from(3).unwrap().map(|e| e.revision).collect();
    assert_eq!(revs, vec![3, 4, 5]);
    assert_eq!(st.events_from(6).unwrap().count(), 0);
    let err = st.events_from(2).err().unwrap();
    assert_eq!(err.oldest, 3);
    assert!(st.events_from(1).is_err());
}

#[test]
fn selectors() {
    let labels: BTreeMap<String, String> = [
        ("env".to_string(), "prod".to_string()),
        ("team".into(), "pay".into()),
    ]
    .into();
    let cases = [
        ("", true),
        ("env=prod", true),
        ("env==prod", true),
        ("env=dev", false),
        ("env!=dev", true),
        ("team", true),
        ("!team", false),
        ("!owner", true),
        ("env=prod,team=pay", true),
        ("env=prod,team=ops", false),
    ];
    for (sel, want) in cases {
        assert_eq!(
            Selector::parse(sel).unwrap().matches(&labels),
            want,
            "{sel}"
        );
    }
    assert!(Selector::parse("bad key=1").is_err());
}

#[test]
fn kind_parse_aliases() {
    for (s, k) in [
        ("KafkaCluster", Kind::KafkaCluster),
        ("kafkaclusters", Kind::KafkaCluster),
        ("vc", Kind::VirtualCluster),
        ("authorizationpolicies", Kind::AuthorizationPolicy),
        ("edges", Kind::Edge),
        ("kms", Kind::KmsRealm),
    ] {
        assert_eq!(Kind::parse(s).unwrap(), k, "{s}");
    }
    assert!(Kind::parse("pod").is_err());
}

#[test]
fn deterministic_replicas_and_snapshot_roundtrip() {
    let cmds = vec![
        kc("a", &["h:1"], None),
        kc("b", &["h:2"], None),
        del("a", None),
        kc("b", &["h:3"], Some(2)),
    ];
    let mut r1 = State::new(10);
    let mut r2 = State::new(10);
    for c in &cmds {
        assert_eq!(r1.apply(c), r2.apply(c));
    }
    let bytes = serde_json::to_vec(&r1).unwrap();
    let restored: State = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(restored, r1);
}

#[test]
fn encryption_policy_without_unresolved_key_policy_rejects() {
    let spec: crate::spec::EncryptionPolicySpec = serde_json::from_value(
        json!({"rules":[{"topics":["t"],"kms":"k","kek_template":"KEK-$(topicName)"}]}),
    )
    .unwrap();
    assert_eq!(
        spec.unresolved_key_policy,
        crate::spec::UnresolvedKeyPolicy::Reject
    );
}
