//! Kafka wire framing for Strait.
