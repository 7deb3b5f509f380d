//! The load engine: workers, key ownership, the progress bar.

use super::verify::*;
use super::*;

/// Raw results of the load and verification phases.
pub(super) struct RunResult {
    pub(super) elapsed: Duration,
    pub(super) ok: u64,
    pub(super) ok_in_window: u64,
    pub(super) puts: u64,
    pub(super) gets: u64,
    pub(super) errors_by_status: BTreeMap<String, u64>,
    /// The first failures of all workers (at most [`FIRST_ERRORS`]).
    pub(super) first_errors: Vec<String>,
    pub(super) histogram: Histogram<u64>,
    pub(super) verify: VerifyResult,
    /// The calls went to the leaders (`--route leader` and the table could
    /// be learned).
    pub(super) routed: bool,
}

/// Failures a run reports word for word, so that an error count comes with
/// the server's explanation.
pub(super) const FIRST_ERRORS: usize = 5;

#[derive(Default)]
pub(super) struct VerifyResult {
    pub(super) checked: u64,
    pub(super) skipped: u64,
    /// Mismatches plus reads that kept failing.
    pub(super) failures: u64,
    pub(super) messages: Vec<String>,
}

/// Live counters shared by the workers and the progress display.
#[derive(Default)]
pub(super) struct Shared {
    /// Calls started; only used with a request budget.
    pub(super) issued: AtomicU64,
    pub(super) done: AtomicU64,
    pub(super) errors: AtomicU64,
}

/// When the workers stop.
#[derive(Clone, Copy)]
pub(super) enum Until {
    Deadline(Instant),
    Requests(u64),
}

/// What a writer knows about one sampled key.
#[derive(Default)]
pub(super) struct KeyState {
    /// Sequence number of the last acknowledged Put.
    pub(super) acked: Option<u64>,
    /// Sequence numbers of Puts with unknown outcome.
    pub(super) failed: Vec<u64>,
}

/// One worker's results.
pub(super) struct WorkerResult {
    pub(super) id: u32,
    pub(super) histogram: Histogram<u64>,
    pub(super) ok: u64,
    /// Successful calls completed by the deadline (duration runs only).
    pub(super) ok_in_window: u64,
    pub(super) puts: u64,
    pub(super) gets: u64,
    pub(super) errors: HashMap<&'static str, u64>,
    /// The first few failures, as `CODE: message`.
    pub(super) first_errors: Vec<String>,
    pub(super) sample: HashMap<u64, KeyState>,
}

/// Static description of the workload, shared by all workers.
pub(super) struct Workload {
    pub(super) nonce: u32,
    pub(super) workers: u64,
    pub(super) keys: u64,
    pub(super) value_size: usize,
    pub(super) read_ratio: f64,
    pub(super) serializable: bool,
    /// Sampled keys tracked per worker.
    pub(super) sample_per_worker: usize,
    /// 0: the server picks each key's partition. K: key `k` goes to
    /// partition `k % K + 1`, so only partitions 1..=K get load.
    pub(super) active_partitions: u32,
}

impl Workload {
    /// The `partition_id` a call on key number `k` names.
    pub(super) fn partition_of(&self, k: u64) -> u32 {
        match self.active_partitions {
            0 => 0,
            n => (k % u64::from(n)) as u32 + 1,
        }
    }
}

pub(super) fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits; the bounds are valid constants.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

pub(super) fn key_name(i: u64) -> Bytes {
    Bytes::from(format!("key-{i:010}"))
}

/// The unique value of Put number `seq` of `worker` in run `nonce`.
pub(super) fn make_value(nonce: u32, worker: u32, seq: u64, size: usize) -> Bytes {
    let mut v = BytesMut::with_capacity(size);
    v.put_u32(nonce);
    v.put_u32(worker);
    v.put_u64(seq);
    // Deterministic padding so a read can be compared byte for byte.
    let pad = (size - VALUE_HEADER) as u64;
    v.extend((0..pad).map(|i| b'a' + ((seq + i) % 26) as u8));
    v.freeze()
}

