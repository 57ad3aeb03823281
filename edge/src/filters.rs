//! Turns configuration into the filters of each virtual cluster, keeping
//! what did not change (encryption cores hold DEK caches worth keeping).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use prometheus_client::registry::Registry;
use strait_authz::{
    AuditConfig, AuditSink, AuthorizationConfig, AuthorizationFilterFactory, AuthorizationMode,
    Authorizer, AuthzMetrics,
};
use strait_edge_config::{Config, Upstream, VirtualCluster};
use strait_encryption::{EncryptionConfig, RecordEncryption};
use strait_filter::FilterFactory;
use strait_filters::encryption::EncryptionFilterFactory;
use strait_filters::fence::FenceFilterFactory;
use strait_filters::producer_epochs::ProducerEpochsFactory;

use crate::offsets::{Checkpoints, OffsetTranslationFactory, Reset};
use strait_keys_topic::KeysTopic;
use strait_kms_broker::client::OwnIdentity;
use strait_kms_core::config::KmsConfig;
use strait_kms_core::KmsSet;
use strait_proxy::FiltersByCluster;
use strait_tls::CredentialReceiver;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

pub struct FilterBuilder {
    registry: Arc<RwLock<Registry>>,
    authz_metrics: Option<AuthzMetrics>,
    /// Per virtual cluster: the live rules (reloaded in place, so open
    /// connections see changes on their next request) and the audit sink.
    authorization: HashMap<String, AuthzEntry>,
    kms: Option<(Vec<KmsConfig>, KmsSet)>,
    /// The upstream too: the keys topic is reached through it.
    encryption: HashMap<String, (EncryptionConfig, Upstream, Arc<dyn FilterFactory>)>,
    /// Virtual clusters without rules, and why, so that the WARN is written
    /// once when a cluster starts (or changes to) that state, not on every change.
    open_clusters: HashMap<String, &'static str>,
    /// Per virtual cluster on a standby: the MM2 checkpoints followed (kept
    /// while the topic and upstream stay, so a rebuild does not re-read).
    checkpoints: HashMap<String, CheckpointsEntry>,
    /// Per virtual cluster after a switch: the producer sequences seen on
    /// its upstream (cluster, generation), kept while that upstream is.
    producer_epochs: HashMap<String, ProducerEpochsEntry>,
    /// The edge's SVID (with `--join-token`), for KMS brokers configured
    /// with `identity: svid`; without it such a configuration is refused.
    identity: Option<OwnIdentity>,
    /// The same SVID as a credential channel, for keys-topic connections to
    /// upstreams with `tls.identity: svid`.
    svid: Option<CredentialReceiver>,
    /// The mesh's tunnels, for the checkpoints of a standby behind a peer
    /// edge.
    remote: Option<Arc<dyn strait_proxy::RemoteUpstreams>>,
}

/// The upstream (active cluster, generation) a producer-epochs filter
/// follows, and the filter.
type ProducerEpochsEntry = ((String, u64), Arc<dyn FilterFactory>);

/// (checkpoints topic, upstream, the filter factory), and the guard that
/// stops the follower's upstream when the entry goes.
type CheckpointsEntry = (
    String,
    Upstream,
    Arc<dyn FilterFactory>,
    Arc<tokio_util::sync::DropGuard>,
);

struct AuthzEntry {
    rules: AuthorizationConfig,
    audit: Option<AuditConfig>,
    authorizer: Arc<Authorizer>,
    factory: Arc<dyn FilterFactory>,
}

impl FilterBuilder {
    pub fn new(registry: Arc<RwLock<Registry>>, identity: Option<OwnIdentity>) -> Self {
        FilterBuilder {
            registry,
            authz_metrics: None,
            authorization: HashMap::new(),
            kms: None,
            encryption: HashMap::new(),
            open_clusters: HashMap::new(),
            checkpoints: HashMap::new(),
            identity,
            svid: None,
            remote: None,
            producer_epochs: HashMap::new(),
        }
    }

