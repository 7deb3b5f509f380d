//! Node settings. Every default is documented where it is set.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Why a setting was refused. The messages name the setting and the value.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The config file is not the JSON of `MultiRaftConfig`.
    #[error("{0}")]
    Json(String),
    /// A field's value was refused.
    #[error("{field}: {source}")]
    Field {
        field: &'static str,
        source: Box<ConfigError>,
    },
    #[error("{0:?} is not a duration like \"1.5s\", \"500ms\" or \"2m\"")]
    NotADuration(String),
    #[error("{0:?} must be a positive duration")]
    NotPositive(String),
    #[error("{0:?} is shorter than a nanosecond")]
    TooShort(String),
    #[error("{0:?} is too long a duration")]
    TooLong(String),
    #[error("{0} is not a uint64")]
    NotAUint64(String),
    /// Values that do not fit together.
    #[error("{0}")]
    Inconsistent(&'static str),
}

impl ConfigError {
    fn of(field: &'static str) -> impl FnOnce(ConfigError) -> ConfigError {
        move |e| ConfigError::Field {
            field,
            source: Box::new(e),
        }
    }
}

/// Raft settings shared by every partition of the node: the atomix
/// `MultiRaftConfig`, read at start-up from proto3 JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct RaftConfig {
    /// Leader heartbeat period, also the raft tick (default 100 ms).
    pub heartbeat_period: Duration,
    /// Follower election timeout (default 1 s). raft-rs randomises each
    /// election in [timeout, 2 * timeout).
    pub election_timeout: Duration,
    /// Applied entries after which a partition snapshots its state machine
    /// and compacts its log (default 10000).
    pub snapshot_entry_threshold: u64,
    /// Entries kept behind a snapshot so that slightly lagging followers
    /// catch up from the log instead of a snapshot (default 1000).
    pub compaction_retain_entries: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_period: Duration::from_millis(100),
            election_timeout: Duration::from_secs(1),
            snapshot_entry_threshold: 10_000,
            compaction_retain_entries: 1_000,
        }
    }
}

/// proto3 JSON of `MultiRaftConfig`: durations as "1.5s" (the other units
/// of [`parse_duration`], like "500ms", are accepted too), uint64 as
/// strings (numbers are accepted too).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RaftConfigJson {
    heartbeat_period: Option<String>,
    election_timeout: Option<String>,
    snapshot_entry_threshold: Option<serde_json::Value>,
    compaction_retain_entries: Option<serde_json::Value>,
}

impl RaftConfig {
    /// Parses `MultiRaftConfig` proto3 JSON; absent fields keep defaults.
    pub fn from_json(text: &str) -> Result<RaftConfig, ConfigError> {
        let j: RaftConfigJson =
            serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let mut c = RaftConfig::default();
        if let Some(s) = j.heartbeat_period {
            c.heartbeat_period = parse_duration(&s).map_err(ConfigError::of("heartbeatPeriod"))?;
        }
        if let Some(s) = j.election_timeout {
            c.election_timeout = parse_duration(&s).map_err(ConfigError::of("electionTimeout"))?;
        }
        if let Some(v) = j.snapshot_entry_threshold {
            c.snapshot_entry_threshold =
                parse_u64(&v).map_err(ConfigError::of("snapshotEntryThreshold"))?;
        }
        if let Some(v) = j.compaction_retain_entries {
            c.compaction_retain_entries =
                parse_u64(&v).map_err(ConfigError::of("compactionRetainEntries"))?;
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_period < Duration::from_millis(1) {
            return Err(ConfigError::Inconsistent(
                "heartbeatPeriod must be at least 1ms",
            ));
        }
        if self.election_timeout < self.heartbeat_period * 2 {
            return Err(ConfigError::Inconsistent(
                "electionTimeout must be at least twice heartbeatPeriod",
            ));
        }
        if self.snapshot_entry_threshold == 0 {
            return Err(ConfigError::Inconsistent(
                "snapshotEntryThreshold must be positive",
            ));
        }
        Ok(())
    }

    /// Election timeout in ticks (one tick = one heartbeat period).
    pub fn election_ticks(&self) -> usize {
        let t = self.election_timeout.as_micros() / self.heartbeat_period.as_micros().max(1);
        (t as usize).max(2)
    }
}

/// Parses a duration: a positive decimal number and a unit, `ms`, `s`,
/// `m` or `h` ("500ms", "0.05s", "2s", "1.5m", "1h"; spaces around it are
/// ignored). The one grammar of every command-line flag and config field
/// that takes a duration: the config's proto3 JSON durations ("0.5s") are
/// its seconds case. Zero, negative, non-finite and out-of-range values
/// are refused, and so is a number without a unit.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::NotADuration(s.to_string());
    let t = s.trim();
    // "ms" before "s" and "m": "500ms" is milliseconds, not minutes.
    let (num, secs_of): (&str, fn(f64) -> f64) = if let Some(n) = t.strip_suffix("ms") {
        (n, |v| v / 1000.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, |v| v)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, |v| v * 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, |v| v * 3600.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 {
        return Err(ConfigError::NotPositive(s.to_string()));
    }
    match Duration::try_from_secs_f64(secs_of(v)) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(ConfigError::TooShort(s.to_string())),
        Err(_) => Err(ConfigError::TooLong(s.to_string())),
    }
}