/// (nonce, worker, seq) of a value written by this tool, if it looks like one.
pub(super) fn value_header(v: &[u8]) -> Option<(u32, u32, u64)> {
    if v.len() < VALUE_HEADER {
        return None;
    }
    let nonce = u32::from_be_bytes(v[0..4].try_into().ok()?);
    let worker = u32::from_be_bytes(v[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(v[8..16].try_into().ok()?);
    Some((nonce, worker, seq))
}

/// `n` connections, round-robin over `addrs`. A failure names its address
/// (every [`Client::connect`] error does).
pub(super) async fn connect_all(addrs: &[String], n: usize) -> Result<Vec<Client>, String> {
    let calls = (0..n).map(|i| Client::connect(&addrs[i % addrs.len()]));
    futures::future::try_join_all(calls)
        .await
        .map_err(|e| e.to_string())
}

pub(super) async fn load_and_verify(
    opts: &BenchOpts,
    addrs: &[String],
) -> Result<RunResult, String> {
    let clients: Arc<[Client]> = connect_all(addrs, opts.connections).await?.into();
    let routes = match opts.route {
        Route::Leader if opts.active_partitions > 0 => {
            match Routes::learn(addrs, clients.len(), opts.active_partitions).await {
                Ok(r) => Some(r),
                Err(e) => {
                    if opts.progress {
                        eprintln!("sending calls to any node: cannot learn the leaders: {e}");
                    }
                    None
                }
            }
        }
        _ => None,
    };
    let watchers: Vec<_> = routes
        .iter()
        .flat_map(|(r, admins)| {
            admins
                .iter()
                .map(|c| tokio::spawn(r.clone().watch(c.clone())))
        })
        .collect();
    let routes = routes.map(|(r, _)| r);
    let routed = routes.is_some();
    let workers = opts.workers();
    let workload = Arc::new(Workload {
        nonce: rand::random(),
        workers: workers as u64,
        keys: opts.keys,
        value_size: opts.value_size,
        read_ratio: opts.read_ratio,
        serializable: opts.serializable,
        sample_per_worker: opts.verify_keys.div_ceil(workers),
        active_partitions: opts.active_partitions,
    });
    let shared = Arc::new(Shared::default());

    let progress = opts.progress.then(|| progress_bar(opts));
    let start = Instant::now();
    let until = match opts.requests {
        Some(n) => Until::Requests(n),
        None => Until::Deadline(start + opts.duration),
    };
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let conns = Conns {
                own: w % clients.len(),
                all: clients.clone(),
                routes: routes.clone(),
            };
            tokio::spawn(worker(
                w as u32,
                conns,
                workload.clone(),
                shared.clone(),
                until,
            ))
        })
        .collect();
    let ticker_stop = Arc::new(AtomicBool::new(false));
    let ticker = progress.clone().map(|pb| {
        tokio::spawn(tick_progress(
            pb,
            shared.clone(),
            ticker_stop.clone(),
            start,
            opts.requests.is_some(),
        ))
    });
    let mut results = Vec::with_capacity(workers);
    for h in futures::future::join_all(handles).await {
        results.push(h.map_err(|e| format!("bench worker failed: {e}"))?);
    }
    let elapsed = start.elapsed();
    for w in watchers {
        w.abort();
    }
    ticker_stop.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.await;
    }
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }

    let mut histogram = new_histogram();
    let (mut ok, mut ok_in_window, mut puts, mut gets) = (0, 0, 0, 0);
    let mut errors_by_status = BTreeMap::new();
    let mut first_errors = Vec::new();
    for r in &results {
        histogram
            .add(&r.histogram)
            .map_err(|e| format!("merge histograms: {e}"))?;
        ok += r.ok;
        ok_in_window += r.ok_in_window;
        puts += r.puts;
        gets += r.gets;
        for (name, n) in &r.errors {
            *errors_by_status.entry(name.to_string()).or_insert(0) += n;
        }
        for e in &r.first_errors {
            if first_errors.len() < FIRST_ERRORS {
                first_errors.push(e.clone());
            }
        }
    }

    let verify = if opts.verify_keys > 0 {
        if opts.progress {
            eprintln!("verifying a sample of the acknowledged writes");
        }
        verify(opts, addrs, &workload, results).await?
    } else {
        VerifyResult::default()
    };
    Ok(RunResult {
        elapsed,
        ok,
        ok_in_window,
        puts,
        gets,
        errors_by_status,
        first_errors,
        histogram,
        verify,
        routed,
    })
}

/// The connections a worker may use: its own, or one to the leader of the
/// partition it calls (see [`Routes`]).
pub(super) struct Conns {
    pub(super) own: usize,
    pub(super) all: Arc<[Client]>,
    pub(super) routes: Option<Arc<Routes>>,
}

impl Conns {
    fn for_call(&self, partition: u32, worker: u32) -> &Client {
        let pick = match &self.routes {
            Some(r) if partition != 0 => r.pick(partition, worker),
            _ => None,
        };
        &self.all[pick.unwrap_or(self.own)]
    }
}

