//! Who may call the control plane, and the audit trail of what they did.
//!
//! - [`identity`]: the caller, from the verified client certificate's
//!   first `spiffe://` URI SAN.
//! - [`policy`]: the pure decision (roles, operations, deny by default).
//! - [`scope`]: which resources concern one edge.
//! - [`audit`]: tracing events on `strait_control::audit`, JSON lines.
//! - [`Authorizer`]: the three together, for the gRPC services.

pub mod audit;
mod authorizer;
pub mod glob;
pub mod identity;
pub mod policy;
pub mod scope;

pub use audit::{Audit, AuditOutcome};
pub use authorizer::{rules_of, Authorizer};
pub use glob::Glob;
pub use identity::{Caller, SpiffeId};
pub use policy::{
    Access, ControlMethod, Decision, Grants, IdentityMethod, Operation, Policy, RaftMethod,
};
pub use scope::EdgeScope;
