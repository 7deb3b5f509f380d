//! Cache warming for loops over many groups: with thousands of partitions
//! taking writes in turn, nearly every group a loop reaches is cold, and
//! the loops (shard turn, tick, inbox) ask for the next one ahead.

use super::{Group, StateMachine};

impl<S: StateMachine> Group<S> {
    /// Starts loading this group's own state and its log's shared state
    /// into the cache, so that a loop over many groups can overlap the
    /// next group's memory reads with the work on this one.
    pub fn prefetch(&self) {
        prefetch(std::ptr::from_ref(self).cast(), std::mem::size_of::<Self>());
        prefetch(self.storage.core_ptr(), 256);
    }
}

/// Asks the CPU to start loading the `len` bytes at `p` into its caches.
/// A hint only: it changes no state and never faults, whatever `p` is.
fn prefetch(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..len).step_by(64) {
        // SAFETY: a prefetch reads nothing into the program and cannot
        // fault, even at an invalid address; `wrapping_add` keeps the
        // pointer arithmetic defined.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(off).cast(),
            )
        };
    }
    // Elsewhere a no-op.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}