pub(super) async fn worker(
    id: u32,
    conns: Conns,
    wl: Arc<Workload>,
    shared: Arc<Shared>,
    until: Until,
) -> WorkerResult {
    let mut rng = StdRng::from_entropy();
    let mut r = WorkerResult {
        id,
        histogram: new_histogram(),
        ok: 0,
        ok_in_window: 0,
        puts: 0,
        gets: 0,
        errors: HashMap::new(),
        first_errors: Vec::new(),
        sample: HashMap::new(),
    };
    // This worker writes keys id, id + workers, id + 2 * workers, ...
    let own_keys = wl.keys.saturating_sub(id as u64).div_ceil(wl.workers);
    let mut seq = 0u64;
    let mut backoff = Duration::ZERO;
    loop {
        match until {
            Until::Deadline(d) => {
                if Instant::now() >= d {
                    break;
                }
            }
            Until::Requests(n) => {
                if shared.issued.fetch_add(1, Ordering::Relaxed) >= n {
                    break;
                }
            }
        }
        let read = wl.read_ratio > 0.0 && (own_keys == 0 || rng.gen::<f64>() < wl.read_ratio);
        let sent = Instant::now();
        let outcome: Result<(), Status> = if read {
            r.gets += 1;
            let k = rng.gen_range(0..wl.keys);
            let req = GetRequest {
                key: key_name(k),
                partition_id: wl.partition_of(k),
                serializable: wl.serializable,
            };
            conns
                .for_call(req.partition_id, id)
                .call::<_, GetResponse>(KV_GET, &req, Some(CALL_TIMEOUT))
                .await
                .map(|_| ())
        } else {
            r.puts += 1;
            let k = id as u64 + wl.workers * rng.gen_range(0..own_keys);
            seq += 1;
            let req = PutRequest {
                key: key_name(k),
                value: make_value(wl.nonce, id, seq, wl.value_size),
                partition_id: wl.partition_of(k),
            };
            let res = conns
                .for_call(req.partition_id, id)
                .call::<_, PutResponse>(KV_PUT, &req, Some(CALL_TIMEOUT))
                .await
                .map(|_| ());
            let tracked = r.sample.len() < wl.sample_per_worker || r.sample.contains_key(&k);
            if tracked {
                let st = r.sample.entry(k).or_default();
                match &res {
                    Ok(()) => st.acked = Some(seq),
                    Err(_) => st.failed.push(seq),
                }
            }
            res
        };
        let us = sent.elapsed().as_micros().max(1) as u64;
        shared.done.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                r.ok += 1;
                if let Until::Deadline(d) = until {
                    if Instant::now() <= d {
                        r.ok_in_window += 1;
                    }
                }
                r.histogram.saturating_record(us);
                backoff = Duration::ZERO;
            }
            Err(s) => {
                *r.errors.entry(s.code.name()).or_insert(0) += 1;
                if r.first_errors.len() < FIRST_ERRORS {
                    r.first_errors
                        .push(format!("{}: {}", s.code.name(), s.message));
                }
                shared.errors.fetch_add(1, Ordering::Relaxed);
                // Why: a call on a dead connection fails at once; without a
                // pause the worker would spin, flood the error counts and
                // starve the other tasks of this single-threaded runtime.
                backoff = (backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
                let pause = match until {
                    Until::Deadline(d) => backoff.min(d.saturating_duration_since(Instant::now())),
                    Until::Requests(_) => backoff,
                };
                tokio::time::sleep(pause).await;
            }
        }
    }
    r
}

pub(super) fn progress_bar(opts: &BenchOpts) -> ProgressBar {
    let (len, template) = match opts.requests {
        Some(n) => (n, "{bar:40.cyan/blue} {pos}/{len} requests  {msg}"),
        None => (
            opts.duration.as_millis() as u64,
            "{bar:40.cyan/blue} {elapsed}/{duration_s}  {msg}",
        ),
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "duration_s",
            move |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}s", s.len().unwrap_or(0) / 1000);
            },
        );
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(10))
        .with_style(style)
}

pub(super) async fn tick_progress(
    pb: ProgressBar,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    start: Instant,
    by_requests: bool,
) {
    // Rate over the last second (5 ticks), so it reacts but does not jitter.
    let mut window = std::collections::VecDeque::from([(start, 0u64)]);
    let mut tick = tokio::time::interval(TICK);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let now = Instant::now();
        let done = shared.done.load(Ordering::Relaxed);
        window.push_back((now, done));
        if window.len() > 6 {
            window.pop_front();
        }
        let (t0, d0) = window[0];
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = if secs > 0.0 {
            (done - d0) as f64 / secs
        } else {
            0.0
        };
        if by_requests {
            pb.set_position(done);
        } else {
            pb.set_position(now.duration_since(start).as_millis() as u64);
        }
        pb.set_message(format!(
            "{rate:.0} ops/s  {} errors",
            shared.errors.load(Ordering::Relaxed)
        ));
    }
}
