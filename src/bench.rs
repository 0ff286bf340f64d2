//! `holdpoint bench`: the standard workload, measured.
//!
//! On a fresh temporary data directory, with every acknowledgement durable: N runs of
//! `plan` (a safe step) → `send_money` behind an approval gate → `notify` → completed.
//! Phase 1 starts all N and waits until every one waits at its gate; phase 2 approves
//! all N (through the engine API) and waits until every one has completed. Then, on
//! separate runs, 100 sequential decisions measure decision→completed latency.

use crate::journal::{GateId, Principal, RunId, RunStatus, SledOptions, SledStore, Store};
use crate::pg::{PgOptions, PgStore};
use crate::{DecisionRequest, Engine, EngineConfig, Failure, Gated, Registry};
use futures::stream::{self, StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub runs: usize,
    /// Runs started or decided at once, and activations driven at once.
    pub concurrency: usize,
    /// Sequential decisions for the latency figures.
    pub latency_samples: usize,
    /// Start runs and record decisions through the HTTP API on loopback (real requests
    /// to an in-process server) instead of the engine API.
    pub http: bool,
    /// Run on the PostgreSQL store at this URL (a fresh schema, dropped afterwards)
    /// instead of sled in a temporary directory.
    pub pg: Option<String>,
    /// With `pg`: drive the runs from this many `holdpoint worker` processes instead of
    /// workers in this process (0).
    pub worker_processes: usize,
    /// sled's background period ([`SledOptions::flush_every_ms`]).
    pub sled_flush_every_ms: u64,
    /// zstd level of sled's log, `None` for none ([`SledOptions::compression`]).
    pub sled_compression: Option<i32>,
    /// Declare the workflow's two steps [`crate::Step::idempotent`]: each step's start
    /// is journaled with its result, two commits fewer per run.
    pub idempotent_steps: bool,
    /// Commits durable in the store's write-ahead log ([`SledOptions::wal`]).
    pub sled_wal: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            runs: 10_000,
            concurrency: 256,
            latency_samples: 100,
            http: false,
            pg: None,
            worker_processes: 0,
            sled_flush_every_ms: SledOptions::default().flush_every_ms,
            sled_compression: SledOptions::default().compression,
            idempotent_steps: false,
            sled_wal: false,
        }
    }
}

/// The figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub runs: usize,
    pub concurrency: usize,
    /// `engine` or `http`.
    pub api: &'static str,
    /// `sled` or `postgres`.
    pub store: &'static str,
    /// Worker processes (0: workers in the benchmark's own process).
    pub worker_processes: usize,
    /// Whether the steps were declared idempotent (`--idempotent-steps`).
    pub idempotent_steps: bool,
    /// Workloads run (each on a fresh directory); every figure is their median.
    pub repeats: usize,
    pub phase1_runs_per_s: f64,
    pub phase2_runs_per_s: f64,
    /// CPU time (user + system) of the whole process per run in each phase, in µs:
    /// engine, store, group commit, sled's threads and the load generator together.
    /// What a change of the code moves; throughput also moves with the machine's other
    /// load. `None` where `/proc/self/stat` cannot be read.
    pub phase1_cpu_us_per_run: Option<f64>,
    pub phase2_cpu_us_per_run: Option<f64>,
    pub events: u64,
    pub events_per_s: f64,
    /// Known for sled (its group commit counts them); PostgreSQL's are its own.
    pub fsyncs_per_run: Option<f64>,
    /// Keys sled wrote per run in each phase (inserts and removes that changed a key,
    /// in every tree): the store's main cost (ARCHITECTURE.md, "Where the time goes").
    /// sled only.
    pub phase1_sled_writes_per_run: Option<f64>,
    pub phase2_sled_writes_per_run: Option<f64>,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub peak_rss_mib: f64,
    pub bytes_on_disk_per_run: f64,
    /// sled's `size_on_disk` after the workload (its growth from an empty directory).
    pub size_on_disk_bytes: u64,
    /// Bytes of keys and values the sled store holds after the workload, per run: what
    /// `bytes_on_disk_per_run` would be without sled's garbage and framing (sled only).
    pub live_bytes_per_run: Option<f64>,
    /// Every sequential decision's latency, sorted (for plots).
    pub latency_samples_ms: Vec<f64>,
}

