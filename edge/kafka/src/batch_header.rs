//! The producer fields of a record batch, read in place from its header.

/// The producer fields of a v2 record batch header (what every client since
/// Kafka 0.11 writes; older formats carry no producer id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerFields {
    /// -1 for a producer that is not idempotent.
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
}

impl ProducerFields {
    const MAGIC: usize = 16;
    const ATTRIBUTES: usize = 21;
    const PRODUCER_ID: usize = 43;
    const PRODUCER_EPOCH: usize = 51;
    const BASE_SEQUENCE: usize = 53;
    const TRANSACTIONAL: i16 = 0x10;

    /// The fields of the first batch of `records`; `None` if it is not a
    /// v2 batch or its header is cut short.
    pub fn read(records: &[u8]) -> Option<Self> {
        if *records.get(Self::MAGIC)? != 2 {
            return None;
        }
        let at = |offset: usize, len: usize| records.get(offset..offset + len);
        Some(Self {
            producer_id: i64::from_be_bytes(at(Self::PRODUCER_ID, 8)?.try_into().ok()?),
            producer_epoch: i16::from_be_bytes(at(Self::PRODUCER_EPOCH, 2)?.try_into().ok()?),
            base_sequence: i32::from_be_bytes(at(Self::BASE_SEQUENCE, 4)?.try_into().ok()?),
            transactional: i16::from_be_bytes(at(Self::ATTRIBUTES, 2)?.try_into().ok()?)
                & Self::TRANSACTIONAL
                != 0,
        })
    }

    /// An idempotent producer outside a transaction: its sequence is its
    /// own, not a transaction coordinator's.
    pub fn idempotent_only(&self) -> bool {
        self.producer_id >= 0 && !self.transactional
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(producer_id: i64, epoch: i16, base_sequence: i32, attributes: i16) -> Vec<u8> {
        let mut b = vec![0u8; 61];
        b[16] = 2;
        b[21..23].copy_from_slice(&attributes.to_be_bytes());
        b[43..51].copy_from_slice(&producer_id.to_be_bytes());
        b[51..53].copy_from_slice(&epoch.to_be_bytes());
        b[53..57].copy_from_slice(&base_sequence.to_be_bytes());
        b
    }

    #[test]
    fn reads_the_producer_fields_of_a_v2_batch() {
        let fields = ProducerFields::read(&header(7, 3, 314, 0x10)).unwrap();
        assert_eq!(
            fields,
            ProducerFields {
                producer_id: 7,
                producer_epoch: 3,
                base_sequence: 314,
                transactional: true
            }
        );
        assert!(!fields.idempotent_only());
        assert!(ProducerFields::read(&header(7, 0, 0, 0))
            .unwrap()
            .idempotent_only());
        assert!(!ProducerFields::read(&header(-1, -1, -1, 0))
            .unwrap()
            .idempotent_only());
    }

    #[test]
    fn refuses_other_magics_and_short_headers() {
        let mut old = header(7, 0, 0, 0);
        old[16] = 1;
        assert_eq!(ProducerFields::read(&old), None);
        assert_eq!(ProducerFields::read(&header(7, 0, 0, 0)[..55]), None);
        assert_eq!(ProducerFields::read(&[]), None);
    }
}
