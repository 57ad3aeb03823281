//! A faithful codec for v2 record batches.
//!
//! kafka-protocol's encoder recomputes the base offset, base timestamp and
//! last offset delta from the records it is given and drops the
//! timestamp-type bit and duplicate header keys. That is fine for producers
//! but wrong for a proxy that must hand back batches exactly as the broker
//! stored them (after compaction the first/last record of a batch may be
//! gone while the header still spans them). So this module keeps the 61-byte
//! batch header verbatim, decodes records with their deltas as stored, and
//! re-encodes only the records section (then length and CRC). Compression
//! uses kafka-protocol's codecs.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::compression::{self as cmpr, Compressor, Decompressor};

pub(crate) const HEADER_LEN: usize = 61;
const ATTR_OFFSET: usize = 21;
const CRC_OFFSET: usize = 17;
const LENGTH_OFFSET: usize = 8;
const COUNT_OFFSET: usize = 57;
const MAGIC_OFFSET: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("malformed record batch: {0}")]
pub struct BatchError(pub String);

fn bad(msg: impl Into<String>) -> BatchError {
    BatchError(msg.into())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub key: Bytes,
    pub value: Option<Bytes>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub attributes: i8,
    pub timestamp_delta: i64,
    pub offset_delta: i32,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// One batch as found on the wire.
pub struct RawBatch {
    /// The whole batch, header included.
    pub bytes: Bytes,
}

/// The `N` bytes at `at` of a batch, zeros past its end: an old-format
/// entry (magic 0/1) may be shorter than a v2 header, and the v2 fields of
/// one are meaningless anyway (it is refused or passed on by magic).
fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    bytes
        .get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; N])
}

impl RawBatch {
    /// Every batch [`split_batches`] returns holds its magic byte.
    pub fn magic(&self) -> i8 {
        field::<1>(&self.bytes, MAGIC_OFFSET)[0] as i8
    }
    pub fn attributes(&self) -> i16 {
        i16::from_be_bytes(field(&self.bytes, ATTR_OFFSET))
    }
    pub fn compression_code(&self) -> i16 {
        self.attributes() & 0x07
    }
    pub fn is_control(&self) -> bool {
        self.attributes() & (1 << 5) != 0
    }
    pub fn record_count(&self) -> i32 {
        i32::from_be_bytes(field(&self.bytes, COUNT_OFFSET))
    }

    /// The records section, decompressed (a zero-copy slice when the batch
    /// is uncompressed).
    pub fn plain_records(&self) -> Result<Bytes, BatchError> {
        if self.magic() != 2 {
            return Err(bad(format!("magic {} is not supported", self.magic())));
        }
        decompress(self.compression_code(), self.bytes.slice(HEADER_LEN..))
    }

    /// The record count the batch header declares, checked non-negative.
    pub fn declared_count(&self) -> Result<usize, BatchError> {
        usize::try_from(self.record_count()).map_err(|_| bad("negative record count"))
    }

    /// Decompress and decode every record into owned values (the slow,
    /// general path; the hot paths iterate [`RecordIter`] instead).
    pub fn records(&self) -> Result<Vec<Record>, BatchError> {
        let plain = self.plain_records()?;
        let mut it = RecordIter::new(&plain, self.declared_count()?);
        let mut out = Vec::with_capacity(it.remaining().min(1 << 16));
        while let Some(r) = it.next_record()? {
            out.push(r.to_record());
        }
        Ok(out)
    }

    /// A new batch with the same header (offsets, timestamps, producer
    /// id/epoch, base sequence, flags, codec) and `records` re-encoded and
    /// recompressed with the batch's original codec.
    pub fn with_records(&self, records: &[Record]) -> Result<Bytes, BatchError> {
        let mut out = BytesMut::new();
        let mut w = self.writer(&mut out, records.len(), self.bytes.len() * 2);
        for r in records {
            encode_record(w.buf(), r);
        }
        w.finish()?;
        Ok(out.freeze())
    }