    pub fn with_svid(mut self, svid: Option<CredentialReceiver>) -> Self {
        self.svid = svid;
        self
    }

    /// The mesh in force (it was started or rebuilt): checkpoints followed
    /// through the previous one's tunnels are followed again through these.
    pub fn set_remote(&mut self, remote: Option<Arc<dyn strait_proxy::RemoteUpstreams>>) {
        self.remote = remote;
        self.checkpoints.retain(|_, entry| entry.1.remote.is_none());
    }

    pub async fn build(&mut self, config: &Config) -> anyhow::Result<FiltersByCluster> {
        let mut filters = FiltersByCluster::new();
        let mut encryption = HashMap::new();
        let mut authorization = HashMap::new();
        let mut checkpoints = HashMap::new();
        let mut producer_epochs = HashMap::new();
        for vc in &config.virtual_clusters {
            let mut chain: Vec<Arc<dyn FilterFactory>> = Vec::new();
            // Authorization first: a denied request is never encrypted or forwarded.
            match &vc.authorization {
                // Fail closed: an emptied rule list denies everything.
                Some(rules) if rules.mode == AuthorizationMode::Rules => {
                    let entry = self
                        .authorization_entry(&vc.name, rules, vc.audit.as_ref())
                        .await?;
                    chain.push(entry.factory.clone());
                    authorization.insert(vc.name.clone(), entry);
                }
                Some(_) => {
                    if self.open_clusters.insert(vc.name.clone(), "allow_all") != Some("allow_all")
                    {
                        tracing::info!(virtual_cluster = %vc.name, "authorization: mode allow_all, every request is allowed");
                    }
                }
                None => {
                    if self.open_clusters.insert(vc.name.clone(), "none") != Some("none") {
                        tracing::warn!(virtual_cluster = %vc.name, "no authorization configured: every client that connects may do everything; add an authorization block (or mode: allow_all to say so)");
                    }
                }
            }
            if vc
                .authorization
                .as_ref()
                .is_some_and(|a| a.mode == AuthorizationMode::Rules)
            {
                self.open_clusters.remove(&vc.name);
            }
            if let Some(topic) = vc
                .upstream
                .failover
                .as_ref()
                .and_then(|f| f.checkpoints_topic.as_ref())
            {
                let factory = self.offset_translation(vc, topic)?;
                checkpoints.insert(vc.name.clone(), factory.clone());
                chain.push(factory.2.clone());
            }
            // A fenced produce is answered before it would be encrypted.
            if let Some(f) = vc.upstream.failover.as_ref().filter(|f| f.fence.is_some()) {
                chain.push(Arc::new(FenceFilterFactory::new(&f.group)));
            }
            // After a switch, idempotent producers restart their sequences
            // (see strait_filters::producer_epochs); one set per upstream.
            if let Some(f) = vc.upstream.failover.as_ref().filter(|f| f.generation > 0) {
                let upstream = (f.cluster.clone(), f.generation);
                let factory = match self.producer_epochs.remove(&vc.name) {
                    Some((kept, factory)) if kept == upstream => factory,
                    _ => Arc::new(ProducerEpochsFactory::new(&f.group)) as Arc<dyn FilterFactory>,
                };
                producer_epochs.insert(vc.name.clone(), (upstream, factory.clone()));
                chain.push(factory);
            }
            if let Some(enc) = &vc.encryption {
                let factory = match self.encryption.remove(&vc.name) {
                    Some((old, upstream, factory))
                        if &old == enc
                            && upstream == vc.upstream
                            && self.kms_unchanged(&config.kms) =>
                    {
                        factory
                    }
                    _ => self.encryption_factory(vc, enc, &config.kms).await?,
                };
                encryption.insert(
                    vc.name.clone(),
                    (enc.clone(), vc.upstream.clone(), factory.clone()),
                );
                chain.push(factory);
            }
            filters.insert(vc.name.clone(), chain);
        }
        self.encryption = encryption;
        self.authorization = authorization;
        self.checkpoints = checkpoints;
        self.producer_epochs = producer_epochs;
        self.open_clusters
            .retain(|name, _| config.virtual_clusters.iter().any(|vc| &vc.name == name));
        Ok(filters)
    }