async fn standard(ctx: crate::Ctx, order: u64, idempotent: bool) -> Result<String, Failure> {
    fn declared<T, F>(step: crate::Step<'_, T, F>, idempotent: bool) -> crate::Step<'_, T, F> {
        if idempotent {
            step.idempotent()
        } else {
            step
        }
    }
    let plan = declared(
        ctx.step("plan", || async move {
            Ok(json!({"order": order, "amount_cents": 25_000}))
        }),
        idempotent,
    )
    .await?;
    let paid = match ctx.gate("send_money", plan, json!({"order": order})).await? {
        Gated::Approved { args, .. } | Gated::Edited { args, .. } => args,
        Gated::Rejected { reason, .. } => return Ok(reason),
    };
    declared(
        ctx.step("notify", || {
            let paid = paid.clone();
            async move { Ok(paid["order"].clone()) }
        }),
        idempotent,
    )
    .await?;
    Ok("done".into())
}

async fn settle_all<St: Store>(engine: &Engine<St>, runs: &[RunId], want: RunStatus) -> Result<(), String> {
    for &run in runs {
        let s = engine.settled(run).await.map_err(|e| e.to_string())?;
        if s.status != want {
            return Err(format!(
                "run {run} is {} (expected {want}): {:?}",
                s.status, s.stuck
            ));
        }
    }
    Ok(())
}

/// Where the workload's starts and decisions go.
enum Driver<St: Store> {
    Engine(Engine<St>),
    /// Real requests to the HTTP API on loopback: HTTP/1.1 on keep-alive connections, one
    /// per request in flight, driven on the runtime (hyper's client).
    Http(Http),
}

struct Http {
    addr: std::net::SocketAddr,
    token: String,
    /// Idle keep-alive connections, taken by a request and put back after.
    idle: std::sync::Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// How long one request may take before the benchmark gives up on the server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Http {
    /// POSTs `body` as JSON and returns the JSON answer; any status but success is an
    /// error.
    async fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        let body = serde_json::to_vec(body).map_err(|e| format!("POST {path}: {e}"))?;
        let (status, bytes) = self.request(hyper::Method::POST, path, body).await?;
        let body: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("POST {path}: unreadable response ({status}): {e}"))?;
        if !status.is_success() {
            return Err(format!("POST {path}: {status}: {body}"));
        }
        Ok(body)
    }

    /// GETs `path`: its JSON answer, or its text when it is not JSON (`/healthz`).
    async fn get(&self, path: &str) -> Result<Value, String> {
        let (status, bytes) = self.request(hyper::Method::GET, path, Vec::new()).await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !status.is_success() {
            return Err(format!("GET {path}: {status}: {text}"));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Sends one request on a keep-alive connection (a new one when none is idle) and
    /// reads the whole answer, within [`REQUEST_TIMEOUT`].
    async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(hyper::StatusCode, Bytes), String> {
        let fail = |e: &dyn std::fmt::Display| format!("{method} {path}: {e}");
        let exchange = async {
            // An idle connection the server has closed meanwhile is dropped for a new
            // one; nothing was sent on it, so nothing is sent twice.
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let reused = match idle {
                Some(mut conn) => conn.ready().await.is_ok().then_some(conn),
                None => None,
            };
            let mut conn = match reused {
                Some(conn) => conn,
                None => {
                    let mut conn = self.connect().await.map_err(|e| fail(&e))?;
                    conn.ready().await.map_err(|e| fail(&e))?;
                    conn
                }
            };
            let mut request = hyper::Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, self.addr.to_string())
                .header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.token));
            if !body.is_empty() {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let request = request.body(Full::new(Bytes::from(body))).map_err(|e| fail(&e))?;
            let response = conn.send_request(request).await.map_err(|e| fail(&e))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(&e))?
                .to_bytes();
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            Ok((status, bytes))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| fail(&format!("no answer in {} s", REQUEST_TIMEOUT.as_secs())))?
    }

    /// Opens `n` connections at once and keeps them idle for the load.
    async fn connect_idle(&self, n: usize) -> Result<(), String> {
        let opened: Vec<_> = stream::iter((0..n).map(|_| self.connect()))
            .buffer_unordered(n.max(1))
            .try_collect()
            .await?;
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).extend(opened);
        Ok(())
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes the connection.
            let _ = connection.await;
        });
        Ok(sender)
    }
}

