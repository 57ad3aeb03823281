//! Which API keys and versions the edge offers, decided per key by whether
//! its responses can carry a broker or controller address (fail closed).
//!
//! [`POLICY`] is the single table: every API key `kafka-protocol` knows has a
//! row saying how far its versions were reviewed and whether its responses
//! carry no address, are rewritten by [`AddressRewriteFilter`], are capped
//! below the versions that add one, or are dropped. [`VersionLimits`] turns
//! it into the version ranges a connection offers in ApiVersions and accepts
//! from clients. A key without a row, or a version newer than its row was
//! reviewed for (a `kafka-protocol` upgrade), is neither offered nor accepted,
//! and the tests below fail until someone reviews it.
//!
//! [`AddressRewriteFilter`]: super::AddressRewriteFilter

use std::sync::LazyLock;

use strait_filter::FilterChain;
use strait_kafka::kafka_protocol::messages::ApiKey;

/// The first Produce version whose response carries `node_endpoints` (KIP-951).
pub const PRODUCE_NODE_ENDPOINTS: i16 = 10;
/// The first Fetch version whose response names a broker id
/// (`preferred_read_replica`, KIP-392); v12 adds `current_leader`.
pub const FETCH_NODE_IDS: i16 = 11;
/// The first Fetch version whose response carries `node_endpoints` (KIP-951).
/// Fetch v16 adds nothing else, and v17 (KIP-853 replica directory id) and
/// v18 (KIP-1166 replica high watermark) add fields only followers fill in.
pub const FETCH_NODE_ENDPOINTS: i16 = 16;

/// What the edge does about addresses in an API key's responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// No response version up to the reviewed one names a broker or controller.
    NoAddress,
    /// Responses name brokers; [`super::AddressRewriteFilter`] puts the edge's
    /// address in their place (or removes them) before a client sees them.
    Rewritten,
    /// Versions above `max` name brokers in a response the edge streams
    /// undecoded. They are offered only on connections whose filters decode
    /// that response anyway, and then rewritten.
    CappedUnlessDecoded { max: i16 },
    /// Neither offered nor accepted: responses with addresses the edge does
    /// not rewrite, or inter-broker and controller APIs clients never send.
    Dropped,
}

/// One row of [`POLICY`].
#[derive(Debug)]
pub struct KeyPolicy {
    pub key: ApiKey,
    /// The newest version whose response schema was checked for addresses.
    pub reviewed_max: i16,
    pub exposure: Exposure,
    /// Why, where it is not obvious.
    pub note: &'static str,
}

const fn row(key: ApiKey, reviewed_max: i16, exposure: Exposure, note: &'static str) -> KeyPolicy {
    KeyPolicy {
        key,
        reviewed_max,
        exposure,
        note,
    }
}

use Exposure::{CappedUnlessDecoded, Dropped, NoAddress, Rewritten};

