//! Strait's KMS broker: KMS providers (Vault Transit, AWS KMS, plus the
//! development-only local keyring from `strait-kms-core`), the
//! `strait-kms-broker` gRPC service (mTLS, callers and grants, failover,
//! alias cache, forwarding to another broker) and a
//! [`Kms`](strait_kms_core::Kms) client for it.

pub mod callers;
pub mod client;
pub mod config;
pub mod follow;
pub mod grants;
pub mod kms;
pub mod policy;
pub mod service;
pub mod shred;
pub mod svid_tls;
pub mod tls;

pub use strait_kms_core as core;
