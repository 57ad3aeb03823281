//! Issuance records: every certificate the CA signed (serial, SPIFFE ID,
//! expiry, CA generation), kept until it expires. Rotation reads them to
//! know how long a retiring root must stay trusted.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRecord {
    pub serial_hex: String,
    pub spiffe_id: String,
    pub not_after_unix: i64,
    pub ca_generation: u64,
}

/// Records that have expired at `now` (to delete).
pub fn expired(records: &[IssuedRecord], now: i64) -> Vec<&IssuedRecord> {
    records.iter().filter(|r| r.not_after_unix <= now).collect()
}

/// The latest expiry among certificates `generation` signed.
pub fn last_not_after(records: &[IssuedRecord], generation: u64) -> Option<i64> {
    records
        .iter()
        .filter(|r| r.ca_generation == generation)
        .map(|r| r.not_after_unix)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(serial: &str, not_after: i64, generation: u64) -> IssuedRecord {
        IssuedRecord {
            serial_hex: serial.into(),
            spiffe_id: "spiffe://example.org/edge/e1".into(),
            not_after_unix: not_after,
            ca_generation: generation,
        }
    }

    #[test]
    fn pruning_and_last_expiry() {
        let rs = vec![rec("01", 100, 1), rec("02", 200, 1), rec("03", 150, 2)];
        let gone: Vec<&str> = expired(&rs, 150)
            .iter()
            .map(|r| r.serial_hex.as_str())
            .collect();
        assert_eq!(gone, vec!["01", "03"]);
        assert_eq!(last_not_after(&rs, 1), Some(200));
        assert_eq!(last_not_after(&rs, 2), Some(150));
        assert_eq!(last_not_after(&rs, 3), None);
    }
}
