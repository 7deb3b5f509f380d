//! Micro-benchmark of the gRPC message framing: encode a message into its
//! length-prefixed wire form and decode it back, for a small (128 B) and a
//! page-sized (4 KiB) message. Prints ns per encode+decode round trip.
//!
//! Plain `fn main` (harness = false) with `std::time::Instant`: the numbers
//! are for spotting regressions, not for statistics.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use multiraft::internals::{encode, UnaryDecoder};

fn round_trip(msg: &Bytes) -> usize {
    let pieces = encode(msg.clone()).expect("message fits the length field");
    let mut decoder = UnaryDecoder::new(4 << 20);
    for piece in pieces {
        decoder.push(piece).expect("valid frame");
    }
    decoder.finish().expect("one complete message").len()
}

fn bench(name: &str, len: usize, iterations: u32) {
    let msg: Bytes = (0..len).map(|i| i as u8).collect();
    // Warm-up so allocator and caches are in steady state.
    for _ in 0..iterations / 10 {
        black_box(round_trip(black_box(&msg)));
    }
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(round_trip(black_box(&msg)));
    }
    let ns = start.elapsed().as_nanos() / u128::from(iterations);
    println!("{name:>12}: {ns:>6} ns/op ({iterations} iterations)");
}

fn main() {
    bench("128 B", 128, 2_000_000);
    bench("4 KiB", 4 << 10, 500_000);
}
