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

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::compression::{self as cmpr, Compressor, Decompressor};

pub(crate) const HEADER_LEN: usize = 61;
const ATTR_OFFSET: usize = 21;
const CRC_OFFSET: usize = 17;
const LENGTH_OFFSET: usize = 8;
const COUNT_OFFSET: usize = 57;

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

impl RawBatch {
    pub fn magic(&self) -> i8 {
        self.bytes[16] as i8
    }
    pub fn attributes(&self) -> i16 {
        i16::from_be_bytes([self.bytes[ATTR_OFFSET], self.bytes[ATTR_OFFSET + 1]])
    }
    pub fn compression_code(&self) -> i16 {
        self.attributes() & 0x07
    }
    pub fn is_control(&self) -> bool {
        self.attributes() & (1 << 5) != 0
    }
    pub fn record_count(&self) -> i32 {
        let b = &self.bytes[COUNT_OFFSET..COUNT_OFFSET + 4];
        i32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Decompress and decode every record.
    pub fn records(&self) -> Result<Vec<Record>, BatchError> {
        if self.magic() != 2 {
            return Err(bad(format!("magic {} is not supported", self.magic())));
        }
        let section = self.bytes.slice(HEADER_LEN..);
        let plain = decompress(self.compression_code(), section)?;
        let count = self.record_count();
        if count < 0 {
            return Err(bad("negative record count"));
        }
        decode_records(plain, count as usize)
    }

    /// A new batch with the same header (offsets, timestamps, producer
    /// id/epoch, base sequence, flags, codec) and `records` re-encoded and
    /// recompressed with the batch's original codec.
    pub fn with_records(&self, records: &[Record]) -> Result<Bytes, BatchError> {
        let mut out = BytesMut::new();
        let mut w = self.writer(&mut out);
        for r in records {
            encode_record(w.buf(), r);
        }
        w.finish(records.len())?;
        Ok(out.freeze())
    }

    /// Start re-encoding this batch into `out`: records are written through
    /// [`BatchWriter::buf`] (straight into `out` when uncompressed).
    pub fn writer<'a>(&self, out: &'a mut BytesMut) -> BatchWriter<'a> {
        let start = out.len();
        out.reserve(self.bytes.len() + self.bytes.len() / 2 + 64);
        out.extend_from_slice(&self.bytes[..HEADER_LEN]);
        let code = self.compression_code();
        let plain = (code != 0).then(|| BytesMut::with_capacity(self.bytes.len() * 3));
        BatchWriter {
            out,
            start,
            code,
            plain,
        }
    }
}

/// Re-encodes one batch; see [`RawBatch::writer`].
pub struct BatchWriter<'a> {
    out: &'a mut BytesMut,
    start: usize,
    code: i16,
    plain: Option<BytesMut>,
}

