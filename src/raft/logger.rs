//! Routes raft-rs's slog records into `tracing`, so one RUST_LOG filter
//! controls all logs. raft-rs is chatty at info level (every election and
//! term change); those land at debug under the target `raft`.

use slog::{Drain, Level, OwnedKVList, Record};

struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, _values: &OwnedKVList) -> Result<(), slog::Never> {
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{}", record.msg()),
            Level::Warning => tracing::warn!(target: "raft", "{}", record.msg()),
            Level::Info => tracing::debug!(target: "raft", "{}", record.msg()),
            Level::Debug | Level::Trace => tracing::trace!(target: "raft", "{}", record.msg()),
        }
        Ok(())
    }
}

/// A logger for one group, tagged with its partition id.
pub fn group_logger(partition: u32) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("partition" => partition))
}
