//! Protects the authorization filter's request and response handling
//! (edge/authz `filter.rs`, `responses.rs`): the real filter, in-process,
//! driven with arbitrary request frames and broker answers on one
//! connection (the input format is `strait_fuzz::steps`). Every API it
//! covers is decoded from what an unauthenticated client sends; a refusal
//! must encode in the request's own response shape and version.
//!
//! The first byte picks the principal: one with rules, one matched by a
//! wildcard, a stranger, or an anonymous client.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use prometheus_client::registry::Registry;
use strait_authz::{
    AuditSink, AuthorizationConfig, AuthorizationFilterFactory, Authorizer, AuthzMetrics,
};
use strait_filter::{FilterChain, FilterFactory, Principal};
use strait_fuzz::{block_on, connection, run_session, AUTHZ_RULES, ORDERS};

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
    let (authorizer, metrics) = rules();
    // A factory per input: the topic ids it learns are not carried over.
    let factory =
        AuthorizationFilterFactory::new(authorizer.clone(), AuditSink::disabled(), metrics, "fuzz");
    let info = connection(principal);
    let mut chain = FilterChain::new(vec![factory.create(&info)]);
    block_on(run_session(&mut chain, &info, data));
});
