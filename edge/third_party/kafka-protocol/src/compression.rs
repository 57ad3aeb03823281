//! Provides compression utilities for encoding records.
//!
//! This module has implementations of gzip, Snappy, as well as a noop compression format that
//! allows encoding and decoding records into a [`Record`](crate::records::Record).

use crate::protocol::buf::{ByteBuf, ByteBufMut};
use anyhow::Result;

#[cfg(feature = "gzip")]
mod gzip;
#[cfg(feature = "lz4")]
mod lz4;
mod none;
#[cfg(feature = "snappy")]
mod snappy;
#[cfg(feature = "zstd")]
mod zstd;

#[cfg(feature = "gzip")]
pub use gzip::Gzip;
#[cfg(feature = "lz4")]
pub use lz4::Lz4;
pub use none::None;
#[cfg(feature = "snappy")]
pub use snappy::Snappy;
#[cfg(feature = "zstd")]
pub use zstd::Zstd;

/// A trait for record compression algorithms.
pub trait Compressor<B: ByteBufMut> {
    /// Target buffer type for compression.
    type BufMut: ByteBufMut;
    /// Compresses into provided [`ByteBufMut`], with records encoded by `F` into `R`.
    fn compress<R, F>(buf: &mut B, f: F) -> Result<R>
    where
        F: FnOnce(&mut Self::BufMut) -> Result<R>;
}

/// A trait for record decompression algorithms.
pub trait Decompressor<B: ByteBuf> {
    /// Target buffer type for decompression.
    type Buf: ByteBuf;
    /// Decompress records from `B` mapped using `F` into `R`.
    fn decompress<R, F>(buf: &mut B, f: F) -> Result<R>
    where
        F: FnOnce(&mut Self::Buf) -> Result<R>;
}

/// (Strait) The most one record batch may decompress to. Kafka bounds a batch's compressed size
/// (`message.max.bytes`), not what it inflates to: as published, gzip, lz4 and zstd wrote whatever the
/// stream produced, so a 1 MiB zstd batch of zeros could make a proxy allocate gigabytes. Clients batch
/// by uncompressed size (librdkafka `batch.size` 1 MB, Java 16 KiB), far below this.
pub const MAX_DECOMPRESSED_BYTES: usize = 64 << 20;

/// (Strait) A writer that refuses to grow past [`MAX_DECOMPRESSED_BYTES`].
#[cfg(any(feature = "gzip", feature = "lz4", feature = "zstd"))]
pub(crate) struct Bounded<W> {
    inner: W,
    written: usize,
}

#[cfg(any(feature = "gzip", feature = "lz4", feature = "zstd"))]
impl<W> Bounded<W> {
    pub(crate) fn new(inner: W) -> Self {
        Bounded { inner, written: 0 }
    }

    pub(crate) fn into_inner(self) -> W {
        self.inner
    }
}

#[cfg(any(feature = "gzip", feature = "lz4", feature = "zstd"))]
impl<W: std::io::Write> std::io::Write for Bounded<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.written.saturating_add(data.len()) > MAX_DECOMPRESSED_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a record batch decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes"),
            ));
        }
        let n = self.inner.write(data)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