    fn offset_translation(
        &mut self,
        vc: &VirtualCluster,
        topic: &str,
    ) -> anyhow::Result<CheckpointsEntry> {
        let reset_policy = vc.upstream.failover.as_ref().and_then(|f| f.offset_reset);
        if let Some(entry) = self.checkpoints.remove(&vc.name) {
            if entry.0 == topic
                && entry.1.bootstrap_servers == vc.upstream.bootstrap_servers
                && entry.1.remote == vc.upstream.remote
                && entry.1.tls == vc.upstream.tls
                && entry.1.failover.as_ref().and_then(|f| f.offset_reset) == reset_policy
            {
                return Ok(entry);
            }
        }
        let stop = CancellationToken::new();
        // A standby behind a peer edge is read through its tunnel.
        let upstream = strait_proxy::own_upstream_of(
            &vc.name,
            &vc.upstream,
            self.remote.as_ref(),
            self.svid.as_ref(),
            stop.clone(),
        )
        .map_err(|e| anyhow::anyhow!("MirrorMaker 2 checkpoints of '{}': {e}", vc.name))?;
        let followed = Checkpoints::follow(upstream.clone(), topic.to_string());
        let reset = reset_policy.map(|policy| Reset { policy, upstream });
        Ok((
            topic.to_string(),
            vc.upstream.clone(),
            Arc::new(OffsetTranslationFactory::new(followed, reset)),
            Arc::new(stop.drop_guard()),
        ))
    }

    async fn authorization_entry(
        &mut self,
        virtual_cluster: &str,
        rules: &AuthorizationConfig,
        audit: Option<&AuditConfig>,
    ) -> anyhow::Result<AuthzEntry> {
        let metrics = match &self.authz_metrics {
            Some(metrics) => metrics.clone(),
            None => {
                let mut registry = self.registry.write().await;
                let metrics = AuthzMetrics::register(registry.sub_registry_with_prefix("strait"));
                self.authz_metrics = Some(metrics.clone());
                metrics
            }
        };
        if let Some(mut entry) = self.authorization.remove(virtual_cluster) {
            if entry.rules != *rules {
                entry.authorizer.reload(rules).map_err(|errors| {
                    anyhow::anyhow!("virtual cluster '{virtual_cluster}': {errors}")
                })?;
                tracing::info!(
                    virtual_cluster,
                    rules = rules.rules.len(),
                    "authorization rules reloaded"
                );
                entry.rules = rules.clone();
            }
            if entry.audit.as_ref() == audit {
                return Ok(entry);
            }
            return self.authz_factory(virtual_cluster, entry.authorizer, rules, audit, metrics);
        }
        let authorizer =
            Arc::new(Authorizer::new(rules).map_err(|errors| {
                anyhow::anyhow!("virtual cluster '{virtual_cluster}': {errors}")
            })?);
        tracing::info!(
            virtual_cluster,
            rules = rules.rules.len(),
            "authorization enabled"
        );
        self.authz_factory(virtual_cluster, authorizer, rules, audit, metrics)
    }

