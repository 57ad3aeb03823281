//! Kafka wire framing for Strait.
//!
//! The proxy's hot path never decodes a message it does not need to: it reads
//! only the fixed-size prefix of each frame ([`RequestPrefix`],
//! [`ResponsePrefix`]) to learn the frame's length, API key, version and
//! correlation id, and streams the rest. Messages that a filter (or the address
//! rewriter) asked for are decoded in full with the `kafka-protocol` crate via
//! [`codec`].

#![forbid(unsafe_code)]

pub mod api_keys;
pub mod batch_header;
pub mod codec;
pub mod frame;
pub mod produce_answer;

pub use api_keys::ApiKeySet;
pub use batch_header::ProducerFields;
pub use frame::{FrameError, RequestPrefix, ResponsePrefix};
pub use kafka_protocol;