impl<St: Store> Driver<St> {
    async fn start(&self, workflow: &str, order: u64) -> Result<RunId, String> {
        match self {
            Driver::Engine(engine) => engine
                .start(workflow, &order, None)
                .await
                .map_err(|e| e.to_string()),
            Driver::Http(http) => {
                let out = http
                    .post("/v1/runs", &json!({"workflow": workflow, "input": order}))
                    .await?;
                serde_json::from_value(out["run"].clone()).map_err(|e| format!("run id in {out}: {e}"))
            }
        }
    }

    async fn approve(&self, run: RunId) -> Result<(), String> {
        let gate = GateId(1);
        match self {
            Driver::Engine(engine) => engine
                .decide(run, DecisionRequest::approve(gate, Principal::new("bench")))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Driver::Http(http) => {
                http.post(
                    &format!("/v1/runs/{run}/gates/{gate}/decision"),
                    &json!({"decision": {"kind": "approve"}}),
                )
                .await?;
                Ok(())
            }
        }
    }
}

/// Starts a run per order, `in_flight` at a time: as one start is acknowledged the next
/// is sent (a sliding window, not batches that wait for their slowest member). Returns
/// the runs in order.
async fn start_many<St: Store>(
    driver: &Driver<St>,
    workflow: &str,
    orders: std::ops::Range<u64>,
    in_flight: usize,
) -> Result<Vec<RunId>, String> {
    stream::iter(orders.map(|o| driver.start(workflow, o)))
        .buffered(in_flight.max(1))
        .try_collect()
        .await
}

/// Approves each run's gate, `in_flight` at a time (a sliding window, as `start_many`).
async fn approve_many<St: Store>(
    driver: &Driver<St>,
    runs: &[RunId],
    in_flight: usize,
) -> Result<(), String> {
    stream::iter(runs.iter().copied().map(|run| driver.approve(run)))
        .buffer_unordered(in_flight.max(1))
        .try_collect::<()>()
        .await
}

/// Serves the HTTP API on an ephemeral loopback port with one admin token.
async fn serve_loopback<St: Store>(engine: &Engine<St>, concurrency: usize) -> Result<Http, String> {
    use crate::server::{self, AppState, Caller, Tokens};
    let token = crate::cli::generate_token().map_err(|e| e.0)?;
    let mut tokens = Tokens::default();
    tokens.add(&token, Caller::new("bench", &[server::roles::ADMIN]))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let state = AppState::new(engine.clone(), tokens);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, server::router(state, 1 << 20)).await {
            tracing::error!("bench server failed: {e}");
        }
    });
    Ok(Http {
        addr,
        token,
        idle: std::sync::Mutex::new(Vec::with_capacity(concurrency)),
    })
}

/// The process's peak resident memory so far (`VmHWM`), in MiB; 0 where `/proc` has none.
fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM:")
}

/// The process's resident memory now (`VmRSS`), in MiB; 0 where `/proc` has none.
fn rss_mib() -> f64 {
    proc_status_mib("VmRSS:")
}

/// The CPU time (user + system) this process has used, from `/proc/self/stat`; `None`
/// where it cannot be read. Linux reports it in ticks of 1/100 s (`USER_HZ`, fixed at 100
/// for `/proc` whatever the kernel's own tick), so a phase of a second or more reads it
/// within about 1%.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_of_stat(&stat)
}

