//! Protects the whole filter chain of an authorizing, encrypting listener,
//! in-process: the edge's own version negotiation and address rewriting
//! (edge/proxy `rewrite.rs`, `rewrite/policy.rs`), then authorization
//! (edge/authz) and record encryption (edge/filters `encryption.rs` over
//! edge/encryption), in the order the proxy builds them. Requests and broker
//! answers arrive as `strait_fuzz::steps`; a Metadata answer teaches topic
//! ids, a Produce is encrypted and a Fetch answer decrypted, and every
//! address a broker names is rewritten.
//!
//! The first byte picks the principal (as in `authz_filter`) and whether the
//! encryption engine is the strict one.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use strait_authz::{
    AuditSink, AuthorizationConfig, AuthorizationFilterFactory, Authorizer, AuthzMetrics,
};
use strait_filter::{Filter, FilterChain, FilterFactory, Principal};
use strait_filters::encryption::EncryptionFilterFactory;
use strait_fuzz::{block_on, connection, encryption, run_session, AUTHZ_RULES, ORDERS};
use strait_proxy::brokers::BrokerMap;
use strait_proxy::rewrite::edge_filters;

fn rules() -> &'static (Arc<Authorizer>, AuthzMetrics) {
    static RULES: OnceLock<(Arc<Authorizer>, AuthzMetrics)> = OnceLock::new();
    RULES.get_or_init(|| {
        let config = AuthorizationConfig::from_yaml(AUTHZ_RULES).expect("the fixed rules");
        let authorizer = Arc::new(Authorizer::new(&config).expect("valid rules"));
        (authorizer, AuthzMetrics::register(&mut Registry::default()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&who, data)) = data.split_first() else {
        return;
    };
    let principal = match who % 4 {
        0 => Principal::Named(ORDERS.into()),
        1 => Principal::Named("spiffe://example.org/ns/shop/sa/billing".into()),
        2 => Principal::Named("spiffe://evil.org/ns/x/sa/y".into()),
        _ => Principal::Anonymous,
    };
    let info = connection(principal);
    let (authorizer, metrics) = rules();
    // Fresh per input (SNI addressing binds no sockets): nothing learnt from
    // one input's answers (brokers, topic ids, DEKs) is carried to the next.
    let authz =
        AuthorizationFilterFactory::new(authorizer.clone(), AuditSink::disabled(), metrics, "fuzz");
    let encrypt = EncryptionFilterFactory::new(Arc::new(encryption(who & 4 != 0)));
    let configured: Vec<Box<dyn Filter>> = vec![authz.create(&info), encrypt.create(&info)];
    let brokers = BrokerMap::sni(
        &format!("broker-{}.edge.example", strait_edge_config::NODE_ID),
        9092,
        Gauge::default(),
    );
    let mut filters: Vec<Box<dyn Filter>> = edge_filters(brokers, &configured).into();
    filters.extend(configured);
    let mut chain = FilterChain::new(filters);
    block_on(run_session(&mut chain, &info, data));
});