fn parse_u64(v: &serde_json::Value) -> Result<u64, ConfigError> {
    let not = |shown: String| ConfigError::NotAUint64(shown);
    match v {
        serde_json::Value::Number(n) => n.as_u64().ok_or_else(|| not(n.to_string())),
        serde_json::Value::String(s) => s.parse().map_err(|_| not(format!("{s:?}"))),
        other => Err(not(other.to_string())),
    }
}

/// Everything `multiraft serve` needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: u64,
    pub api_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Number of shards (pinned executors); default: one per available CPU.
    pub shards: usize,
    pub raft: RaftConfig,
    /// Largest gRPC request message (default 4 MiB).
    pub max_message_size: usize,
    /// Largest KV key (default 64 KiB).
    pub max_key_size: usize,
    /// Largest KV value (default 1 MiB).
    pub max_value_size: usize,
    /// Proposals in flight per partition before new ones are refused with
    /// RESOURCE_EXHAUSTED (default 8192): bounds memory under a flood.
    pub max_inflight_proposals: usize,
    /// Bytes of glommio's pinned I/O memory per shard (default 2 MiB; it
    /// counts against RLIMIT_MEMLOCK for non-root users).
    pub io_memory: usize,
    /// Size of one preallocated WAL segment file (default 64 MiB).
    pub wal_segment_size: u64,
    /// Raft log the node keeps in memory, over all its partitions and
    /// shards (default 256 MiB, split evenly between the shards). Above
    /// it a shard snapshots and compacts its biggest logs first, whatever
    /// their `snapshotEntryThreshold`.
    pub log_memory: u64,
    /// Mutual TLS between nodes (default: none, peers talk in clear).
    pub peer_tls: Option<crate::tls::PeerTls>,
    /// TLS on the API port (default: none, h2c).
    pub api_tls: Option<crate::tls::ApiTls>,
    /// Client connections and the bytes their calls hold, per shard
    /// (defaults in `grpc::ServerConfig`).
    pub api_limits: crate::grpc::Limits,
}

impl NodeConfig {
    pub fn new(
        node_id: u64,
        api_addr: SocketAddr,
        raft_addr: SocketAddr,
        data_dir: PathBuf,
    ) -> Self {
        NodeConfig {
            node_id,
            api_addr,
            raft_addr,
            data_dir,
            // One per CPU, at most 256 (see `node::Node::start`).
            shards: std::thread::available_parallelism()
                .map(|n| n.get().min(256))
                .unwrap_or(1),
            raft: RaftConfig::default(),
            max_message_size: 4 << 20,
            max_key_size: 64 << 10,
            max_value_size: 1 << 20,
            max_inflight_proposals: 8192,
            io_memory: 2 << 20,
            wal_segment_size: 64 << 20,
            log_memory: 256 << 20,
            peer_tls: None,
            api_tls: None,
            api_limits: crate::grpc::ServerConfig::default().limits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proto3_json() {
        let c = RaftConfig::from_json(
            r#"{"heartbeatPeriod":"0.05s","electionTimeout":"0.5s","snapshotEntryThreshold":"200","compactionRetainEntries":50}"#,
        )
        .unwrap();
        assert_eq!(c.heartbeat_period, Duration::from_millis(50));
        assert_eq!(c.election_timeout, Duration::from_millis(500));
        assert_eq!(c.snapshot_entry_threshold, 200);
        assert_eq!(c.compaction_retain_entries, 50);
        assert_eq!(c.election_ticks(), 10);
    }

    /// Every flag and config field parses durations with this one grammar.
    #[test]
    fn duration_grammar() {
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        for (text, want) in [
            // `bootstrap --timeout 500ms`, `bench --duration 500ms`.
            ("500ms", ms(500)),
            ("1ms", ms(1)),
            ("0.5ms", Duration::from_micros(500)),
            ("2s", secs(2)),
            ("10s", secs(10)),
            ("1.5s", ms(1500)),
            // The config file's proto3 JSON form.
            ("0.05s", ms(50)),
            ("0.5s", ms(500)),
            ("1m", secs(60)),
            ("2m", secs(120)),
            ("1h", secs(3600)),
            (" 30s ", secs(30)),
            ("10 s", secs(10)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
        for bad in [
            "", "10", "0.5", "s", "ms", "xs", "fast", "1d", "10sec", "1s5", "1,5s", "0s", "0ms",
            "-1s", "-500ms", "nans", "infs", "1e-12s", "1e300h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn config_durations_take_every_unit() {
        let c =
            RaftConfig::from_json(r#"{"heartbeatPeriod":"50ms","electionTimeout":"1m"}"#).unwrap();
        assert_eq!(c.heartbeat_period, Duration::from_millis(50));
        assert_eq!(c.election_timeout, Duration::from_secs(60));
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            r#"{"heartbeatPeriod":"fast"}"#,
            r#"{"electionTimeout":"-1s"}"#,
            r#"{"snapshotEntryThreshold":"x"}"#,
            r#"{"heartbeatPeriod":"1s","electionTimeout":"1s"}"#,
            r#"{"unknown":1}"#,
        ] {
            assert!(RaftConfig::from_json(bad).is_err(), "{bad}");
        }
    }
}
