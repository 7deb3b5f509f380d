//! Fault injection for the disk-failure tests (cargo feature `failpoints`).
//!
//! Known names:
//! - `wal::write::enospc`: every DMA write of the log fails with ENOSPC
//!   before touching the disk.
//! - `wal::sync::err`: every `fdatasync` of a segment fails with EIO.
//!
//! The switches are process-global so a test can flip them from any thread;
//! without the feature `is_on` is a constant `false` and compiles away.

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    static WRITE_ENOSPC: AtomicBool = AtomicBool::new(false);
    static SYNC_ERR: AtomicBool = AtomicBool::new(false);

    fn switch(name: &str) -> Option<&'static AtomicBool> {
        match name {
            "wal::write::enospc" => Some(&WRITE_ENOSPC),
            "wal::sync::err" => Some(&SYNC_ERR),
            _ => None,
        }
    }

    /// Turns the named failpoint on or off. Returns false for an unknown name.
    pub fn set(name: &str, on: bool) -> bool {
        match switch(name) {
            Some(s) => {
                s.store(on, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    pub(crate) fn is_on(name: &str) -> bool {
        switch(name).is_some_and(|s| s.load(Ordering::SeqCst))
    }
}

#[cfg(feature = "failpoints")]
pub use imp::set;

#[cfg(feature = "failpoints")]
pub(crate) use imp::is_on;

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn is_on(_name: &str) -> bool {
    false
}