/// Every API key of `kafka-protocol` 0.18, reviewed against its response
/// schemas (host/port/endpoint/listener fields, and values that are addresses).
// One row per line, so the table reads as one.
#[rustfmt::skip]
pub const POLICY: &[KeyPolicy] = &[
    row(ApiKey::Produce, 13, Rewritten, "v10+: node_endpoints (KIP-951); only those versions are decoded"),
    row(ApiKey::Fetch, 18, CappedUnlessDecoded { max: 15 }, "v16+: node_endpoints (KIP-951); records make decoding every fetch too costly"),
    row(ApiKey::ListOffsets, 10, NoAddress, ""),
    row(ApiKey::Metadata, 13, Rewritten, "brokers"),
    row(ApiKey::OffsetCommit, 10, NoAddress, ""),
    row(ApiKey::OffsetFetch, 10, NoAddress, ""),
    row(ApiKey::FindCoordinator, 6, Rewritten, "coordinator host/port"),
    row(ApiKey::JoinGroup, 9, NoAddress, ""),
    row(ApiKey::Heartbeat, 4, NoAddress, ""),
    row(ApiKey::LeaveGroup, 5, NoAddress, ""),
    row(ApiKey::SyncGroup, 5, NoAddress, ""),
    row(ApiKey::DescribeGroups, 6, NoAddress, "client_host is where a member connected from (the edge), not a broker"),
    row(ApiKey::ListGroups, 5, NoAddress, ""),
    row(ApiKey::SaslHandshake, 1, NoAddress, ""),
    row(ApiKey::ApiVersions, 4, NoAddress, ""),
    row(ApiKey::CreateTopics, 7, NoAddress, "returns topic configs only"),
    row(ApiKey::DeleteTopics, 6, NoAddress, ""),
    row(ApiKey::DeleteRecords, 2, NoAddress, ""),
    row(ApiKey::InitProducerId, 6, NoAddress, ""),
    row(ApiKey::OffsetForLeaderEpoch, 4, NoAddress, ""),
    row(ApiKey::AddPartitionsToTxn, 5, NoAddress, ""),
    row(ApiKey::AddOffsetsToTxn, 4, NoAddress, ""),
    row(ApiKey::EndTxn, 5, NoAddress, ""),
    row(ApiKey::WriteTxnMarkers, 1, Dropped, "inter-broker: transaction coordinator to partition leaders"),
    row(ApiKey::TxnOffsetCommit, 5, NoAddress, ""),
    row(ApiKey::DescribeAcls, 3, NoAddress, "host is an ACL's client-host pattern"),
    row(ApiKey::CreateAcls, 3, NoAddress, ""),
    row(ApiKey::DeleteAcls, 3, NoAddress, "host is an ACL's client-host pattern"),
    row(ApiKey::DescribeConfigs, 4, Rewritten, "broker configs naming addresses (listeners, advertised.listeners, quorum voters, ...) are redacted like passwords"),
    row(ApiKey::AlterConfigs, 2, NoAddress, ""),
    row(ApiKey::AlterReplicaLogDirs, 2, NoAddress, ""),
    row(ApiKey::DescribeLogDirs, 4, NoAddress, "log_dir is a file system path"),
    row(ApiKey::SaslAuthenticate, 2, NoAddress, ""),
    row(ApiKey::CreatePartitions, 3, NoAddress, ""),
    row(ApiKey::CreateDelegationToken, 3, NoAddress, ""),
    row(ApiKey::RenewDelegationToken, 2, NoAddress, ""),
    row(ApiKey::ExpireDelegationToken, 2, NoAddress, ""),
    row(ApiKey::DescribeDelegationToken, 3, NoAddress, ""),
    row(ApiKey::DeleteGroups, 2, NoAddress, ""),
    row(ApiKey::ElectLeaders, 2, NoAddress, ""),
    row(ApiKey::IncrementalAlterConfigs, 1, NoAddress, ""),
    row(ApiKey::AlterPartitionReassignments, 1, NoAddress, ""),
    row(ApiKey::ListPartitionReassignments, 0, NoAddress, ""),
    row(ApiKey::OffsetDelete, 0, NoAddress, ""),
    row(ApiKey::DescribeClientQuotas, 1, NoAddress, ""),
    row(ApiKey::AlterClientQuotas, 1, NoAddress, ""),
    row(ApiKey::DescribeUserScramCredentials, 0, NoAddress, ""),
    row(ApiKey::AlterUserScramCredentials, 0, NoAddress, ""),
    row(ApiKey::Vote, 2, Dropped, "controller quorum: node_endpoints"),
    row(ApiKey::BeginQuorumEpoch, 1, Dropped, "controller quorum: leader endpoints"),
    row(ApiKey::EndQuorumEpoch, 1, Dropped, "controller quorum: leader endpoints"),
    row(ApiKey::DescribeQuorum, 2, Rewritten, "controller listeners removed"),
    row(ApiKey::AlterPartition, 3, Dropped, "broker to controller"),
    row(ApiKey::UpdateFeatures, 2, NoAddress, ""),
    row(ApiKey::Envelope, 0, Dropped, "broker to controller forwarding; carries another principal's request"),
    row(ApiKey::FetchSnapshot, 1, Dropped, "controller quorum: node_endpoints"),
    row(ApiKey::DescribeCluster, 2, Rewritten, "brokers"),
    row(ApiKey::DescribeProducers, 0, NoAddress, ""),
    row(ApiKey::BrokerRegistration, 4, Dropped, "broker to controller"),
    row(ApiKey::BrokerHeartbeat, 1, Dropped, "broker to controller"),
    row(ApiKey::UnregisterBroker, 0, NoAddress, "an admin API; the answer is an error code"),
    row(ApiKey::DescribeTransactions, 0, NoAddress, ""),
    row(ApiKey::ListTransactions, 2, NoAddress, ""),
    row(ApiKey::AllocateProducerIds, 0, Dropped, "broker to controller"),
    row(ApiKey::ConsumerGroupHeartbeat, 1, NoAddress, ""),
    row(ApiKey::ConsumerGroupDescribe, 1, NoAddress, "client_host is where a member connected from (the edge), not a broker"),
    row(ApiKey::ControllerRegistration, 0, Dropped, "controller to controller"),
    row(ApiKey::GetTelemetrySubscriptions, 0, NoAddress, ""),
    row(ApiKey::PushTelemetry, 0, NoAddress, ""),
    row(ApiKey::AssignReplicasToDirs, 0, Dropped, "broker to controller"),
    row(ApiKey::ListConfigResources, 1, NoAddress, "resource names only"),
    row(ApiKey::DescribeTopicPartitions, 0, NoAddress, "node ids only (translated after a switch: super::node_ids)"),
    row(ApiKey::ShareGroupHeartbeat, 1, NoAddress, ""),
    row(ApiKey::ShareGroupDescribe, 1, NoAddress, "client_host is where a member connected from (the edge), not a broker"),
    row(ApiKey::ShareFetch, 1, Dropped, "node_endpoints in every version, beside records: decoding every share fetch is the Fetch problem again"),
    row(ApiKey::ShareAcknowledge, 1, Dropped, "node_endpoints in every version; of no use without ShareFetch"),
    row(ApiKey::AddRaftVoter, 0, NoAddress, "an admin API; the answer is an error code"),
    row(ApiKey::RemoveRaftVoter, 0, NoAddress, "an admin API; the answer is an error code"),
    row(ApiKey::UpdateRaftVoter, 0, Dropped, "controller to controller: current leader host/port"),
    row(ApiKey::InitializeShareGroupState, 0, Dropped, "broker to share coordinator"),
    row(ApiKey::ReadShareGroupState, 0, Dropped, "broker to share coordinator"),
    row(ApiKey::WriteShareGroupState, 0, Dropped, "broker to share coordinator"),
    row(ApiKey::DeleteShareGroupState, 0, Dropped, "broker to share coordinator"),
    row(ApiKey::ReadShareGroupStateSummary, 0, Dropped, "broker to share coordinator"),
    row(ApiKey::DescribeShareGroupOffsets, 0, NoAddress, ""),
    row(ApiKey::AlterShareGroupOffsets, 0, NoAddress, ""),
    row(ApiKey::DeleteShareGroupOffsets, 0, NoAddress, ""),
];

