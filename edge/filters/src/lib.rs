//! Filters that adapt Strait's libraries to the edge's filter seam.

#![forbid(unsafe_code)]

pub mod encryption;
pub mod fence;
pub mod producer_epochs;
