//! A fixed-size set of API keys, cheap enough to test on every frame.

use kafka_protocol::messages::ApiKey;

/// Bit set over API key numbers 0..256. Kafka's API keys are small,
/// non-negative integers; anything outside the range is simply "not in the set".
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiKeySet([u64; 4]);

impl ApiKeySet {
    pub const EMPTY: ApiKeySet = ApiKeySet([0; 4]);
    pub const ALL: ApiKeySet = ApiKeySet([u64::MAX; 4]);

    pub fn of(keys: &[ApiKey]) -> Self {
        let mut set = Self::EMPTY;
        for key in keys {
            set.insert(*key as i16);
        }
        set
    }

    pub fn insert(&mut self, key: i16) {
        if (0..256).contains(&key) {
            self.0[key as usize / 64] |= 1 << (key as usize % 64);
        }
    }

    #[inline]
    pub fn contains(&self, key: i16) -> bool {
        (0..256).contains(&key) && self.0[key as usize / 64] & (1 << (key as usize % 64)) != 0
    }

    pub fn union(self, other: ApiKeySet) -> ApiKeySet {
        let mut out = self;
        for (word, other) in out.0.iter_mut().zip(other.0) {
            *word |= other;
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
}

impl std::fmt::Debug for ApiKeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries((0i16..256).filter(|k| self.contains(*k)))
            .finish()
    }
}

/// The API key's name for logs and metric labels, or its number when the
/// `kafka-protocol` crate does not know it.
pub fn api_key_name(key: i16) -> String {
    match ApiKey::try_from(key) {
        Ok(api_key) => format!("{api_key:?}"),
        Err(()) => key.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership() {
        let set = ApiKeySet::of(&[ApiKey::Metadata, ApiKey::FindCoordinator]);
        assert!(set.contains(ApiKey::Metadata as i16));
        assert!(set.contains(ApiKey::FindCoordinator as i16));
        assert!(!set.contains(ApiKey::Produce as i16));
        assert!(!set.contains(-1));
        assert!(!set.contains(300));
        let all = set.union(ApiKeySet::of(&[ApiKey::Produce]));
        assert!(all.contains(ApiKey::Produce as i16));
        assert!(ApiKeySet::ALL.contains(255));
        assert!(ApiKeySet::EMPTY.is_empty());
    }

    #[test]
    fn names() {
        assert_eq!(api_key_name(3), "Metadata");
        assert_eq!(api_key_name(9999), "9999");
    }
}