    fn authz_factory(
        &self,
        virtual_cluster: &str,
        authorizer: Arc<Authorizer>,
        rules: &AuthorizationConfig,
        audit: Option<&AuditConfig>,
        metrics: AuthzMetrics,
    ) -> anyhow::Result<AuthzEntry> {
        let sink = match audit {
            Some(audit) => {
                AuditSink::spawn(audit, metrics.clone())
                    .with_context(|| {
                        format!(
                            "virtual cluster '{virtual_cluster}': cannot open audit log {}",
                            audit.path
                        )
                    })?
                    .0
            }
            None => AuditSink::disabled(),
        };
        let factory = Arc::new(AuthorizationFilterFactory::new(
            authorizer.clone(),
            sink,
            &metrics,
            virtual_cluster.to_owned(),
        ));
        Ok(AuthzEntry {
            rules: rules.clone(),
            audit: audit.cloned(),
            authorizer,
            factory,
        })
    }

    fn kms_unchanged(&self, kms: &[KmsConfig]) -> bool {
        self.kms.as_ref().is_some_and(|(current, _)| current == kms)
    }

    async fn kms_set(&mut self, kms: &[KmsConfig]) -> anyhow::Result<KmsSet> {
        if let Some((current, set)) = &self.kms {
            if current == kms {
                return Ok(set.clone());
            }
        }
        let mut registry = self.registry.write().await;
        let set =
            strait_kms_broker::kms::build_kms_set_with(kms, &mut registry, self.identity.as_ref())
                .await
                .context("cannot set up the configured KMSs")?;
        self.kms = Some((kms.to_vec(), set.clone()));
        Ok(set)
    }

    async fn encryption_factory(
        &mut self,
        vc: &VirtualCluster,
        config: &EncryptionConfig,
        kms: &[KmsConfig],
    ) -> anyhow::Result<Arc<dyn FilterFactory>> {
        let virtual_cluster = vc.name.as_str();
        let set = self.kms_set(kms).await?;
        // The keys topic lives in the cluster behind a direct upstream; a
        // cluster behind a peer edge is encrypted (and federated) over there.
        let keys = match (config.federated(), &vc.upstream.remote) {
            (true, None) => {
                let stop = CancellationToken::new();
                let (upstream, _) =
                    strait_proxy::direct_upstream(vc, None, self.svid.as_ref(), stop.clone())
                        .map_err(|e| anyhow::anyhow!("keys topic of '{virtual_cluster}': {e}"))?;
                Some((
                    Arc::new(upstream) as Arc<dyn strait_proxy::upstream::Upstream>,
                    Arc::new(stop.drop_guard()),
                ))
            }
            (true, Some(_)) => {
                tracing::warn!(virtual_cluster, "keys_topic and also_wrap_for have no effect on a virtual cluster behind a peer edge: its own edge encrypts and federates");
                None
            }
            _ => None,
        };
        let topic = config.keys_topic.clone().unwrap_or_default();
        let key_log = keys.as_ref().map(|(upstream, guard)| {
            Arc::new(KeysTopic::new(
                upstream.clone(),
                topic.name.clone(),
                guard.clone(),
            )) as Arc<dyn strait_encryption::KeyLog>
        });
        let mut registry = self.registry.write().await;
        let cluster_registry = registry.sub_registry_with_label((
            Cow::Borrowed("virtual_cluster"),
            Cow::Owned(virtual_cluster.to_owned()),
        ));
        let core = RecordEncryption::with_key_log(config.clone(), set, cluster_registry, key_log)
            .map_err(|errors| {
            anyhow::anyhow!("virtual cluster '{virtual_cluster}': {errors}")
        })?;
        if let (Some((upstream, guard)), Some(index)) = (keys, core.keys_index()) {
            let topics = std::iter::once((topic.name.clone(), true))
                .chain(topic.also_read.iter().map(|t| (t.clone(), false)))
                .collect();
            strait_keys_topic::spawn_followers(upstream, topics, index, guard);
            tracing::info!(virtual_cluster, keys_topic = %topic.name, also_read = ?topic.also_read, "federated record encryption: following the keys topics");
        }
        tracing::info!(
            virtual_cluster,
            rules = config.rules.len(),
            "record encryption enabled"
        );
        Ok(Arc::new(EncryptionFilterFactory::new(Arc::new(core))))
    }
}
