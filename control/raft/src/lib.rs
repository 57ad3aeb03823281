//! Replicated store of the Strait control plane.
//!
//! One OS thread per node owns the raft-rs `RawNode` and runs the ready loop:
//! it drains every queued input (peer messages, proposals, read requests) per
//! iteration so that many proposals share one append and one fsync, persists
//! to redb, sends messages, and applies committed entries to the pure
//! `strait_control_state::State`. Async callers talk to it through channels.

mod logger;
mod metrics;
mod node;
pub mod storage;
mod transport;

pub use metrics::RaftMetrics;
pub use node::{
    MemberInfo, Node, NodeConfig, NodeStatus, ProposeError, TlsClientConfig, WatchSignal,
};
pub use transport::RaftService;