/// The row of `key`, if it has one.
pub fn policy_of(key: ApiKey) -> Option<&'static KeyPolicy> {
    POLICY.iter().find(|row| row.key == key)
}

/// The versions a connection offers and accepts, per API key number.
#[derive(Clone, PartialEq, Eq)]
pub struct VersionLimits {
    /// `(min, max)`; `min > max` where nothing is offered.
    ranges: [(i16, i16); 256],
}

static WITHOUT_FETCH_DECODE: LazyLock<VersionLimits> = LazyLock::new(|| VersionLimits::new(false));
static WITH_FETCH_DECODE: LazyLock<VersionLimits> = LazyLock::new(|| VersionLimits::new(true));

impl VersionLimits {
    const NOTHING: (i16, i16) = (0, -1);

    /// The limits for a connection whose filters decode Fetch responses from
    /// [`FETCH_NODE_ENDPOINTS`] on (`fetch_decoded`), or not.
    pub fn get(fetch_decoded: bool) -> &'static VersionLimits {
        if fetch_decoded {
            &WITH_FETCH_DECODE
        } else {
            &WITHOUT_FETCH_DECODE
        }
    }

    /// The limits matching what `chain` decodes.
    pub fn for_chain(chain: &FilterChain) -> &'static VersionLimits {
        Self::get(chain.wants_response(ApiKey::Fetch as i16, FETCH_NODE_ENDPOINTS))
    }

    fn new(fetch_decoded: bool) -> Self {
        let mut ranges = [Self::NOTHING; 256];
        for key in ApiKey::iter() {
            let (Some(row), Ok(index)) = (policy_of(key), usize::try_from(key as i16)) else {
                continue;
            };
            let crate_range = key.valid_versions();
            // Never beyond what was reviewed: a crate upgrade that adds a
            // version adds nothing a client can use until the table says so.
            let max = crate_range.max.min(row.reviewed_max);
            let max = match row.exposure {
                NoAddress | Rewritten => max,
                // Only Fetch has filters that decode it anyway (encryption).
                CappedUnlessDecoded { .. } if key == ApiKey::Fetch && fetch_decoded => max,
                CappedUnlessDecoded { max: capped } => max.min(capped),
                Dropped => continue,
            };
            if let Some(slot) = ranges.get_mut(index) {
                *slot = (crate_range.min, max);
            }
        }
        VersionLimits { ranges }
    }

    /// The versions offered for `api_key`, if any.
    pub fn range(&self, api_key: i16) -> Option<(i16, i16)> {
        let (min, max) = *self.ranges.get(usize::try_from(api_key).ok()?)?;
        (min <= max).then_some((min, max))
    }

    #[inline]
    pub fn allows(&self, api_key: i16, version: i16) -> bool {
        self.range(api_key)
            .is_some_and(|(min, max)| (min..=max).contains(&version))
    }
}

