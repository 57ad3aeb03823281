//! Turns configuration into the filters of each virtual cluster, keeping
//! what did not change (encryption cores hold DEK caches worth keeping).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use prometheus_client::registry::Registry;
use strait_edge_config::Config;
use strait_encryption::{EncryptionConfig, RecordEncryption};
use strait_filter::FilterFactory;
use strait_filters::encryption::EncryptionFilterFactory;
use strait_kms_core::config::KmsConfig;
use strait_kms_core::KmsSet;
use strait_proxy::FiltersByCluster;
use tokio::sync::RwLock;

pub struct FilterBuilder {
    registry: Arc<RwLock<Registry>>,
    kms: Option<(Vec<KmsConfig>, KmsSet)>,
    encryption: HashMap<String, (EncryptionConfig, Arc<dyn FilterFactory>)>,
}

impl FilterBuilder {
    pub fn new(registry: Arc<RwLock<Registry>>) -> Self {
        FilterBuilder {
            registry,
            kms: None,
            encryption: HashMap::new(),
        }
    }

    pub async fn build(&mut self, config: &Config) -> anyhow::Result<FiltersByCluster> {
        let mut filters = FiltersByCluster::new();
        let mut encryption = HashMap::new();
        for vc in &config.virtual_clusters {
            let mut chain: Vec<Arc<dyn FilterFactory>> = Vec::new();
            if let Some(enc) = &vc.encryption {
                let factory = match self.encryption.remove(&vc.name) {
                    Some((old, factory)) if &old == enc && self.kms_unchanged(&config.kms) => {
                        factory
                    }
                    _ => self.encryption_factory(&vc.name, enc, &config.kms).await?,
                };
                encryption.insert(vc.name.clone(), (enc.clone(), factory.clone()));
                chain.push(factory);
            }
            filters.insert(vc.name.clone(), chain);
        }
        self.encryption = encryption;
        Ok(filters)
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
        let set = strait_kms_broker::kms::build_kms_set(kms, &mut registry)
            .await
            .context("cannot set up the configured KMSs")?;
        self.kms = Some((kms.to_vec(), set.clone()));
        Ok(set)
    }

    async fn encryption_factory(
        &mut self,
        virtual_cluster: &str,
        config: &EncryptionConfig,
        kms: &[KmsConfig],
    ) -> anyhow::Result<Arc<dyn FilterFactory>> {
        let set = self.kms_set(kms).await?;
        let mut registry = self.registry.write().await;
        let cluster_registry = registry.sub_registry_with_label((
            Cow::Borrowed("virtual_cluster"),
            Cow::Owned(virtual_cluster.to_owned()),
        ));
        let core = RecordEncryption::new(config.clone(), set, cluster_registry)
            .map_err(|errors| anyhow::anyhow!("virtual cluster '{virtual_cluster}': {errors}"))?;
        tracing::info!(
            virtual_cluster,
            rules = config.rules.len(),
            "record encryption enabled"
        );
        Ok(Arc::new(EncryptionFilterFactory::new(Arc::new(core))))
    }
}