/// `utime` + `stime` of a `/proc/<pid>/stat` line: the 14th and 15th fields, counted
/// after the command name, which is in parentheses and may itself hold spaces.
fn cpu_of_stat(stat: &str) -> Option<Duration> {
    const USER_HZ: u64 = 100;
    let mut after_name = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    // Fields 3 to 13 come first: state, ppid, ..., cmajflt.
    let utime: u64 = after_name.nth(11)?.parse().ok()?;
    let stime: u64 = after_name.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

fn cpu_per_run(from: Option<Duration>, to: Option<Duration>, runs: f64) -> Option<f64> {
    Some(to?.checked_sub(from?)?.as_secs_f64() * 1e6 / runs)
}

fn proc_status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs the standard workload.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, String> {
    match &opts.pg {
        None => {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let options = SledOptions {
                flush_every_ms: opts.sled_flush_every_ms,
                compression: opts.sled_compression,
                wal: opts.sled_wal,
                ..SledOptions::default()
            };
            let store = SledStore::open_with(dir.path(), options).map_err(|e| e.to_string())?;
            run_on(store, opts, None).await
        }
        Some(url) => {
            let schema = format!("hp_bench_{}", uuid::Uuid::now_v7().simple());
            let store = PgStore::connect(
                url,
                PgOptions {
                    schema: schema.clone(),
                    pool_size: 16,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            let procs = match opts.worker_processes {
                0 => None,
                n => Some(spawn_workers(url, &schema, n, opts.concurrency)?),
            };
            let report = run_on(store.clone(), opts, procs).await;
            store.drop_schema().await.map_err(|e| e.to_string())?;
            report
        }
    }
}

async fn run_on<St: Measured>(
    store: St,
    opts: &BenchOptions,
    procs: Option<WorkerProcs>,
) -> Result<BenchReport, String> {
    let engine = Engine::builder(store, registry())
        .config(EngineConfig {
            concurrency: opts.concurrency,
            ..EngineConfig::default()
        })
        .build()
        .map_err(|e| e.to_string())?;
    let workers = procs.is_none().then(|| engine.spawn_workers());
    let driver = if opts.http {
        let http = serve_loopback(&engine, opts.concurrency).await?;
        // Connected before the clock starts, as a load generator does: the phases time
        // requests, not TCP handshakes.
        http.connect_idle(opts.concurrency).await?;
        Driver::Http(http)
    } else {
        Driver::Engine(engine.clone())
    };
    let syncs_before = engine.store().syncs();

    let workflow = if opts.idempotent_steps {
        WORKFLOW_IDEMPOTENT
    } else {
        WORKFLOW
    };
    let t = Instant::now();
    let writes0 = engine.store().key_writes();
    let cpu0 = process_cpu();
    let runs = start_many(&driver, workflow, 0..opts.runs as u64, opts.concurrency).await?;
    settle_all(&engine, &runs, RunStatus::Waiting).await?;
    let phase1 = t.elapsed();
    let cpu1 = process_cpu();
    let writes1 = engine.store().key_writes();

    let t = Instant::now();
    approve_many(&driver, &runs, opts.concurrency).await?;
    settle_all(&engine, &runs, RunStatus::Completed).await?;
    let phase2 = t.elapsed();
    let cpu2 = process_cpu();
    let writes2 = engine.store().key_writes();
    let syncs = engine.store().syncs().zip(syncs_before).map(|(a, b)| a - b);

    let mut events = 0;
    for &run in &runs {
        events += engine
            .store()
            .summary(run)
            .await
            .map_err(|e| e.to_string())?
            .map_or(0, |s| s.next_seq.0);
    }
    let disk = engine.store().disk_bytes().await?;
    let live = engine.store().live_bytes()?;

    // Latency: one decision at a time on otherwise idle runs.
    let base = opts.runs as u64;
    let samples = start_many(
        &driver,
        workflow,
        base..base + opts.latency_samples as u64,
        opts.concurrency,
    )
    .await?;
    settle_all(&engine, &samples, RunStatus::Waiting).await?;
    let mut latencies = Vec::new();
    for &run in &samples {
        let t = Instant::now();
        driver.approve(run).await?;
        let s = engine.settled(run).await.map_err(|e| e.to_string())?;
        if s.status != RunStatus::Completed {
            return Err(format!("latency run {run} is {}", s.status));
        }
        latencies.push(t.elapsed());
    }
    latencies.sort();
    if let Some(w) = workers {
        w.shutdown().await;
    }
    drop(procs);
    let n = opts.runs.max(1) as f64;
    let total = (phase1 + phase2).as_secs_f64();
    Ok(BenchReport {
        runs: opts.runs,
        concurrency: opts.concurrency,
        api: if opts.http { "http" } else { "engine" },
        store: if opts.pg.is_some() { "postgres" } else { "sled" },
        worker_processes: opts.worker_processes,
        idempotent_steps: opts.idempotent_steps,
        repeats: 1,
        phase1_runs_per_s: n / phase1.as_secs_f64(),
        phase2_runs_per_s: n / phase2.as_secs_f64(),
        phase1_cpu_us_per_run: cpu_per_run(cpu0, cpu1, n),
        phase2_cpu_us_per_run: cpu_per_run(cpu1, cpu2, n),
        events,
        events_per_s: events as f64 / total,
        fsyncs_per_run: syncs.map(|s| s as f64 / n),
        phase1_sled_writes_per_run: writes1.zip(writes0).map(|(b, a)| (b - a) as f64 / n),
        phase2_sled_writes_per_run: writes2.zip(writes1).map(|(b, a)| (b - a) as f64 / n),
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p99_ms: percentile(&latencies, 0.99),
        latency_max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        peak_rss_mib: peak_rss_mib(),
        bytes_on_disk_per_run: disk as f64 / n,
        size_on_disk_bytes: disk,
        live_bytes_per_run: live.map(|b| b as f64 / n),
        latency_samples_ms: latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect(),
    })
}

/// Fills `dir` with `runs` runs of the standard workflow, each left waiting at its gate,
/// and closes the store; with `wal`, a store with its write-ahead log. The setup for
/// [`restart`].
pub async fn fill_waiting(
    dir: &std::path::Path,
    runs: usize,
    concurrency: usize,
    wal: bool,
) -> Result<usize, String> {
    let options = SledOptions {
        wal,
        ..SledOptions::default()
    };
    let store = SledStore::open_with(dir, options).map_err(|e| e.to_string())?;
    let engine = Engine::builder(store, registry())
        .config(EngineConfig {
            concurrency,
            ..EngineConfig::default()
        })
        .build()
        .map_err(|e| e.to_string())?;
    let workers = engine.spawn_workers();
    let driver = Driver::Engine(engine.clone());
    let already = engine.store().count_pending().map_err(|e| e.to_string())? as u64;
    // In slices, so that memory stays flat however many runs are asked for.
    let slice = 10_000u64;
    let mut next = already;
    let end = already + runs as u64;
    while next < end {
        let to = (next + slice).min(end);
        let started = start_many(&driver, WORKFLOW, next..to, concurrency).await?;
        settle_all(&engine, &started, RunStatus::Waiting).await?;
        next = to;
    }
    workers.shutdown().await;
    drop(driver);
    let store = engine
        .into_store()
        .map_err(|_| "engine still referenced".to_string())?;
    let waiting = store.count_pending().map_err(|e| e.to_string())?;
    store.close().map_err(|e| e.to_string())?;
    Ok(waiting)
}

/// What a restart over many waiting runs costs.
#[derive(Clone, Debug, Serialize)]
pub struct RestartReport {
    /// Open gates in the directory (counted after the measurement, by a scan).
    pub waiting_runs: usize,
    /// From opening the store to the first answered HTTP request.
    pub startup_ms: f64,
    /// The first page (50 gates) of `GET /v1/pending`: the first request, and the median
    /// of the next 20.
    pub pending_first_ms: f64,
    pub pending_median_ms: f64,
    /// Peak RSS of this process (it did nothing before opening the store). The peak
    /// is reached while sled opens the directory.
    pub peak_rss_mib: f64,
    /// RSS once serving: after start-up and `served_pages` pending pages, requested one
    /// after another for the `serve_for` given to [`restart`] (at least 21).
    pub serving_rss_mib: f64,
    pub served_pages: usize,
}

/// How long `holdpoint bench --restart` serves pending pages before it reads the RSS:
/// long enough for the allocator to hand back what sled freed after opening (mimalloc
/// returns freed memory to the system after a second).
pub const RESTART_SERVE_FOR: Duration = Duration::from_secs(2);

/// Opens `dir` as `holdpoint serve` does (store, engine, workers, HTTP API on loopback),
/// and measures start-up, the pending page and memory: the peak, and the RSS after
/// serving pending pages (one request after another) for `serve_for`.
pub async fn restart(dir: &std::path::Path, serve_for: Duration) -> Result<RestartReport, String> {
    let began = Instant::now();
    let store = SledStore::open(dir).map_err(|e| e.to_string())?;
    let engine = Engine::builder(store, registry())
        .build()
        .map_err(|e| e.to_string())?;
    let workers = engine.spawn_workers();
    // One request at a time: one connection.
    let http = serve_loopback(&engine, 1).await?;
    http.get("/healthz").await?;
    let startup = began.elapsed();
    let t = Instant::now();
    let page = http.get("/v1/pending?limit=50").await?;
    let first = t.elapsed();
    let shown = page.as_array().map_or(0, |a| a.len());
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        http.get("/v1/pending?limit=50").await?;
        times.push(t.elapsed());
    }
    times.sort();
    let serving = Instant::now();
    let mut served = 1 + times.len();
    while serving.elapsed() < serve_for {
        http.get("/v1/pending?limit=50").await?;
        served += 1;
    }
    let rss = peak_rss_mib();
    let serving_rss = rss_mib();
    workers.shutdown().await;
    let waiting = engine.store().count_pending().map_err(|e| e.to_string())?;
    if shown != waiting.min(50) {
        return Err(format!(
            "the pending page showed {shown} gates; {waiting} are open"
        ));
    }
    Ok(RestartReport {
        waiting_runs: waiting,
        startup_ms: startup.as_secs_f64() * 1000.0,
        pending_first_ms: first.as_secs_f64() * 1000.0,
        pending_median_ms: percentile(&times, 0.5),
        peak_rss_mib: rss,
        serving_rss_mib: serving_rss,
        served_pages: served,
    })
}

impl std::fmt::Display for RestartReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "restart over {} waiting runs", self.waiting_runs)?;
        writeln!(
            f,
            "  start-up to serving:                {:>10.1} ms",
            self.startup_ms
        )?;
        writeln!(
            f,
            "  first pending page (50 gates):      {:>10.2} ms first, {:.2} ms median of 20",
            self.pending_first_ms, self.pending_median_ms
        )?;
        write!(
            f,
            "  peak RSS:                           {:>10.1} MiB while opening, {:.1} MiB after serving {} pending pages",
            self.peak_rss_mib, self.serving_rss_mib, self.served_pages
        )
    }
}