    /// Start re-encoding this batch into `out` with `count` records of about
    /// `records_len` bytes (uncompressed): records are written through
    /// [`BatchWriter::buf`], straight into `out` when uncompressed.
    pub fn writer<'a>(
        &self,
        out: &'a mut BytesMut,
        count: usize,
        records_len: usize,
    ) -> BatchWriter<'a> {
        let start = out.len();
        let code = self.compression_code();
        let plain = (code != 0).then(|| BytesMut::with_capacity(records_len));
        out.reserve(
            HEADER_LEN
                + if code == 0 {
                    records_len
                } else {
                    self.bytes.len()
                },
        );
        out.extend_from_slice(&self.bytes[..HEADER_LEN]);
        let count = i32::try_from(count).unwrap_or(i32::MAX);
        out[start + COUNT_OFFSET..start + COUNT_OFFSET + 4].copy_from_slice(&count.to_be_bytes());
        BatchWriter {
            out,
            start,
            code,
            plain,
            crc: crc_fast::Digest::new_with_params(*CRC32C_FOLDING),
            crc_done: start + ATTR_OFFSET,
        }
    }
}

/// CRC-32C (Castagnoli, what Kafka batches carry) computed by crc-fast's
/// generic PCLMULQDQ folding rather than its default for this polynomial,
/// which interleaves the `crc32` instruction: that instruction issues once
/// every 3 cycles on AMD Zen, where folding measured 1.8x faster (6.4 vs
/// 3.6 GB/s); on Intel both run well above the AES-GCM they sit next to.
static CRC32C_FOLDING: std::sync::LazyLock<crc_fast::CrcParams> = std::sync::LazyLock::new(|| {
    crc_fast::CrcParams::new(
        "CRC-32/ISCSI",
        32,
        0x1edc_6f41,
        0xffff_ffff,
        true,
        0xffff_ffff,
        0xe306_9283,
    )
});

/// Checksum written records in pieces of this size, while they are still in
/// the L1/L2 cache: one pass over a whole batch after the fact read it back
/// from L3 or memory and cost 10-13 % of decrypting 16 KiB records.
const CRC_CHUNK: usize = 8 * 1024;

/// Re-encodes one batch; see [`RawBatch::writer`].
pub struct BatchWriter<'a> {
    out: &'a mut BytesMut,
    start: usize,
    code: i16,
    plain: Option<BytesMut>,
    /// CRC-32C of `out[start + ATTR_OFFSET..crc_done]` (what the batch CRC covers).
    crc: crc_fast::Digest,
    crc_done: usize,
}

impl BatchWriter<'_> {
    /// Where the next record goes.
    #[inline]
    pub fn buf(&mut self) -> &mut BytesMut {
        match &mut self.plain {
            Some(p) => p,
            None => {
                if self.out.len() - self.crc_done >= CRC_CHUNK {
                    self.crc.update(&self.out[self.crc_done..]);
                    self.crc_done = self.out.len();
                }
                self.out
            }
        }
    }

    /// Undo everything written for this batch (the caller copies the
    /// original bytes instead).
    pub fn abandon(self) {
        self.out.truncate(self.start);
    }

    /// Compress (if needed) and fix length and CRC.
    pub fn finish(mut self) -> Result<(), BatchError> {
        if let Some(p) = self.plain.take() {
            compress(self.code, p.freeze(), self.out)?;
        }
        let out = self.out;
        let s = self.start;
        self.crc.update(&out[self.crc_done..]);
        let batch_len = i32::try_from(out.len() - s - 12).map_err(|_| bad("batch too large"))?;
        out[s + LENGTH_OFFSET..s + LENGTH_OFFSET + 4].copy_from_slice(&batch_len.to_be_bytes());
        let crc = self.crc.finalize() as u32;
        out[s + CRC_OFFSET..s + CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
        Ok(())
    }
}

