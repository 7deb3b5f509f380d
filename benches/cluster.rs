//! End-to-end cluster throughput: the `multiraft bench` engine against a
//! fresh local 3-node cluster (8 partitions, real `multiraft serve`
//! processes on loopback ports), 5 s of Put load over gRPC/HTTP/2, then the
//! read-back verification. Prints the report; exits non-zero if the run
//! failed or verification found a mismatch.
//!
//! Run it with:
//!
//! ```text
//! cargo bench --bench cluster
//! ```
//!
//! Cargo builds the `multiraft` binary for benches and passes its path in
//! `CARGO_BIN_EXE_multiraft`; the cluster's nodes run that binary. For other
//! knobs (connections, value size, read ratio, an existing cluster) use
//! `multiraft bench --help`.

use std::path::PathBuf;
use std::time::Duration;

use multiraft::cli::bench::{format_report, run, BenchOpts};

fn main() {
    let opts = BenchOpts {
        exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_multiraft"))),
        duration: Duration::from_secs(5),
        ..BenchOpts::default()
    };
    match run(opts) {
        Ok(report) => {
            print!("{}", format_report(&report));
            if !report.verified {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("cluster bench failed: {e}");
            std::process::exit(1);
        }
    }
}
