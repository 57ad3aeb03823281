//! The certificate authority of a Strait trust domain, as pure logic: CA
//! roots and their generations ([`rotation`]), CSR signing under the one
//! SPIFFE identity scheme ([`authority`], [`spiffe`]), sealing of CA keys
//! ([`seal`]) and join tokens ([`token`]). No clocks (callers pass `now`),
//! no disks or networks except what a [`seal::Sealer`] is given; the
//! control plane's API layer stores what this crate produces through Raft.
#![forbid(unsafe_code)]

pub mod authority;
pub mod issued;
pub mod rotation;
pub mod seal;
pub mod spiffe;
pub mod token;

pub use authority::{
    generate_root, new_key_and_csr, root_pin, spiffe_id_of, CaError, GeneratedRoot, Issued,
    SignRequest, Signer,
};
pub use rotation::{bundle, plan, signer, CaState, Generation, RotationPolicy, Transition};
pub use seal::{FileSealer, KmsSealer, SealContext, SealError, Sealer};
pub use spiffe::{Lifetimes, Role, SpiffeError, SpiffeId, MIN_LIFETIME};
pub use token::{Token, TokenError, TokenRecord};