/// Split a `records` field into whole batches. A trailing partial batch (a
/// broker may cut the last one at the fetch size limit) is dropped: clients
/// ignore it and fetch it again.
pub fn split_batches(buf: &Bytes) -> Result<Vec<RawBatch>, BatchError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while buf.len() - pos >= 12 {
        let len = i32::from_be_bytes([buf[pos + 8], buf[pos + 9], buf[pos + 10], buf[pos + 11]]);
        if len < 0 {
            return Err(bad("negative batch length"));
        }
        let end = pos + 12 + len as usize;
        if end > buf.len() {
            break;
        }
        if (len as usize) + 12 < HEADER_LEN {
            // Old message format (magic 0/1) entries can be short; keep them
            // whole, if they hold the magic byte that says so.
            if end > pos + MAGIC_OFFSET && buf[pos + MAGIC_OFFSET] < 2 {
                out.push(RawBatch {
                    bytes: buf.slice(pos..end),
                });
                pos = end;
                continue;
            }
            return Err(bad("batch shorter than its header"));
        }
        out.push(RawBatch {
            bytes: buf.slice(pos..end),
        });
        pos = end;
    }
    Ok(out)
}

fn decompress(code: i16, section: Bytes) -> Result<Bytes, BatchError> {
    let mut buf = section;
    let take = |b: &mut Bytes| Ok(b.split_to(b.len()));
    let res = match code {
        0 => return Ok(buf),
        1 => cmpr::Gzip::decompress(&mut buf, take),
        2 => cmpr::Snappy::decompress(&mut buf, take),
        3 => cmpr::Lz4::decompress(&mut buf, take),
        4 => cmpr::Zstd::decompress(&mut buf, take),
        c => return Err(bad(format!("unknown compression codec {c}"))),
    };
    res.map_err(|e| bad(format!("decompression failed: {e:#}")))
}

fn compress(code: i16, plain: Bytes, out: &mut BytesMut) -> Result<(), BatchError> {
    let put = |b: &mut BytesMut| {
        b.put_slice(&plain);
        Ok(())
    };
    let res = match code {
        0 => {
            out.put_slice(&plain);
            Ok(())
        }
        1 => cmpr::Gzip::compress(out, put),
        2 => cmpr::Snappy::compress(out, put),
        3 => cmpr::Lz4::compress(out, put),
        4 => cmpr::Zstd::compress(out, put),
        c => return Err(bad(format!("unknown compression codec {c}"))),
    };
    res.map_err(|e| bad(format!("compression failed: {e:#}")))
}

#[inline]
fn zigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Read a zigzag varint. Inlined fast paths for one and two bytes: record
/// lengths, deltas and field lengths of records up to 8 KiB.
#[inline(always)]
fn read_varlong(buf: &mut &[u8]) -> Result<i64, BatchError> {
    let b: &[u8] = buf;
    match b {
        [b0, rest @ ..] if *b0 < 0x80 => {
            *buf = rest;
            Ok(zigzag(u64::from(*b0)))
        }
        [b0, b1, rest @ ..] if *b1 < 0x80 => {
            *buf = rest;
            Ok(zigzag(u64::from(b0 & 0x7f) | u64::from(*b1) << 7))
        }
        _ => read_varlong_slow(buf),
    }
}

#[cold]
fn read_varlong_slow(buf: &mut &[u8]) -> Result<i64, BatchError> {
    let mut value: u64 = 0;
    let mut shift = 0;
    loop {
        let Some((&b, rest)) = buf.split_first() else {
            return Err(bad("truncated varint"));
        };
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(zigzag(value));
        }
        shift += 7;
        if shift > 63 {
            return Err(bad("varint too long"));
        }
    }
}

#[inline(always)]
fn read_varint(buf: &mut &[u8]) -> Result<i32, BatchError> {
    i32::try_from(read_varlong(buf)?).map_err(|_| bad("varint out of range"))
}

#[inline(always)]
fn read_opt_slice<'a>(buf: &mut &'a [u8]) -> Result<Option<&'a [u8]>, BatchError> {
    let len = read_varint(buf)?;
    let Ok(len) = usize::try_from(len) else {
        return Ok(None);
    };
    if buf.len() < len {
        return Err(bad("truncated field"));
    }
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(Some(field))
}

