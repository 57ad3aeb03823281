//! `upstream.failover.offset_reset`, in the form YAML users write.

/// `upstream.failover.offset_reset`: the edge's answer to OffsetFetch for a
/// partition nothing else places. Written `earliest`, `latest` or
/// `{ timestamp_ms: N }` (YAML has no plain form for a tagged enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "OffsetResetRepr", into = "OffsetResetRepr")]
pub enum OffsetReset {
    /// The log start: every record the standby holds is read.
    Earliest,
    /// The end: only what is produced from now on is read.
    Latest,
    /// The first record whose timestamp is at or after this one (Unix ms),
    /// or the end when there is none.
    TimestampMs(i64),
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
enum OffsetResetRepr {
    Named(String),
    Timestamp(TimestampReset),
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct TimestampReset {
    timestamp_ms: i64,
}

impl TryFrom<OffsetResetRepr> for OffsetReset {
    type Error = String;

    fn try_from(repr: OffsetResetRepr) -> Result<Self, String> {
        match repr {
            OffsetResetRepr::Named(name) if name == "earliest" => Ok(OffsetReset::Earliest),
            OffsetResetRepr::Named(name) if name == "latest" => Ok(OffsetReset::Latest),
            OffsetResetRepr::Named(name) => Err(format!(
                "unknown offset_reset '{name}': expected earliest, latest or {{ timestamp_ms: N }}"
            )),
            OffsetResetRepr::Timestamp(t) => Ok(OffsetReset::TimestampMs(t.timestamp_ms)),
        }
    }
}

impl From<OffsetReset> for OffsetResetRepr {
    fn from(reset: OffsetReset) -> Self {
        match reset {
            OffsetReset::Earliest => OffsetResetRepr::Named("earliest".into()),
            OffsetReset::Latest => OffsetResetRepr::Named("latest".into()),
            OffsetReset::TimestampMs(timestamp_ms) => {
                OffsetResetRepr::Timestamp(TimestampReset { timestamp_ms })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<OffsetReset, String> {
        serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn the_three_forms_parse_and_anything_else_is_named() {
        assert_eq!(parse("earliest"), Ok(OffsetReset::Earliest));
        assert_eq!(parse("latest"), Ok(OffsetReset::Latest));
        assert_eq!(
            parse("{ timestamp_ms: 1700000000000 }"),
            Ok(OffsetReset::TimestampMs(1_700_000_000_000))
        );
        assert!(parse("newest")
            .unwrap_err()
            .contains("unknown offset_reset 'newest'"));
        assert!(parse("{ timestamp_ms: 1, extra: 2 }").is_err());
        let written = serde_yaml_ng::to_string(&OffsetReset::TimestampMs(5)).unwrap();
        assert_eq!(parse(&written), Ok(OffsetReset::TimestampMs(5)));
    }
}