/// The standard workload's workflow name (registered by `holdpoint worker` too, so
/// worker processes can drive benchmark runs).
pub const WORKFLOW: &str = "holdpoint-bench";

/// The same workflow with its steps declared idempotent (`--idempotent-steps`).
pub const WORKFLOW_IDEMPOTENT: &str = "holdpoint-bench-idempotent";

/// Adds the standard workload's workflows.
pub fn register(registry: Registry) -> Registry {
    registry
        .workflow(WORKFLOW, 1, |ctx, order| standard(ctx, order, false))
        .workflow(WORKFLOW_IDEMPOTENT, 1, |ctx, order| standard(ctx, order, true))
}

fn registry() -> Registry {
    register(Registry::new())
}

/// What the report needs from a store beyond the trait.
trait Measured: Store + Clone {
    fn syncs(&self) -> Option<u64>;
    /// Keys written since the store was opened, where the store counts them.
    fn key_writes(&self) -> Option<u64>;
    fn disk_bytes(&self) -> impl std::future::Future<Output = Result<u64, String>> + Send;
    /// Bytes of keys and values held, where the store can tell cheaply.
    fn live_bytes(&self) -> Result<Option<u64>, String>;
}

impl Measured for SledStore {
    fn syncs(&self) -> Option<u64> {
        Some(self.sync_count())
    }
    fn key_writes(&self) -> Option<u64> {
        Some(SledStore::key_writes(self))
    }
    async fn disk_bytes(&self) -> Result<u64, String> {
        self.size_on_disk().map_err(|e| e.to_string())
    }
    fn live_bytes(&self) -> Result<Option<u64>, String> {
        let trees = SledStore::live_bytes(self).map_err(|e| e.to_string())?;
        Ok(Some(trees.iter().map(|t| t.bytes).sum()))
    }
}