#[inline(always)]
fn put_varlong(buf: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    // Byte by byte: a slice copy here would be a libc call per varint.
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

fn put_opt_bytes(buf: &mut BytesMut, v: Option<&[u8]>) {
    match v {
        None => buf.put_u8(1), // zigzag(-1)
        Some(b) => {
            put_varlong(buf, b.len() as i64);
            buf.put_slice(b);
        }
    }
}

/// Slice equality without a libc call: prefix and header-key comparisons
/// run once per record, where `memcmp`'s call overhead showed (3 % at 100 B).
#[inline]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut x = a.chunks_exact(8);
    let mut y = b.chunks_exact(8);
    let words_equal = x.by_ref().zip(y.by_ref()).fold(0u64, |acc, (p, q)| {
        acc | (u64::from_ne_bytes(p.try_into().unwrap_or_default())
            ^ u64::from_ne_bytes(q.try_into().unwrap_or_default()))
    }) == 0;
    words_equal && x.remainder().iter().zip(y.remainder()).all(|(p, q)| p == q)
}

/// A record borrowed from a (decompressed) records section: no reference
/// counting and no allocation per record.
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    pub attributes: i8,
    pub timestamp_delta: i64,
    pub offset_delta: i32,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub header_count: usize,
    /// The encoded headers after their count, already validated.
    pub headers_raw: &'a [u8],
    /// The whole encoded record, length prefix included (to copy it verbatim).
    pub raw: &'a [u8],
    /// Attributes, deltas and key as encoded: what re-encoding with another
    /// value and headers copies unchanged, in one piece.
    pub head: &'a [u8],
    /// The first header whose key is the iterator's watched key, found
    /// while the headers were validated (no second pass).
    pub watched: Option<HeaderRef<'a>>,
}

impl<'a> RecordRef<'a> {
    pub fn headers(&self) -> HeaderIter<'a> {
        HeaderIter {
            buf: self.headers_raw,
            left: self.header_count,
            consumed: 0,
        }
    }

    pub fn to_record(self) -> Record {
        let b = |s: &[u8]| Bytes::copy_from_slice(s);
        Record {
            attributes: self.attributes,
            timestamp_delta: self.timestamp_delta,
            offset_delta: self.offset_delta,
            key: self.key.map(b),
            value: self.value.map(b),
            headers: self
                .headers()
                .map(|h| Header {
                    key: b(h.key),
                    value: h.value.map(b),
                })
                .collect(),
        }
    }
}

/// One header of a [`RecordRef`], with its byte range in `headers_raw`.
#[derive(Clone, Copy, Debug)]
pub struct HeaderRef<'a> {
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
    pub start: usize,
    pub end: usize,
}

pub struct HeaderIter<'a> {
    buf: &'a [u8],
    left: usize,
    consumed: usize,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = HeaderRef<'a>;

    fn next(&mut self) -> Option<HeaderRef<'a>> {
        if self.left == 0 {
            return None;
        }
        // The headers were validated when the record was decoded, so these
        // reads cannot fail; stop rather than panic if they ever did.
        let before = self.buf.len();
        let key = read_opt_slice(&mut self.buf).ok()??;
        let value = read_opt_slice(&mut self.buf).ok()?;
        let start = self.consumed;
        self.consumed += before - self.buf.len();
        self.left -= 1;
        Some(HeaderRef {
            key,
            value,
            start,
            end: self.consumed,
        })
    }
}

/// Iterates the records of a records section, checking that the section
/// holds exactly the number of records the batch header declares.
#[derive(Clone)]
pub struct RecordIter<'a> {
    buf: &'a [u8],
    left: usize,
    watch: &'static [u8],
}

impl<'a> RecordIter<'a> {
    pub fn new(section: &'a [u8], declared: usize) -> Self {
        Self {
            buf: section,
            left: declared,
            watch: b"",
        }
    }

    /// Locate the first header with key `key` in every record
    /// ([`RecordRef::watched`]).
    pub fn watching(mut self, key: &'static [u8]) -> Self {
        self.watch = key;
        self
    }

    /// Records still to come, as declared by the batch header (a client can
    /// lie here: callers must not trust it for anything but a size hint).
    pub fn remaining(&self) -> usize {
        self.left
    }

    /// Encoded bytes still to come.
    pub fn remaining_bytes(&self) -> usize {
        self.buf.len()
    }

