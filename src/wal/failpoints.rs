//! Fault injection for the log's failure tests (cargo feature `failpoints`).
//!
//! Known names:
//! - `wal::write::enospc`: every DMA write of the log fails with ENOSPC
//!   before touching the disk.
//! - `wal::sync::err`: every `fdatasync` of a segment fails with EIO.
//! - `wal::sync::crash_after_snapshot_files`: a sync that has snapshot files
//!   to write makes them durable, then stops as if the process died before
//!   the log records that reference them were written.
//! - `wal::purge::crash_after_delete`: a purge deletes the segments it
//!   planned to, then stops as if the process died right after.
//!
//! A "crash" fails the call with an I/O error, which poisons the log (like
//! a failed fsync): nothing more reaches the disk, and the test reopens the
//! directory to see what recovery makes of it.
//!
//! The switches are per thread: a log lives on one executor thread, so
//! tests running side by side never trip each other's failpoints. Without
//! the feature `is_on` is a constant `false` and compiles away.

/// Every failpoint name this build knows.
#[cfg(all(test, feature = "failpoints"))]
pub const NAMES: [&str; 4] = [
    "wal::write::enospc",
    "wal::sync::err",
    "wal::sync::crash_after_snapshot_files",
    "wal::purge::crash_after_delete",
];

#[cfg(feature = "failpoints")]
mod imp {
    use std::cell::RefCell;
    use std::collections::HashSet;

    thread_local! {
        static ON: RefCell<HashSet<&'static str>> = RefCell::new(HashSet::new());
    }

    /// Turns the named failpoint on or off for the calling thread. Returns
    /// false for an unknown name.
    #[cfg(test)]
    pub fn set(name: &str, on: bool) -> bool {
        let Some(&known) = super::NAMES.iter().find(|&&n| n == name) else {
            return false;
        };
        ON.with(|s| {
            let mut s = s.borrow_mut();
            if on {
                s.insert(known);
            } else {
                s.remove(known);
            }
        });
        true
    }

    pub(crate) fn is_on(name: &str) -> bool {
        ON.with(|s| s.borrow().contains(name))
    }
}

#[cfg(all(test, feature = "failpoints"))]
pub use imp::set;

#[cfg(feature = "failpoints")]
pub(crate) use imp::is_on;

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn is_on(_name: &str) -> bool {
    false
}

/// The error a simulated crash returns.
pub(crate) fn crash(name: &str) -> super::WalError {
    super::WalError::Io {
        op: "failpoint",
        path: name.into(),
        source: std::io::Error::other(format!("simulated crash at {name}")),
    }
}