impl Measured for PgStore {
    fn syncs(&self) -> Option<u64> {
        None
    }
    fn key_writes(&self) -> Option<u64> {
        None
    }
    async fn disk_bytes(&self) -> Result<u64, String> {
        self.size_on_disk().await.map_err(|e| e.to_string())
    }
    fn live_bytes(&self) -> Result<Option<u64>, String> {
        Ok(None)
    }
}

/// `holdpoint worker` processes for the benchmark, killed on drop.
struct WorkerProcs(Vec<std::process::Child>);

impl Drop for WorkerProcs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_workers(url: &str, schema: &str, n: usize, concurrency: usize) -> Result<WorkerProcs, String> {
    use std::io::BufRead;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut procs = WorkerProcs(Vec::new());
    for _ in 0..n {
        let mut child = std::process::Command::new(&exe)
            .args(["worker", "--pg", url, "--pg-schema", schema, "--concurrency"])
            .arg(concurrency.to_string())
            // 64 connections in all, whatever the number of processes.
            .arg("--pg-pool")
            .arg((64 / n.max(1)).max(4).to_string())
            .env("HOLDPOINT_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting a worker process ({}): {e}", exe.display()))?;
        let out = child.stdout.take().ok_or("no worker stdout")?;
        procs.0.push(child);
        // Ready once it says so.
        let mut line = String::new();
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if !line.contains("worker running") {
            return Err(format!("a worker process failed to start: {line:?}"));
        }
    }
    Ok(procs)
}