    #[inline(always)]
    pub fn next_record(&mut self) -> Result<Option<RecordRef<'a>>, BatchError> {
        if self.left == 0 {
            if !self.buf.is_empty() {
                // Kafka brokers reject this too; encrypting only the declared
                // records would forward the rest as plaintext.
                return Err(bad("bytes after the last declared record"));
            }
            return Ok(None);
        }
        let whole = self.buf;
        let len = read_varint(&mut self.buf)?;
        let len = usize::try_from(len).map_err(|_| bad("negative record length"))?;
        if self.buf.len() < len {
            return Err(bad("truncated record"));
        }
        let (mut r, rest) = self.buf.split_at(len);
        self.buf = rest;
        let raw = &whole[..whole.len() - rest.len()];
        let body = r;
        let Some((&attributes, tail)) = r.split_first() else {
            return Err(bad("empty record"));
        };
        r = tail;
        let timestamp_delta = read_varlong(&mut r)?;
        let offset_delta = read_varint(&mut r)?;
        let key = read_opt_slice(&mut r)?;
        let head = &body[..body.len() - r.len()];
        let value = read_opt_slice(&mut r)?;
        let header_count =
            usize::try_from(read_varint(&mut r)?).map_err(|_| bad("negative header count"))?;
        let headers_raw = r;
        let mut watched = None;
        for _ in 0..header_count {
            let start = headers_raw.len() - r.len();
            let Some(key) = read_opt_slice(&mut r)? else {
                return Err(bad("null header key"));
            };
            let value = read_opt_slice(&mut r)?;
            if watched.is_none() && !self.watch.is_empty() && same_bytes(key, self.watch) {
                watched = Some(HeaderRef {
                    key,
                    value,
                    start,
                    end: headers_raw.len() - r.len(),
                });
            }
        }
        if !r.is_empty() {
            return Err(bad("trailing bytes in record"));
        }
        self.left -= 1;
        Ok(Some(RecordRef {
            attributes: attributes as i8,
            timestamp_delta,
            offset_delta,
            key,
            value,
            header_count,
            headers_raw,
            raw,
            head,
            watched,
        }))
    }
}