impl std::fmt::Debug for VersionLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries((0i16..256).filter_map(|key| self.range(key).map(|range| (key, range))))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Keys whose response schema (any version up to the reviewed one) has a
    /// field naming a broker or controller: host, port, node endpoints,
    /// listeners. Hand-maintained from the `kafka-protocol` sources; the scan
    /// below checks it against them when it can find them.
    const ADDRESS_FIELDS: &[(ApiKey, &str)] = &[
        (ApiKey::Produce, "node_endpoints"),
        (ApiKey::Fetch, "node_endpoints"),
        (ApiKey::Metadata, "brokers[].host/port"),
        (
            ApiKey::FindCoordinator,
            "host/port, coordinators[].host/port",
        ),
        (ApiKey::DescribeCluster, "brokers[].host/port"),
        (ApiKey::DescribeQuorum, "nodes[].listeners"),
        (ApiKey::Vote, "node_endpoints"),
        (ApiKey::BeginQuorumEpoch, "node_endpoints"),
        (ApiKey::EndQuorumEpoch, "node_endpoints"),
        (ApiKey::FetchSnapshot, "node_endpoints"),
        (ApiKey::UpdateRaftVoter, "current_leader.host/port"),
        (ApiKey::ShareFetch, "node_endpoints"),
        (ApiKey::ShareAcknowledge, "node_endpoints"),
    ];

    /// Keys with host-like fields that do not name a broker.
    const NOT_BROKER_ADDRESSES: &[(ApiKey, &str)] = &[
        (ApiKey::DescribeAcls, "host: an ACL's client-host pattern"),
        (ApiKey::DeleteAcls, "host: an ACL's client-host pattern"),
        (
            ApiKey::DescribeGroups,
            "client_host: the member's (the edge's) address",
        ),
        (
            ApiKey::ConsumerGroupDescribe,
            "client_host: the member's (the edge's) address",
        ),
        (
            ApiKey::ShareGroupDescribe,
            "client_host: the member's (the edge's) address",
        ),
    ];

    /// Keys whose response values (not fields) can be addresses.
    const ADDRESS_VALUES: &[(ApiKey, &str)] = &[(
        ApiKey::DescribeConfigs,
        "broker configs: listeners, advertised.listeners, controller.quorum.voters",
    )];

    #[test]
    fn every_api_key_has_exactly_one_decision_for_every_version_it_knows() {
        let mut unclassified = Vec::new();
        let mut unreviewed = Vec::new();
        for key in ApiKey::iter() {
            let rows = POLICY.iter().filter(|row| row.key == key).count();
            assert!(rows <= 1, "{key:?} has {rows} rows in POLICY");
            match policy_of(key) {
                None => unclassified.push(key),
                Some(row) if row.reviewed_max != key.valid_versions().max => {
                    unreviewed.push((key, row.reviewed_max, key.valid_versions().max))
                }
                Some(_) => {}
            }
        }
        assert!(
            unclassified.is_empty(),
            "API keys without a decision in POLICY (check their response schemas for broker \
             addresses, then add a row): {unclassified:?}"
        );
        assert!(
            unreviewed.is_empty(),
            "kafka-protocol decodes versions newer than POLICY reviewed (key, reviewed, now): \
             {unreviewed:?}; check the new versions' responses for addresses, then raise reviewed_max"
        );
        assert_eq!(POLICY.len(), ApiKey::iter().count());
    }

    #[test]
    fn keys_with_addresses_are_never_offered_unrewritten() {
        for (key, field) in ADDRESS_FIELDS.iter().chain(ADDRESS_VALUES) {
            let row = policy_of(*key).unwrap_or_else(|| panic!("{key:?} has no row"));
            assert_ne!(
                row.exposure, NoAddress,
                "{key:?} carries {field} and must be rewritten, capped or dropped"
            );
        }
        for (key, what) in NOT_BROKER_ADDRESSES {
            assert!(
                !ADDRESS_FIELDS.iter().any(|(k, _)| k == key),
                "{key:?}: {what}"
            );
        }
    }

    #[test]
    fn limits_follow_the_table() {
        let plain = VersionLimits::get(false);
        let decoding = VersionLimits::get(true);
        assert_eq!(plain.range(ApiKey::Fetch as i16), Some((4, 15)));
        assert_eq!(decoding.range(ApiKey::Fetch as i16), Some((4, 18)));
        assert!(plain.allows(ApiKey::Fetch as i16, 15));
        assert!(!plain.allows(ApiKey::Fetch as i16, 16));
        assert_eq!(plain.range(ApiKey::Produce as i16), Some((3, 13)));
        for key in [
            ApiKey::ShareFetch,
            ApiKey::ShareAcknowledge,
            ApiKey::Vote,
            ApiKey::FetchSnapshot,
            ApiKey::Envelope,
            ApiKey::WriteTxnMarkers,
        ] {
            assert_eq!(plain.range(key as i16), None, "{key:?}");
            assert_eq!(decoding.range(key as i16), None, "{key:?}");
        }
        assert_eq!(plain.range(9999), None);
        assert_eq!(plain.range(-1), None);
        // Everything else is offered in full.
        for key in ApiKey::iter() {
            if policy_of(key).is_some_and(|row| row.exposure == NoAddress) {
                let range = key.valid_versions();
                assert_eq!(plain.range(key as i16), Some((range.min, range.max)));
            }
        }
    }

    /// `describe_cluster` → `DescribeCluster`: a message source file's name,
    /// less `_request.rs` or `_response.rs`, as its `ApiKey` is spelled.
    fn camel_case(stem: &str) -> String {
        stem.split('_')
            .map(|word| {
                let mut chars = word.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect()
    }

    /// Cross-checks [`ADDRESS_FIELDS`] against the `kafka-protocol` sources
    /// in the cargo registry: every response that declares a host, port,
    /// endpoint, listener, address or URL field must be listed (as carrying
    /// broker addresses or as not). Skipped, with a note, where the sources
    /// are not at the usual place (a vendored build).
    #[test]
    fn address_fields_match_the_kafka_protocol_sources() {
        let Some(messages) = kafka_protocol_messages_dir() else {
            eprintln!("kafka-protocol sources not found: schema scan skipped");
            return;
        };
        let by_name: BTreeMap<String, ApiKey> = ApiKey::iter()
            .map(|key| (format!("{key:?}"), key))
            .collect();
        let mut found = BTreeSet::new();
        let entries = std::fs::read_dir(&messages).expect("readable messages dir");
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = file.strip_suffix("_response.rs") else {
                continue;
            };
            let camel = camel_case(stem);
            let key = *by_name
                .get(&camel)
                .unwrap_or_else(|| panic!("{file}: no ApiKey named {camel}"));
            let source = std::fs::read_to_string(entry.path()).expect("readable source");
            let addressy = source.lines().any(|line| {
                let Some(field) = line
                    .trim_start()
                    .strip_prefix("pub ")
                    .and_then(|rest| rest.split_once(':'))
                    .map(|(name, _)| name)
                else {
                    return false;
                };
                field == "host"
                    || field == "port"
                    || ["host", "endpoint", "listener", "address", "url"]
                        .iter()
                        .any(|word| field.contains(word))
            });
            if addressy {
                found.insert(key as i16);
            }
        }
        let listed: BTreeSet<i16> = ADDRESS_FIELDS
            .iter()
            .chain(NOT_BROKER_ADDRESSES)
            .map(|(key, _)| *key as i16)
            .collect();
        let name = |keys: BTreeSet<&i16>| -> Vec<String> {
            keys.into_iter()
                .map(|k| strait_kafka::api_keys::api_key_name(*k))
                .collect()
        };
        assert_eq!(
            name(found.difference(&listed).collect()),
            Vec::<String>::new(),
            "responses with address-like fields missing from ADDRESS_FIELDS / NOT_BROKER_ADDRESSES"
        );
        assert_eq!(
            name(listed.difference(&found).collect()),
            Vec::<String>::new(),
            "listed keys whose responses have no address-like field"
        );
    }

    /// Every key the edge offers whose request or response schema has a
    /// `BrokerId` field is in `KEYS_WITH_NODE_IDS`, for the direction it
    /// carries it in, so the node-id translation covers it; and every listed
    /// key without one carries ids in strings (config resources).
    #[test]
    fn node_id_fields_match_the_kafka_protocol_sources() {
        use crate::rewrite::{Carries, KEYS_WITH_NODE_IDS};
        let vendored = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../third_party/kafka-protocol/src/messages");
        let Some(messages) = Some(vendored)
            .filter(|dir| dir.is_dir())
            .or_else(kafka_protocol_messages_dir)
        else {
            eprintln!("kafka-protocol sources not found: schema scan skipped");
            return;
        };
        let by_name: BTreeMap<String, ApiKey> = ApiKey::iter()
            .map(|key| (format!("{key:?}"), key))
            .collect();
        // (key, carried in requests, carried in responses)
        let mut found: BTreeMap<i16, (bool, bool)> = BTreeMap::new();
        for entry in std::fs::read_dir(&messages)
            .expect("readable messages dir")
            .flatten()
        {
            let file = entry.file_name().to_string_lossy().into_owned();
            let (stem, is_request) = match (
                file.strip_suffix("_request.rs"),
                file.strip_suffix("_response.rs"),
            ) {
                (Some(stem), _) => (stem.to_owned(), true),
                (_, Some(stem)) => (stem.to_owned(), false),
                _ => continue,
            };
            let camel = camel_case(&stem);
            let Some(key) = by_name.get(&camel) else {
                continue;
            };
            if VersionLimits::get(true).range(*key as i16).is_none() {
                continue; // never offered
            }
            let source = std::fs::read_to_string(entry.path()).expect("readable source");
            let carries = source.lines().any(|line| {
                let line = line.trim_start();
                line.starts_with("pub ") && line.contains("BrokerId") && !line.contains("fn ")
            });
            if carries {
                let slot = found.entry(*key as i16).or_default();
                if is_request {
                    slot.0 = true
                } else {
                    slot.1 = true
                }
            }
        }
        let listed: BTreeMap<i16, Carries> = KEYS_WITH_NODE_IDS
            .iter()
            .map(|(key, carries, _)| (*key as i16, *carries))
            .collect();
        let mut missing = Vec::new();
        for (key, (request, response)) in &found {
            let covered = match listed.get(key) {
                Some(Carries::Both) => true,
                Some(Carries::Request) => !response,
                Some(Carries::Response) => !request,
                None => false,
            };
            if !covered {
                missing.push((
                    strait_kafka::api_keys::api_key_name(*key),
                    *request,
                    *response,
                ));
            }
        }
        assert_eq!(missing, Vec::new(), "keys whose (request, response) carry BrokerId fields the node-id translation does not cover");
        let in_strings: BTreeSet<i16> = listed
            .keys()
            .filter(|key| !found.contains_key(key))
            .copied()
            .collect();
        let expected: BTreeSet<i16> = [
            ApiKey::DescribeConfigs,
            ApiKey::AlterConfigs,
            ApiKey::IncrementalAlterConfigs,
        ]
        .into_iter()
        .map(|key| key as i16)
        .collect();
        assert_eq!(
            in_strings, expected,
            "listed keys with no BrokerId field must carry ids in strings"
        );
    }

    /// `$CARGO_HOME/registry/src/*/kafka-protocol-<locked version>/src/messages`.
    fn kafka_protocol_messages_dir() -> Option<std::path::PathBuf> {
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let lock = std::fs::read_to_string(workspace.join("Cargo.lock")).ok()?;
        let version = lock
            .split("[[package]]")
            .find(|package| package.contains("name = \"kafka-protocol\""))?
            .lines()
            .find_map(|line| line.strip_prefix("version = "))?
            .trim_matches('"')
            .to_owned();
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".cargo"))
            })?;
        std::fs::read_dir(cargo_home.join("registry/src"))
            .ok()?
            .flatten()
            .map(|index| {
                index
                    .path()
                    .join(format!("kafka-protocol-{version}/src/messages"))
            })
            .find(|dir| dir.is_dir())
    }
}
