//! The allocator's settings (the allocator itself is declared in `main.rs`).

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (the same index
/// in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse instead of handing it back to the kernel
/// 10 ms after it is freed (mimalloc's default `purge_delay`), which
/// costs a page fault and a zeroed page each time the heap grows again.
/// Measured with `benches/pair.sh` at 10,000 partitions, three runs of
/// four pairs per load: with 1,024 active, node CPU per Put lower in all
/// twelve pairs (medians 4-7% lower); with 16 active, lower in 9 of 12
/// (medians from 7% lower to 3% higher). A 1 s delay gained nothing.
/// The price is memory that stays at its high-water mark: idle RSS
/// 136 MiB per node at 10,000 partitions against 119. The raft log, the
/// part that grows with load, is bounded by `--log-memory-mib`.
/// `MIMALLOC_PURGE_DELAY` in the environment still decides.
///
/// # Safety
///
/// mimalloc's options are not thread-safe: call this before any other
/// thread is started.
pub unsafe fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: no other thread runs (this function's contract).
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}