fn varlong_len(v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

fn opt_len(v: &Option<Bytes>) -> usize {
    match v {
        None => 1,
        Some(b) => varlong_len(b.len() as i64) + b.len(),
    }
}

/// Encode `r` with its value replaced by `value_len` bytes written by
/// `write_value` (`None`: a null value) and its headers replaced by
/// `header_count` headers, `headers_len` encoded bytes written by
/// `write_headers`. Attributes, deltas and key are copied as they were.
#[inline]
pub fn encode_record_ref<E>(
    buf: &mut BytesMut,
    r: &RecordRef<'_>,
    value_len: Option<usize>,
    write_value: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    header_count: usize,
    headers_len: usize,
    write_headers: impl FnOnce(&mut BytesMut),
) -> Result<(), E> {
    let body = r.head.len()
        + value_len.map_or(1, |n| varlong_len(n as i64) + n)
        + varlong_len(header_count as i64)
        + headers_len;
    put_varlong(buf, body as i64);
    buf.put_slice(r.head);
    match value_len {
        None => buf.put_u8(1),
        Some(n) => {
            put_varlong(buf, n as i64);
            let before = buf.len();
            write_value(buf)?;
            debug_assert_eq!(buf.len() - before, n);
        }
    }
    put_varlong(buf, header_count as i64);
    let before = buf.len();
    write_headers(buf);
    debug_assert_eq!(buf.len() - before, headers_len);
    Ok(())
}

/// The encoding of one header (key, value), as found in `headers_raw`.
#[cfg(test)]
pub(crate) fn encode_header(buf: &mut BytesMut, key: &[u8], value: Option<&[u8]>) {
    put_varlong(buf, key.len() as i64);
    buf.put_slice(key);
    put_opt_bytes(buf, value);
}

pub fn encode_record(buf: &mut BytesMut, r: &Record) {
    let body = 1
        + varlong_len(r.timestamp_delta)
        + varlong_len(i64::from(r.offset_delta))
        + opt_len(&r.key)
        + opt_len(&r.value)
        + varlong_len(r.headers.len() as i64)
        + r.headers
            .iter()
            .map(|h| varlong_len(h.key.len() as i64) + h.key.len() + opt_len(&h.value))
            .sum::<usize>();
    put_varlong(buf, body as i64);
    buf.put_i8(r.attributes);
    put_varlong(buf, r.timestamp_delta);
    put_varlong(buf, i64::from(r.offset_delta));
    put_opt_bytes(buf, r.key.as_deref());
    put_opt_bytes(buf, r.value.as_deref());
    put_varlong(buf, r.headers.len() as i64);
    for h in &r.headers {
        put_varlong(buf, h.key.len() as i64);
        buf.put_slice(&h.key);
        put_opt_bytes(buf, h.value.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indexmap::IndexMap;
    use kafka_protocol::records::{
        Compression, Record as KRecord, RecordBatchDecoder, RecordBatchEncoder,
        RecordEncodeOptions, TimestampType,
    };

    pub(crate) fn krecords(n: usize) -> Vec<KRecord> {
        (0..n)
            .map(|i| KRecord {
                transactional: false,
                control: false,
                partition_leader_epoch: 0,
                producer_id: 7,
                producer_epoch: 1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: 100 + i as i32,
                timestamp: 1_700_000_000_000 + i as i64,
                key: Some(Bytes::from(format!("k{i}"))),
                value: if i % 3 == 2 {
                    None
                } else {
                    Some(Bytes::from(format!("value-{i}")))
                },
                headers: IndexMap::new(),
                delete_horizon: false,
            })
            .collect()
    }

    /// Found by fuzzing (edge/fuzz `record_batch`): an entry whose length
    /// field leaves it shorter than its magic byte was kept as an old-format
    /// entry, and reading its magic (or a v2 field) panicked, on produce and
    /// on fetch.
    #[test]
    fn entries_too_short_for_their_fields_do_not_panic() {
        // Length 0: the entry ends before the magic byte, which the next entry's bytes hold.
        let mut buf = vec![0u8; 8];
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&[0u8; 8]);
        assert!(split_batches(&Bytes::from(buf)).is_err());
        // An old-format entry of 6 bytes after its length: magic 1, then nothing of a v2 header.
        let mut buf = vec![0u8; 8];
        buf.extend_from_slice(&6i32.to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, 0, 1, 0]);
        let batches = split_batches(&Bytes::from(buf)).unwrap();
        assert_eq!(batches[0].magic(), 1);
        assert_eq!(batches[0].record_count(), 0);
        assert!(!batches[0].is_control());
        assert!(batches[0].records().is_err());
    }

    /// A v2 batch header (one record, codec `code`) in front of a records section.
    fn one_record_batch(code: i16, section: &[u8]) -> Bytes {
        let mut batch = vec![0u8; HEADER_LEN];
        batch[16] = 2;
        batch[ATTR_OFFSET..ATTR_OFFSET + 2].copy_from_slice(&code.to_be_bytes());
        batch[COUNT_OFFSET..COUNT_OFFSET + 4].copy_from_slice(&1i32.to_be_bytes());
        batch.extend_from_slice(section);
        let len = (batch.len() - 12) as i32;
        batch[LENGTH_OFFSET..LENGTH_OFFSET + 4].copy_from_slice(&len.to_be_bytes());
        Bytes::from(batch)
    }

    /// Found by fuzzing (edge/fuzz `record_batch`): a snappy block declaring
    /// 4 GiB in a few bytes made the decoder allocate and zero 4 GiB on
    /// produce and fetch (edge/third_party/README.md); now an error at once.
    #[test]
    fn snappy_blocks_claiming_more_than_they_can_hold_are_refused() {
        let xerial = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01";
        for section in [
            // xerial framing: magic, block length, block declaring 2^32 - 1 bytes.
            [&xerial[..], &[0, 0, 0, 6, 0xff, 0xff, 0xff, 0xff, 0x0f, 0]].concat(),
            // Raw snappy, as the Java client falls back to without the magic.
            vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0],
        ] {
            let batches = split_batches(&one_record_batch(2, &section)).unwrap();
            let err = batches[0].records().unwrap_err();
            assert!(err.0.contains("claims 4294967295"), "{err}");
        }
    }

    /// A gzip, lz4 or zstd batch inflating past 64 MiB (a 1 MiB zstd batch of
    /// zeros holds gigabytes) is refused before it is held in memory whole
    /// (edge/third_party/README.md).
    #[test]
    fn batches_inflating_past_the_decompression_cap_are_refused() {
        use kafka_protocol::compression::{Gzip, Lz4, Zstd, MAX_DECOMPRESSED_BYTES};
        let zeros = vec![0u8; MAX_DECOMPRESSED_BYTES + 1];
        let fill = |b: &mut BytesMut| {
            b.put_slice(&zeros);
            Ok(())
        };
        for code in [1i16, 3, 4] {
            let mut section = BytesMut::new();
            match code {
                1 => Gzip::compress(&mut section, fill),
                3 => Lz4::compress(&mut section, fill),
                _ => Zstd::compress(&mut section, fill),
            }
            .unwrap();
            assert!(section.len() < 1 << 20, "{code}: {} bytes", section.len());
            let batches = split_batches(&one_record_batch(code, &section)).unwrap();
            let err = batches[0].records().unwrap_err();
            assert!(err.0.contains("decompresses to more than"), "{code}: {err}");
        }
    }

    #[test]
    fn identity_round_trip_all_codecs() {
        for c in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let mut buf = BytesMut::new();
            RecordBatchEncoder::encode(
                &mut buf,
                &krecords(10),
                &RecordEncodeOptions {
                    version: 2,
                    compression: c,
                },
            )
            .unwrap();
            let bytes = buf.freeze();
            let batches = split_batches(&bytes).unwrap();
            assert_eq!(batches.len(), 1);
            let recs = batches[0].records().unwrap();
            assert_eq!(recs.len(), 10);
            let again = batches[0].with_records(&recs).unwrap();
            // Uncompressed re-encoding is byte-identical; compressed decodes identically.
            if c == Compression::None {
                assert_eq!(again, bytes);
            }
            let mut a = again.clone();
            let decoded = RecordBatchDecoder::decode_all(&mut a).unwrap();
            assert_eq!(decoded[0].records, krecords(10), "{c:?}");
            assert_eq!(decoded[0].compression, c);
        }
    }

    #[test]
    fn batch_crc_is_crc32c() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 + 7) as u8).collect();
        for len in [0, 1, 9, 63, 64, 65, 8191, 8192, 8193, 100_000] {
            let mut d = crc_fast::Digest::new_with_params(*CRC32C_FOLDING);
            let (a, b) = data[..len].split_at(len / 3);
            d.update(a);
            d.update(b);
            assert_eq!(
                d.finalize(),
                u64::from(crc32c_reference(&data[..len])),
                "{len}"
            );
        }
        assert_eq!(crc32c_reference(b"123456789"), 0xe306_9283);
    }

    /// Bitwise CRC-32C, the definition, for checking the fast one.
    fn crc32c_reference(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn varints_round_trip_at_every_length_boundary() {
        let mut values = vec![
            0i64,
            1,
            -1,
            i64::MAX,
            i64::MIN,
            i32::MAX as i64,
            i32::MIN as i64,
        ];
        for bits in 1..63 {
            let edge = 1i64 << bits;
            values.extend([edge - 1, edge, edge + 1, -edge, -edge - 1]);
        }
        for v in values {
            let mut buf = BytesMut::new();
            put_varlong(&mut buf, v);
            assert_eq!(buf.len(), varlong_len(v), "{v}");
            let mut slice = &buf[..];
            assert_eq!(read_varlong(&mut slice).unwrap(), v, "{v}");
            assert!(slice.is_empty(), "{v}");
            // Truncated encodings are errors, never a shorter value.
            let mut short = &buf[..buf.len() - 1];
            assert!(short.is_empty() || read_varlong(&mut short).is_err(), "{v}");
        }
        let mut too_long = &[0xffu8; 11][..];
        assert!(read_varlong(&mut too_long).is_err());
    }

    #[test]
    fn partial_trailing_batch_dropped() {
        let mut buf = BytesMut::new();
        let opts = RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        };
        RecordBatchEncoder::encode(&mut buf, &krecords(3), &opts).unwrap();
        let one = buf.len();
        RecordBatchEncoder::encode(&mut buf, &krecords(3), &opts).unwrap();
        let mut bytes = buf.freeze();
        bytes.truncate(one + 20);
        assert_eq!(split_batches(&bytes).unwrap().len(), 1);
    }
}