/// Runs the workload `repeat` times (at least once), each on a fresh directory, and
/// reports the median of every figure.
pub async fn run_median(opts: &BenchOptions, repeat: usize) -> Result<BenchReport, String> {
    let mut reports = Vec::new();
    for _ in 0..repeat.max(1) {
        reports.push(run(opts).await?);
    }
    let mut out = reports[reports.len() / 2].clone();
    let median = |f: &dyn Fn(&BenchReport) -> f64| {
        let mut v: Vec<f64> = reports.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // A figure the store may not give: the median of the runs' where this one has it.
    let median_of_some =
        |f: fn(&BenchReport) -> Option<f64>| f(&out).map(|_| median(&|r| f(r).unwrap_or(0.0)));
    let phase1_cpu = median_of_some(|r| r.phase1_cpu_us_per_run);
    let phase2_cpu = median_of_some(|r| r.phase2_cpu_us_per_run);
    let fsyncs = median_of_some(|r| r.fsyncs_per_run);
    let phase1_writes = median_of_some(|r| r.phase1_sled_writes_per_run);
    let phase2_writes = median_of_some(|r| r.phase2_sled_writes_per_run);
    let live = median_of_some(|r| r.live_bytes_per_run);
    out.repeats = reports.len();
    out.phase1_runs_per_s = median(&|r| r.phase1_runs_per_s);
    out.phase2_runs_per_s = median(&|r| r.phase2_runs_per_s);
    out.phase1_cpu_us_per_run = phase1_cpu;
    out.phase2_cpu_us_per_run = phase2_cpu;
    out.events_per_s = median(&|r| r.events_per_s);
    out.fsyncs_per_run = fsyncs;
    out.phase1_sled_writes_per_run = phase1_writes;
    out.phase2_sled_writes_per_run = phase2_writes;
    out.live_bytes_per_run = live;
    out.latency_p50_ms = median(&|r| r.latency_p50_ms);
    out.latency_p99_ms = median(&|r| r.latency_p99_ms);
    out.latency_max_ms = median(&|r| r.latency_max_ms);
    out.peak_rss_mib = median(&|r| r.peak_rss_mib);
    out.bytes_on_disk_per_run = median(&|r| r.bytes_on_disk_per_run);
    out.size_on_disk_bytes = median(&|r| r.size_on_disk_bytes as f64) as u64;
    Ok(out)
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "standard workload: {} runs, concurrency {}, {} API, {} store{}{}, durable acknowledgements{}",
            self.runs,
            self.concurrency,
            self.api,
            self.store,
            match self.worker_processes {
                0 => String::new(),
                n => format!(", {n} worker processes"),
            },
            if self.idempotent_steps {
                ", idempotent steps"
            } else {
                ""
            },
            if self.repeats > 1 {
                format!(" (median of {})", self.repeats)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "  phase 1 (start, run to the gate):   {:>10.0} runs/s",
            self.phase1_runs_per_s
        )?;
        writeln!(
            f,
            "  phase 2 (approve, run to the end):  {:>10.0} runs/s",
            self.phase2_runs_per_s
        )?;
        if let (Some(p1), Some(p2)) = (self.phase1_cpu_us_per_run, self.phase2_cpu_us_per_run) {
            writeln!(
                f,
                "  process CPU per run:                {p1:>10.0} µs in phase 1, {p2:.0} µs in phase 2"
            )?;
        }
        writeln!(
            f,
            "  events:                             {:>10.0} events/s ({} events)",
            self.events_per_s, self.events
        )?;
        match self.fsyncs_per_run {
            Some(x) => writeln!(f, "  fsyncs per run:                     {x:>10.2}")?,
            None => writeln!(
                f,
                "  fsyncs per run:                            n/a (the database's own)"
            )?,
        }
        if let (Some(p1), Some(p2)) = (self.phase1_sled_writes_per_run, self.phase2_sled_writes_per_run) {
            writeln!(
                f,
                "  sled writes per run:                {p1:>10.2} in phase 1, {p2:.2} in phase 2"
            )?;
        }
        writeln!(
            f,
            "  decision -> completed (sequential): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.latency_p50_ms, self.latency_p99_ms, self.latency_max_ms
        )?;
        writeln!(
            f,
            "  peak RSS:                           {:>10.1} MiB",
            self.peak_rss_mib
        )?;
        write!(
            f,
            "  disk per run:                       {:>10.0} bytes ({} bytes in all)",
            self.bytes_on_disk_per_run, self.size_on_disk_bytes
        )?;
        match self.live_bytes_per_run {
            Some(live) => write!(
                f,
                "\n  live data per run:                  {live:>10.0} bytes (keys and values; disk is {:.2}x)",
                self.bytes_on_disk_per_run / live.max(1.0)
            ),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_is_utime_plus_stime_counted_after_the_name() {
        // A command name may hold spaces and parentheses; the fields are counted from the
        // last ')'. utime is 250 ticks, stime 31: 2.81 s.
        let stat = "4242 (hp (a) b) R 1 4242 4242 0 -1 4194560 1517 0 0 0 250 31 0 0 20 0 3 0 1 2 3";
        assert_eq!(cpu_of_stat(stat), Some(Duration::from_millis(2810)));
        assert_eq!(cpu_of_stat("4242 (hp) R 1 2"), None, "too few fields");
        assert_eq!(cpu_of_stat("4242 hp R"), None, "no name");
        let from = Some(Duration::from_millis(1000));
        let to = Some(Duration::from_millis(3000));
        assert_eq!(cpu_per_run(from, to, 1000.0), Some(2000.0), "2 s over 1,000 runs");
        assert_eq!(cpu_per_run(to, from, 1000.0), None, "a clock that went back");
        if cfg!(target_os = "linux") {
            assert!(process_cpu().is_some(), "/proc/self/stat reads on Linux");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_on_an_idle_connection_the_server_closed_goes_out_on_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let engine = Engine::builder(store, registry()).build().unwrap();
        let http = serve_loopback(&engine, 1).await.unwrap();
        // An idle connection whose server end is gone: a listener that accepts, then
        // closes.
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        let closer = tokio::spawn(async move { drop(dead.accept().await) });
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(
            tokio::net::TcpStream::connect(dead_addr).await.unwrap(),
        ))
        .await
        .unwrap();
        let connection = tokio::spawn(connection);
        closer.await.unwrap();
        // The connection task sees the close and ends; the sender is then closed.
        let _ = connection.await;
        http.idle.lock().unwrap().push(sender);

        let out = http
            .post("/v1/runs", &json!({"workflow": WORKFLOW, "input": 7}))
            .await
            .expect("sent again on a new connection");
        assert!(out["run"].is_string(), "{out}");
        let idle = http.idle.lock().unwrap();
        assert_eq!(idle.len(), 1, "the new connection is kept for the next request");
        assert!(!idle[0].is_closed());
    }
}