impl BatchWriter<'_> {
    pub fn buf(&mut self) -> &mut BytesMut {
        match &mut self.plain {
            Some(p) => p,
            None => self.out,
        }
    }

    /// Compress (if needed) and fix length, record count and CRC.
    pub fn finish(self, count: usize) -> Result<(), BatchError> {
        let out = self.out;
        if let Some(p) = self.plain {
            compress(self.code, p.freeze(), out)?;
        }
        let s = self.start;
        let batch_len = i32::try_from(out.len() - s - 12).map_err(|_| bad("batch too large"))?;
        out[s + LENGTH_OFFSET..s + LENGTH_OFFSET + 4].copy_from_slice(&batch_len.to_be_bytes());
        out[s + COUNT_OFFSET..s + COUNT_OFFSET + 4].copy_from_slice(&(count as i32).to_be_bytes());
        let crc = crc32c::crc32c(&out[s + ATTR_OFFSET..]);
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
            // Old message format (magic 0/1) entries can be short; keep them whole.
            if buf.len() - pos >= 17 && buf[pos + 16] < 2 {
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

fn get_varlong(buf: &mut Bytes) -> Result<i64, BatchError> {
    let mut value: u64 = 0;
    let mut shift = 0;
    loop {
        if !buf.has_remaining() {
            return Err(bad("truncated varint"));
        }
        let b = buf.get_u8();
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return Err(bad("varint too long"));
        }
    }
    Ok(((value >> 1) as i64) ^ -((value & 1) as i64))
}

fn get_varint(buf: &mut Bytes) -> Result<i32, BatchError> {
    i32::try_from(get_varlong(buf)?).map_err(|_| bad("varint out of range"))
}

fn put_varlong(buf: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

fn get_opt_bytes(buf: &mut Bytes) -> Result<Option<Bytes>, BatchError> {
    let len = get_varint(buf)?;
    if len < 0 {
        return Ok(None);
    }
    let len = len as usize;
    if buf.remaining() < len {
        return Err(bad("truncated field"));
    }
    Ok(Some(buf.split_to(len)))
}

fn put_opt_bytes(buf: &mut BytesMut, v: &Option<Bytes>) {
    match v {
        None => put_varlong(buf, -1),
        Some(b) => {
            put_varlong(buf, b.len() as i64);
            buf.put_slice(b);
        }
    }
}

fn decode_records(mut buf: Bytes, count: usize) -> Result<Vec<Record>, BatchError> {
    let mut out = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let len = get_varint(&mut buf)?;
        if len < 0 || buf.remaining() < len as usize {
            return Err(bad("truncated record"));
        }
        let mut r = buf.split_to(len as usize);
        if !r.has_remaining() {
            return Err(bad("empty record"));
        }
        let attributes = r.get_i8();
        let timestamp_delta = get_varlong(&mut r)?;
        let offset_delta = get_varint(&mut r)?;
        let key = get_opt_bytes(&mut r)?;
        let value = get_opt_bytes(&mut r)?;
        let n_headers = get_varint(&mut r)?;
        if n_headers < 0 {
            return Err(bad("negative header count"));
        }
        let mut headers = Vec::with_capacity((n_headers as usize).min(1024));
        for _ in 0..n_headers {
            let key = get_opt_bytes(&mut r)?.ok_or_else(|| bad("null header key"))?;
            let value = get_opt_bytes(&mut r)?;
            headers.push(Header { key, value });
        }
        if r.has_remaining() {
            return Err(bad("trailing bytes in record"));
        }
        out.push(Record {
            attributes,
            timestamp_delta,
            offset_delta,
            key,
            value,
            headers,
        });
    }
    Ok(out)
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
/// `write_value` (`None`: null value) and with `headers` instead of its own.
pub fn encode_record_parts<'h, H, E>(
    buf: &mut BytesMut,
    r: &Record,
    value_len: Option<usize>,
    headers: H,
    write_value: impl FnOnce(&mut BytesMut) -> Result<(), E>,
) -> Result<(), E>
where
    H: Iterator<Item = (&'h [u8], Option<&'h [u8]>)> + Clone,
{
    let opt = |v: Option<usize>| v.map_or(1, |n| varlong_len(n as i64) + n);
    let (n_headers, headers_len) = headers.clone().fold((0usize, 0usize), |(n, l), (k, v)| {
        (
            n + 1,
            l + varlong_len(k.len() as i64) + k.len() + opt(v.map(|v| v.len())),
        )
    });
    let body = 1
        + varlong_len(r.timestamp_delta)
        + varlong_len(i64::from(r.offset_delta))
        + opt_len(&r.key)
        + opt(value_len)
        + varlong_len(n_headers as i64)
        + headers_len;
    put_varlong(buf, body as i64);
    buf.put_i8(r.attributes);
    put_varlong(buf, r.timestamp_delta);
    put_varlong(buf, i64::from(r.offset_delta));
    put_opt_bytes(buf, &r.key);
    match value_len {
        None => put_varlong(buf, -1),
        Some(n) => {
            put_varlong(buf, n as i64);
            let before = buf.len();
            write_value(buf)?;
            debug_assert_eq!(buf.len() - before, n);
        }
    }
    put_varlong(buf, n_headers as i64);
    for (k, v) in headers {
        put_varlong(buf, k.len() as i64);
        buf.put_slice(k);
        match v {
            None => put_varlong(buf, -1),
            Some(v) => {
                put_varlong(buf, v.len() as i64);
                buf.put_slice(v);
            }
        }
    }
    Ok(())
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
    put_opt_bytes(buf, &r.key);
    put_opt_bytes(buf, &r.value);
    put_varlong(buf, r.headers.len() as i64);
    for h in &r.headers {
        put_varlong(buf, h.key.len() as i64);
        buf.put_slice(&h.key);
        put_opt_bytes(buf, &h.value);
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
