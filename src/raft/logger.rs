//! Routes raft-rs's slog records into `tracing`, so one RUST_LOG filter
//! controls all logs. raft-rs is chatty at info level (every election and
//! term change); those land at debug under the target `raft`.

use slog::{Drain, Level, OwnedKVList, Record};

/// Writes one group's records, each with the group's partition id (an
/// election line without it cannot be tied to a partition).
struct TracingDrain {
    partition: u32,
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, _values: &OwnedKVList) -> Result<(), slog::Never> {
        let (p, msg) = (self.partition, record.msg());
        match record.level() {
            Level::Critical | Level::Error => {
                tracing::error!(target: "raft", partition = p, "{msg}")
            }
            Level::Warning => tracing::warn!(target: "raft", partition = p, "{msg}"),
            Level::Info => tracing::debug!(target: "raft", partition = p, "{msg}"),
            Level::Debug | Level::Trace => tracing::trace!(target: "raft", partition = p, "{msg}"),
        }
        Ok(())
    }
}

/// A logger for one group, tagged with its partition id.
pub fn group_logger(partition: u32) -> slog::Logger {
    slog::Logger::root(TracingDrain { partition }.fuse(), slog::o!())
}
