//! Reading back a sample of acknowledged writes after a run.

use super::load::*;
use super::*;

/// One key to read back and the values it may hold.
pub(super) struct Check {
    pub(super) key: u64,
    pub(super) worker: u32,
    pub(super) acked: u64,
    pub(super) failed: Vec<u64>,
}

pub(super) async fn verify(
    opts: &BenchOpts,
    addrs: &[String],
    wl: &Workload,
    results: Vec<WorkerResult>,
) -> Result<VerifyResult, String> {
    let mut out = VerifyResult::default();
    let mut checks = Vec::new();
    for r in results {
        for (key, st) in r.sample {
            match st.acked {
                Some(acked) if st.failed.len() <= MAX_FAILED_PER_KEY => checks.push(Check {
                    key,
                    worker: r.id,
                    acked,
                    failed: st.failed,
                }),
                _ => out.skipped += 1,
            }
        }
    }
    checks.shuffle(&mut rand::thread_rng());
    checks.truncate(opts.verify_keys);
    checks.sort_by_key(|c| c.key);
    if checks.is_empty() {
        return Ok(out);
    }
    // One connection per reachable node; reads go round-robin over them. A
    // node that is down must not stop the others from being checked.
    let mut clients = Vec::new();
    for addr in addrs {
        match Client::connect(addr).await {
            Ok(c) => clients.push((addr.clone(), c)),
            Err(e) if opts.progress => eprintln!("verify: skipping node {addr}: {e}"),
            Err(_) => {}
        }
    }
    if clients.is_empty() {
        out.failures = checks.len() as u64;
        out.messages.push(format!(
            "no node reachable to read back {} keys",
            checks.len()
        ));
        return Ok(out);
    }
    let reads = checks.iter().enumerate().map(|(i, c)| {
        let (node, client) = clients[i % clients.len()].clone();
        async move {
            let req = GetRequest {
                key: key_name(c.key),
                partition_id: wl.partition_of(c.key),
                serializable: false,
            };
            let mut last = None;
            for attempt in 0..VERIFY_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                match client
                    .call::<_, GetResponse>(KV_GET, &req, Some(CALL_TIMEOUT))
                    .await
                {
                    Ok(resp) => return check_read(wl, c, &resp),
                    Err(e) => last = Some(e),
                }
            }
            let e = last.map(|e| e.to_string()).unwrap_or_default();
            Err(format!(
                "key-{:010}: read via {node} failed {VERIFY_ATTEMPTS} times: {e}",
                c.key
            ))
        }
    });
    use futures::StreamExt;
    let mut stream = futures::stream::iter(reads).buffered(VERIFY_CONCURRENCY);
    while let Some(r) = stream.next().await {
        out.checked += 1;
        if let Err(msg) = r {
            out.failures += 1;
            if out.messages.len() < MAX_REPORTED_FAILURES {
                out.messages.push(msg);
            }
        }
    }
    Ok(out)
}

/// Whether `resp` holds a value the key may have; a description if not.
pub(super) fn check_read(wl: &Workload, c: &Check, resp: &GetResponse) -> Result<(), String> {
    let expected = || {
        let mut s = format!("put #{} of writer {}", c.acked, c.worker);
        if !c.failed.is_empty() {
            s.push_str(&format!(
                " (or one of {} unacknowledged puts)",
                c.failed.len()
            ));
        }
        s
    };
    let key = format!("key-{:010}", c.key);
    if !resp.found {
        return Err(format!(
            "{key}: expected {}, read: not found (at index {})",
            expected(),
            resp.index
        ));
    }
    let seq = match value_header(&resp.value) {
        Some((nonce, worker, seq)) if nonce == wl.nonce && worker == c.worker => seq,
        Some((nonce, worker, seq)) => {
            return Err(format!(
                "{key}: expected {}, read: a value of another run or writer \
                 (nonce {nonce:#x}, writer {worker}, put #{seq}, {} bytes, at index {})",
                expected(),
                resp.value.len(),
                resp.index
            ))
        }
        None => {
            return Err(format!(
                "{key}: expected {}, read: {} bytes that this tool did not write (at index {})",
                expected(),
                resp.value.len(),
                resp.index
            ))
        }
    };
    if seq != c.acked && !c.failed.contains(&seq) {
        return Err(format!(
            "{key}: expected {}, read: put #{seq} (at index {})",
            expected(),
            resp.index
        ));
    }
    if resp.value != make_value(wl.nonce, c.worker, seq, wl.value_size) {
        return Err(format!(
            "{key}: put #{seq} read back with different bytes ({} bytes, at index {})",
            resp.value.len(),
            resp.index
        ));
    }
    Ok(())
}
