//! The `holdpoint` command line. [`main`] is the whole program; a user's own binary
//! calls it with its own workflows and gets the same CLI.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error.

use crate::journal::{Decision, Event, EventKind, GateId, RunId, RunStatus, SledStore, Store};
use crate::sanitize::{json_line, sanitize};
use crate::server::{self, AppState, Caller, Tokens, DEFAULT_BODY_LIMIT};
use crate::{replay, Engine, Registry, Replay};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default data directory of `serve` and the offline commands.
pub const DEFAULT_DATA: &str = "holdpoint-data";

#[derive(Parser, Debug)]
#[command(
    name = "holdpoint",
    version,
    about = "Durable agent runs that stop and ask a person before a risky action",
    after_help = "Client commands talk to a running `holdpoint serve`; offline commands (verify, export, replay) open the data directory and refuse while a server holds it."
)]
pub struct Cli {
    /// Server URL for client commands.
    #[arg(
        long,
        global = true,
        env = "HOLDPOINT_SERVER",
        default_value = "http://127.0.0.1:7700"
    )]
    pub server: String,
    /// Bearer token for client commands (default: the token `serve` generated in ./holdpoint-data/token).
    #[arg(long, global = true, env = "HOLDPOINT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Own the data directory: run workers and the HTTP API until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Run workers only, no HTTP API, against a shared PostgreSQL store (`--pg`); start
    /// as many as you like, on as many machines.
    Worker(WorkerArgs),
    /// Create or upgrade the PostgreSQL schema (`serve --pg` and `worker` do it too).
    Migrate {
        #[command(flatten)]
        pg: PgArgs,
    },
    /// `serve` with the example agents and a few runs started, so approvals are waiting.
    Demo(ServeArgs),
    /// Start a run of a workflow.
    Start {
        workflow: String,
        /// The workflow's input, as JSON.
        #[arg(long, default_value = "null")]
        input: String,
        /// A retry with the same key returns the same run.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List runs.
    Runs {
        /// waiting, running, completed, failed, stuck or cancelled.
        #[arg(long)]
        status: Option<RunStatus>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// A run's timeline: every event, who decided what and why.
    Show {
        run: RunId,
        #[arg(long)]
        json: bool,
    },
    /// Wait until a run is quiet (ended, or paused at a gate or timer), then print its status.
    Wait {
        run: RunId,
        /// Give up after this many seconds (exit 1).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Gates awaiting a decision.
    Pending {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Approve a gate: the action runs with the arguments as proposed.
    Approve {
        run: RunId,
        /// May be left out when the run has exactly one open gate.
        gate: Option<GateId>,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Approve with changed arguments: the action runs with these instead.
    Edit {
        run: RunId,
        gate: Option<GateId>,
        /// The new arguments, as JSON.
        #[arg(long)]
        args: String,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Reject a gate: the action does not run; the agent sees the reason.
    Reject {
        run: RunId,
        gate: Option<GateId>,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Answer an agent's question.
    Respond {
        run: RunId,
        gate: Option<GateId>,
        /// The answer, as JSON.
        #[arg(long)]
        input: String,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Review workload per action class: how often people are asked, how they answer,
    /// how fast, and what the current policy would have let through.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Run the standard workload on a fresh temporary store and print the figures.
    Bench {
        /// Runs in the workload.
        #[arg(long, default_value_t = 10_000)]
        runs: usize,
        /// Runs started or decided at once, and activations driven at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Start runs and decide gates through the HTTP API (real requests on loopback to
        /// an in-process server) instead of the engine API.
        #[arg(long)]
        http: bool,
        /// Run the workload this many times, each on a fresh directory, and report the
        /// median of each figure.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Run on PostgreSQL (a fresh schema, dropped afterwards) instead of sled.
        #[arg(long, value_name = "URL")]
        pg: Option<String>,
        /// With --pg: drive the runs from this many `holdpoint worker` processes.
        #[arg(long, default_value_t = 0, requires = "pg")]
        worker_processes: usize,
        /// Instead of the workload: add `--runs` runs to DIR (kept), each left waiting at
        /// its gate; the setup for `--restart`.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["restart", "http", "repeat"])]
        fill_waiting: Option<PathBuf>,
        /// Instead of the workload: open DIR as `serve` would and measure start-up to
        /// serving, the first page of pending gates, and RSS (the peak, and after two
        /// seconds of serving pending pages).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["http", "repeat"])]
        restart: Option<PathBuf>,
        /// Period of sled's background thread, which reclaims disk space (the store's
        /// default; for comparing settings).
        #[arg(long, value_name = "MS", default_value_t = crate::journal::SledOptions::default().flush_every_ms)]
        sled_flush_every_ms: u64,
        /// zstd level of sled's log (the store's default; `off` for none; fast levels
        /// are negative), for comparing settings
        #[arg(long, value_name = "LEVEL|off", default_value_t = Compression(crate::journal::SledOptions::default().compression), allow_hyphen_values = true, value_parser = parse_compression)]
        sled_compression: Compression,
        /// Declare the workflow's two steps idempotent: each step's start is journaled
        /// with its result instead of durably before its body (two commits fewer per run)
        #[arg(long, conflicts_with_all = ["fill_waiting", "restart"])]
        idempotent_steps: bool,
        /// Make commits durable in the store's write-ahead log instead of by flushing
        /// sled (`SledOptions::wal`), for comparing the two; with `--fill-waiting`, the
        /// directory is made with its log (`--restart` opens it as it was made)
        #[arg(long, conflicts_with_all = ["pg", "restart"])]
        sled_wal: bool,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a run.
    Cancel {
        run: RunId,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Check every journal's checksums and hash chain (offline).
    Verify {
        #[arg(long, default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Print each run's chain head (next seq and hash), to keep elsewhere and detect
        /// truncation or rollback later.
        #[arg(long)]
        head: bool,
        /// Check heads printed earlier by `--head`: every run must still hold at least
        /// those events, ending in the same chain hash.
        #[arg(long)]
        heads: Option<PathBuf>,
    },
    /// A run's events as JSON lines (offline).
    Export {
        run: RunId,
        #[arg(long, default_value = DEFAULT_DATA)]
        data: PathBuf,
    },
    /// Re-run the registered workflow code over a run's journal and report any
    /// nondeterminism (offline): the check before deploying changed workflow code.
    Replay {
        run: RunId,
        #[arg(long, default_value = DEFAULT_DATA)]
        data: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct KeyArg {
    /// A retry with the same key and decision is a no-op success.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// The request hash `pending` showed: the decision is refused if the request has
    /// changed since.
    #[arg(long = "hash")]
    pub request_hash: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Data directory (journal, tools, generated token).
    #[arg(long, default_value = DEFAULT_DATA)]
    pub data: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub addr: SocketAddr,
    /// Token file (TOML, `[[tokens]]` with token, principal, role). Without it,
    /// HOLDPOINT_TOKENS (TOKEN=PRINCIPAL:ROLE,...) is used; without either a token is
    /// generated for the local user and printed.
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT)]
    pub body_limit: usize,
    /// Guardrails for `ctx.act` (TOML; see the README). Without it every action waits
    /// for a person.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Webhook endpoints (TOML, `[[endpoints]]` with name, url, secret, events; see
    /// the README). Notifications are queued with the events they come from, so none
    /// is lost across a restart.
    #[arg(long)]
    pub webhooks: Option<PathBuf>,
    /// The address people reach this server at, for links in notifications (default:
    /// the listening address, or `public_url` in the webhooks file).
    #[arg(long)]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub pg: PgArgs,
    /// Serve the API and inbox only; `holdpoint worker` processes drive the runs (with
    /// `--pg`).
    #[arg(long)]
    pub no_workers: bool,
}

/// Where a shared PostgreSQL store is (instead of the embedded sled store).
#[derive(Args, Clone, Debug)]
pub struct PgArgs {
    /// Use the PostgreSQL store at this URL (`postgres://user@host:5432/db`) instead of
    /// the embedded store under `--data`; migrates its schema first.
    #[arg(long, env = "HOLDPOINT_PG")]
    pub pg: Option<String>,
    /// The schema holding Holdpoint's tables in that database.
    #[arg(long, default_value = "holdpoint")]
    pub pg_schema: String,
    /// Connections this process keeps to PostgreSQL (plus one that listens): keep the
    /// sum over all processes under the server's `max_connections`.
    #[arg(long, default_value_t = 16)]
    pub pg_pool: usize,
}

/// `holdpoint worker`.
#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub pg: PgArgs,
    /// Directory of the example agents' tools (their effects).
    #[arg(long, default_value = DEFAULT_DATA)]
    pub data: PathBuf,
    /// Activations driven at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds a lease lasts unrenewed: how soon the runs of a worker that died are
    /// taken over by the others.
    #[arg(long, default_value_t = 30)]
    pub lease_secs: u64,
    /// Guardrails for `ctx.act` (TOML), as for `serve`.
    #[arg(long)]
    pub policy: Option<PathBuf>,
}

/// A failure to report: the message is shown (sanitized) and the exit code is 1.
#[derive(Debug)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<crate::Error> for CliError {
    fn from(e: crate::Error) -> Self {
        CliError(e.to_string())
    }
}
impl From<crate::journal::Error> for CliError {
    fn from(e: crate::journal::Error) -> Self {
        CliError(e.to_string())
    }
}
impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError(e.to_string())
    }
}

type Result<T, E = CliError> = std::result::Result<T, E>;

/// Marks the error of writing to a closed pipe (`holdpoint pending | head`): the reader
/// has what it wanted, so the program stops quietly with success.
const BROKEN_PIPE: &str = "\0broken pipe";

/// Writes a line to stdout, turning a closed pipe into [`BROKEN_PIPE`].
fn emit(args: fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|_| out.write_all(b"\n")) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError(BROKEN_PIPE.into())),
        other => Ok(other?),
    }
}

macro_rules! say {
    ($($arg:tt)*) => { emit(format_args!($($arg)*))? };
}

/// The program, with one registry for every data directory.
pub fn main(registry: Registry) -> i32 {
    main_with(move |_| registry.clone())
}

/// The program; `registry` builds the workflows for a data directory (so their tools
/// can keep state next to the journal).
pub fn main_with(registry: impl Fn(&Path) -> Registry) -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    // The benchmark's own requests are not worth a log line each (nor their cost).
    let default_level = if matches!(cli.command, Command::Bench { .. }) {
        "warn"
    } else {
        "info"
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOLDPOINT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .try_init();
    match run(cli, &registry) {
        Ok(()) => 0,
        Err(e) if e.0 == BROKEN_PIPE => 0,
        Err(e) => {
            eprintln!("error: {}", sanitize(&e.0));
            1
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli, registry: &dyn Fn(&Path) -> Registry) -> Result<()> {
    let client = || Client::new(&cli.server, cli.token.clone());
    match cli.command {
        Command::Serve(args) => runtime()?.block_on(serve(args.clone(), registry(&args.data), false)),
        Command::Worker(args) => runtime()?.block_on(worker(
            args.clone(),
            crate::bench::register(registry(&args.data)),
        )),
        Command::Migrate { pg } => {
            let url = pg
                .pg
                .as_deref()
                .ok_or_else(|| CliError("migrate needs --pg URL (or HOLDPOINT_PG)".into()))?;
            let version = runtime()?.block_on(holdpoint_pg::PgStore::migrate(url, &pg.pg_schema))?;
            say!("schema {} is at version {version}", pg.pg_schema);
            Ok(())
        }
        Command::Demo(args) => runtime()?.block_on(serve(args.clone(), registry(&args.data), true)),
        Command::Start {
            workflow,
            input,
            idempotency_key,
            json,
        } => {
            let input = parse_json(&input, "--input")?;
            let out = client()?.post(
                "/v1/runs",
                &json!({"workflow": workflow, "input": input, "idempotency_key": idempotency_key}),
            )?;
            if json {
                say!("{out}");
            } else {
                say!("started run {}", sanitize(out["run"].as_str().unwrap_or("?")));
            }
            Ok(())
        }
        Command::Runs { status, limit, json } => {
            let mut path = format!("/v1/runs?limit={limit}");
            if let Some(st) = status {
                path.push_str(&format!("&status={st}"));
            }
            let runs = client()?.get(&path)?;
            if json {
                say!("{runs}");
                return Ok(());
            }
            say!("{:<36}  {:<9}  {:<20}  {:>6}  {:<5}  UPDATED", "RUN", "STATUS", "WORKFLOW", "EVENTS", "GATES");
            for r in runs.as_array().into_iter().flatten() {
                say!(
                    "{:<36}  {:<9}  {:<20}  {:>6}  {:<5}  {}",
                    text(&r["id"]),
                    text(&r["status"]),
                    format!("{} v{}", text(&r["workflow"]), r["version"]),
                    r["next_seq"],
                    r["open_gates"].as_array().map(|g| g.len()).unwrap_or(0),
                    text(&r["updated_at"]),
                );
            }
            Ok(())
        }
        Command::Show { run, json } => {
            let c = client()?;
            let view = c.get(&format!("/v1/runs/{run}"))?;
            let events = c.get(&format!("/v1/runs/{run}/events"))?;
            if json {
                say!("{}", json!({"run": view, "events": events}));
                return Ok(());
            }
            let events: Vec<Event> = serde_json::from_value(events)
                .map_err(|e| CliError(format!("server sent events this client cannot read: {e}")))?;
            emit(format_args!("{}", timeline(&view, &events).trim_end()))?;
            Ok(())
        }
        Command::Wait { run, timeout, json } => {
            let out = client()?.get(&format!("/v1/runs/{run}/wait?timeout_ms={}", timeout.saturating_mul(1000)))?;
            if json {
                say!("{out}");
            }
            let status = text(&out["summary"]["status"]);
            if out["settled"] != json!(true) {
                return Err(CliError(format!("run {run} is still {status} after {timeout}s")));
            }
            if !json {
                let open = out["summary"]["open_gates"].as_array().map(|g| g.len()).unwrap_or(0);
                say!("run {run}: {status}{}", if open > 0 { format!(" ({open} open gate(s))") } else { String::new() });
            }
            Ok(())
        }
        Command::Pending { limit, json } => {
            let gates = client()?.get(&format!("/v1/pending?limit={limit}"))?;
            if json {
                say!("{gates}");
                return Ok(());
            }
            let list = gates.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                say!("nothing is waiting for a decision");
            }
            let now = chrono::Utc::now();
            for g in list {
                let age = g["requested_at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| human(now - t.to_utc()))
                    .unwrap_or_default();
                say!(
                    "run {} gate {}  {} / {}  waiting {age}",
                    text(&g["run"]),
                    g["gate"],
                    text(&g["workflow"]),
                    text(&g["action"]),
                );
                say!("  args:    {}", json_line(&g["args"]));
                say!("  why:     {}", text(&g["reason"]));
                let mut who = String::new();
                if let Some(roles) = g["roles"].as_array().filter(|r| !r.is_empty()) {
                    let names: Vec<String> = roles.iter().map(text).collect();
                    who.push_str(&format!("roles {}", names.join(", ")));
                }
                let quorum = g["quorum"].as_u64().unwrap_or(1);
                if quorum > 1 {
                    let have = g["approvals"].as_array().map(|a| a.len()).unwrap_or(0);
                    who.push_str(&format!("{}{have} of {quorum} approvals", if who.is_empty() { "" } else { "; " }));
                }
                if let Some(d) = g["deadline"].as_str() {
                    who.push_str(&format!("{}deadline {}", if who.is_empty() { "" } else { "; " }, sanitize(d)));
                }
                if !who.is_empty() {
                    say!("  who:     {who}");
                }
                say!("  hash:    {}", text(&g["request_hash"]));
                if !g["context"].is_null() {
                    say!("  context: {}", json_line(&g["context"]));
                }
                say!("  decide:  {}", allowed_hint(&g));
            }
            Ok(())
        }
        Command::Approve { run, gate, comment, key } => {
            decide(&client()?, run, gate, Decision::Approve, comment, key)
        }
        Command::Edit {
            run,
            gate,
            args,
            comment,
            key,
        } => {
            let args = parse_json(&args, "--args")?;
            decide(&client()?, run, gate, Decision::Edit { args }, comment, key)
        }
        Command::Reject { run, gate, reason, key } => {
            decide(&client()?, run, gate, Decision::Reject { reason }, None, key)
        }
        Command::Respond {
            run,
            gate,
            input,
            comment,
            key,
        } => {
            let input = parse_json(&input, "--input")?;
            decide(&client()?, run, gate, Decision::Respond { input }, comment, key)
        }
        Command::Stats { json } => {
            let stats = client()?.get("/v1/stats")?;
            if json {
                say!("{stats}");
                return Ok(());
            }
            say!(
                "{:<20} {:>6} {:>5} {:>8} {:>6} {:>8} {:>8} {:>10} {:>6} {:>10}",
                "ACTION", "GATES", "OPEN", "APPROVE", "EDIT", "REJECT", "TIMEOUT", "MEDIAN", "<2s", "AUTO-OK"
            );
            for s in stats.as_array().into_iter().flatten() {
                let pct = |k: &str| format!("{:.0}%", s[k].as_f64().unwrap_or(0.0) * 100.0);
                let median = s["median_secs_to_decide"]
                    .as_f64()
                    .map(|m| human(chrono::TimeDelta::milliseconds((m * 1000.0) as i64)))
                    .unwrap_or_else(|| "-".into());
                say!(
                    "{:<20} {:>6} {:>5} {:>8} {:>6} {:>8} {:>8} {:>10} {:>6} {:>10}",
                    text(&s["action"]),
                    s["gates"],
                    s["open"],
                    pct("approve_rate"),
                    pct("edit_rate"),
                    pct("reject_rate"),
                    s["timed_out"],
                    median,
                    s["fast_decisions"],
                    s["would_auto_approve"]
                );
            }
            Ok(())
        }
        Command::Bench {
            runs,
            concurrency,
            http,
            repeat,
            pg,
            worker_processes,
            fill_waiting,
            restart,
            sled_flush_every_ms,
            sled_compression,
            idempotent_steps,
            sled_wal,
            json,
        } => {
            if let Some(dir) = fill_waiting {
                let waiting = runtime()?
                    .block_on(crate::bench::fill_waiting(&dir, runs, concurrency, sled_wal))
                    .map_err(CliError)?;
                say!("{waiting} runs waiting at their gates in {}", dir.display());
                return Ok(());
            }
            if let Some(dir) = restart {
                let report = runtime()?.block_on(crate::bench::restart(&dir, crate::bench::RESTART_SERVE_FOR)).map_err(CliError)?;
                if json {
                    say!("{}", serde_json::to_string(&report).map_err(|e| CliError(e.to_string()))?);
                } else {
                    say!("{report}");
                }
                return Ok(());
            }
            let opts = crate::bench::BenchOptions {
                runs,
                concurrency,
                http,
                pg,
                worker_processes,
                sled_flush_every_ms,
                sled_compression: sled_compression.0,
                idempotent_steps,
                sled_wal,
                ..Default::default()
            };
            let report = runtime()?
                // The load runs as a task on the runtime, as the server's handlers do, not
                // on the thread that blocks on it, where it was a third busy thread beside
                // the two workers (README, Performance: "Sixth session").
                .block_on(async move {
                    tokio::spawn(async move { crate::bench::run_median(&opts, repeat).await })
                        .await
                        .map_err(|e| e.to_string())?
                })
                .map_err(CliError)?;
            if json {
                say!("{}", serde_json::to_string(&report).map_err(|e| CliError(e.to_string()))?);
            } else {
                say!("{report}");
            }
            Ok(())
        }
        Command::Cancel { run, reason } => {
            client()?.post(&format!("/v1/runs/{run}/cancel"), &json!({"reason": reason}))?;
            say!("cancelled run {run}");
            Ok(())
        }
        Command::Verify { data, head, heads } => verify(&data, head, heads.as_deref()),
        Command::Export { run, data } => runtime()?.block_on(async {
            let store = open_offline(&data)?;
            let events = store.read(run, crate::journal::Seq::ZERO).await;
            let out = std::io::stdout();
            let mut out = out.lock();
            let result = events.map_err(CliError::from).and_then(|events| {
                for e in events {
                    writeln!(out, "{}", serde_json::to_string(&e).map_err(|e| CliError(e.to_string()))?)?;
                }
                Ok(())
            });
            store.close()?;
            result
        }),
        Command::Replay { run, data } => runtime()?.block_on(async {
            let store = open_offline(&data)?;
            let events = store.read(run, crate::journal::Seq::ZERO).await;
            store.close()?;
            let events = events?;
            let count = events.len();
            match replay(&registry(&data), events).await {
                Replay::Consistent { would_append } if would_append.is_empty() => {
                    say!("run {run}: the current code matches its journal ({count} events)");
                    Ok(())
                }
                Replay::Consistent { would_append } => {
                    let next: Vec<&str> = would_append.iter().map(|e| e.tag()).collect();
                    say!(
                        "run {run}: the current code matches its journal ({count} events); it would go on with: {}",
                        next.join(", ")
                    );
                    Ok(())
                }
                Replay::Nondeterministic(nd) => Err(CliError(nd.to_string())),
                Replay::Broken(why) => Err(CliError(format!("run {run} cannot be replayed: {why}"))),
            }
        }),
    }
}

/// `bench --sled-compression`: a zstd level, or `off`.
#[derive(Clone, Copy, Debug)]
pub struct Compression(Option<i32>);

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(level) => write!(f, "{level}"),
            None => f.write_str("off"),
        }
    }
}

fn parse_compression(text: &str) -> std::result::Result<Compression, String> {
    if text == "off" {
        return Ok(Compression(None));
    }
    match text.parse::<i32>() {
        Ok(level) if (-22..=22).contains(&level) => Ok(Compression(Some(level))),
        _ => Err(format!("`{text}` is not a zstd level (-22 to 22) or `off`")),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn parse_json(text: &str, flag: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| CliError(format!("{flag} is not valid JSON: {e}")))
}

/// A JSON string's content, sanitized; other values as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => sanitize(s).into_owned(),
        other => json_line(other),
    }
}

fn human(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn allowed_hint(g: &Value) -> String {
    let run = text(&g["run"]);
    let gate = &g["gate"];
    g["allowed"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| match k.as_str().unwrap_or("") {
            "approve" => format!("holdpoint approve {run} {gate}"),
            "edit" => format!("holdpoint edit {run} {gate} --args JSON"),
            "reject" => format!("holdpoint reject {run} {gate} --reason TEXT"),
            "respond" => format!("holdpoint respond {run} {gate} --input JSON"),
            other => sanitize(other).into_owned(),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn decide(
    client: &Client,
    run: RunId,
    gate: Option<GateId>,
    decision: Decision,
    comment: Option<String>,
    key: KeyArg,
) -> Result<()> {
    let gate = match gate {
        Some(g) => g,
        None => {
            let view = client.get(&format!("/v1/runs/{run}"))?;
            let open: Vec<GateId> = view["state"]["gates"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, g)| g["decision"].is_null())
                .filter_map(|(id, _)| id.parse().ok())
                .collect();
            match open.as_slice() {
                [one] => *one,
                [] => return Err(CliError(format!("run {run} has no open gate"))),
                many => {
                    let ids: Vec<String> = many.iter().map(|g| g.to_string()).collect();
                    return Err(CliError(format!(
                        "run {run} has {} open gates ({}); name one",
                        many.len(),
                        ids.join(", ")
                    )));
                }
            }
        }
    };
    let kind = decision.kind();
    let out = client.post(
        &format!("/v1/runs/{run}/gates/{gate}/decision"),
        &json!({
            "decision": decision, "comment": comment,
            "idempotency_key": key.idempotency_key, "request_hash": key.request_hash,
        }),
    )?;
    if out["voted"] == json!(true) {
        let approvals = out["approvals"].as_array().map(|a| a.len()).unwrap_or(0);
        say!(
            "vote counted at run {run} gate {gate}: {approvals} of {} approvals",
            out["needed"]
        );
        return Ok(());
    }
    let by = text(&out["decision"]["by"]);
    if out["recorded"] == json!(true) {
        say!("recorded: {kind} at run {run} gate {gate}, by {by}");
    } else {
        say!("already recorded (same idempotency key): {kind} at run {run} gate {gate}, by {by}");
    }
    Ok(())
}

/// The readable timeline `show` prints.
pub fn timeline(view: &Value, events: &[Event]) -> String {
    let mut out = String::new();
    let s = &view["summary"];
    out.push_str(&format!(
        "run {}  {} v{}  {}\n",
        text(&s["id"]),
        text(&s["workflow"]),
        s["version"],
        text(&s["status"]).to_uppercase()
    ));
    if let Some(why) = s["stuck"].as_str() {
        out.push_str(&format!("stuck: {}\n", sanitize(why)));
    }
    for e in events {
        let line = describe_event(&e.event);
        out.push_str(&format!(
            "{:>4}  {}  {line}\n",
            e.seq,
            e.at.format("%Y-%m-%d %H:%M:%S")
        ));
    }
    out
}

/// One event in a line (or a few), sanitized for a terminal: what `show` prints and the
/// web inbox's timeline shows.
pub fn describe_event(event: &EventKind) -> String {
    match event {
        EventKind::RunStarted {
            workflow,
            version,
            input,
            ..
        } => {
            format!(
                "started {} v{version} with {}",
                sanitize(workflow),
                json_line(input)
            )
        }
        EventKind::StepStarted {
            position,
            name,
            attempt,
            args_hash,
        } => {
            let mut l = format!("step {position} {:?} attempt {attempt} started", sanitize(name));
            if let Some(h) = args_hash {
                l.push_str(&format!(" with args {h}"));
            }
            l
        }
        EventKind::PolicyEvaluated { verdict, reason, .. } => {
            format!("policy: {verdict} — {}", sanitize(reason))
        }
        EventKind::VoteRecorded { gate, vote, by, .. } => {
            format!("gate {gate} vote: {vote} by {}", sanitize(by.as_str()))
        }
        EventKind::GateEscalated {
            gate, level, roles, ..
        } => format!(
            "gate {gate} escalated to group {level} ({})",
            sanitize(&roles.join(", "))
        ),
        EventKind::StepCompleted { position, output } => {
            format!("step {position} completed: {}", json_line(output))
        }
        EventKind::StepFailed {
            position,
            error,
            attempt,
            will_retry,
            ..
        } => format!(
            "step {position} attempt {attempt} failed: {} ({})",
            sanitize(error),
            if *will_retry { "will retry" } else { "gave up" }
        ),
        EventKind::ApprovalRequested {
            gate,
            action,
            args,
            reason,
            context,
            ..
        } => {
            let mut l = format!(
                "gate {gate} opened: {} {}\n        why: {}",
                sanitize(action),
                json_line(args),
                sanitize(reason)
            );
            if !context.is_null() {
                l.push_str(&format!("\n        context: {}", json_line(context)));
            }
            l
        }
        EventKind::DecisionRecorded {
            gate,
            decision,
            by,
            comment,
            ..
        } => {
            let what = match decision {
                Decision::Approve => "APPROVED".to_string(),
                Decision::Edit { args } => format!("EDITED to {}", json_line(args)),
                Decision::Reject { reason } => format!("REJECTED: {}", sanitize(reason)),
                Decision::Respond { input } => format!("ANSWERED {}", json_line(input)),
            };
            let mut l = format!("gate {gate} {what} by {}", sanitize(by.as_str()));
            if let Some(c) = comment {
                l.push_str(&format!(" — {}", sanitize(c)));
            }
            l
        }
        EventKind::ValueRecorded {
            position,
            source,
            value,
        } => {
            format!("{source}() at {position} = {}", json_line(value))
        }
        EventKind::TimerStarted { position, fire_at } => format!("timer {position} until {fire_at}"),
        EventKind::TimerFired { position } => format!("timer {position} fired"),
        EventKind::GateResumed { gate } => format!("gate {gate} resumed with its decision"),
        EventKind::DecisionTakenIn { gate } => {
            format!("gate {gate}: decision taken in while the run was driven")
        }
        EventKind::RunCompleted { output } => format!("completed: {}", json_line(output)),
        EventKind::RunFailed { error } => format!("failed: {}", sanitize(error)),
        EventKind::RunCancelled { by, reason } => format!(
            "cancelled by {}{}",
            sanitize(by.as_str()),
            reason
                .as_ref()
                .map(|r| format!(": {}", sanitize(r)))
                .unwrap_or_default()
        ),
    }
}

/// Opens the data directory for an offline command.
fn open_offline(data: &Path) -> Result<SledStore> {
    let dir = data.join("journal");
    if !dir.exists() {
        return Err(CliError(format!("no Holdpoint data in {}", data.display())));
    }
    Ok(SledStore::open(dir)?)
}

fn verify(data: &Path, head: bool, saved_heads: Option<&Path>) -> Result<()> {
    runtime()?.block_on(async {
        let store = open_offline(data)?;
        let runs: Vec<RunId> = store.run_ids().collect::<std::result::Result<_, _>>()?;
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(runs.len() as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        let mut bad = 0;
        let mut events = 0;
        for &run in &runs {
            match store.verify_run(run) {
                Ok((next, chain_head)) => {
                    events += next.0 as usize;
                    if head {
                        bar.suspend(|| emit(format_args!("{run} {next} {chain_head}")))?;
                    }
                }
                Err(e) => {
                    bad += 1;
                    bar.suspend(|| emit(format_args!("BAD {run}: {}", sanitize(&e.to_string()))))?;
                }
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        if let Some(path) = saved_heads {
            bad += check_heads(&store, path).await?;
        }
        store.close()?;
        say!("verified {} runs, {events} events: {bad} bad", runs.len());
        if bad > 0 {
            Err(CliError(format!(
                "{bad} of {} journals failed verification",
                runs.len()
            )))
        } else {
            Ok(())
        }
    })
}

/// Compares saved chain heads with the store; returns how many runs fail.
async fn check_heads(store: &SledStore, path: &Path) -> Result<usize> {
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError(format!("reading {}: {e}", path.display())))?;
    let mut bad = 0;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let (Some(run), Some(next), Some(hash)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CliError(format!(
                "{} line {}: expected RUN NEXT_SEQ HEAD",
                path.display(),
                i + 1
            )));
        };
        let (Ok(run), Ok(next)) = (run.parse::<RunId>(), next.parse::<u64>()) else {
            return Err(CliError(format!(
                "{} line {}: expected RUN NEXT_SEQ HEAD",
                path.display(),
                i + 1
            )));
        };
        let problem = match store.summary(run).await? {
            None => Some("the run is gone".to_string()),
            Some(s) if s.next_seq.0 < next => Some(format!(
                "the journal has {} events but had {next} when its head was saved: truncated or rolled back",
                s.next_seq
            )),
            Some(_) if next == 0 => None,
            Some(_) => match store.chain_hash_at(run, crate::journal::Seq(next - 1)) {
                Ok(h) if h.to_hex() == hash => None,
                Ok(_) => Some(format!(
                    "the first {next} events differ from when the head was saved: rewritten"
                )),
                Err(e) => Some(e.to_string()),
            },
        };
        if let Some(p) = problem {
            bad += 1;
            say!("BAD {run}: {}", sanitize(&p));
        }
    }
    Ok(bad)
}

/// A random token: 32 bytes from the OS, hex.
pub(crate) fn generate_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| CliError(format!("no randomness for a token: {e}")))?;
    Ok(crate::journal::hex(&bytes))
}

fn load_tokens(args: &ServeArgs) -> Result<(Tokens, Option<String>)> {
    if let Some(path) = &args.tokens {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError(format!("reading {}: {e}", path.display())))?;
        let tokens = Tokens::from_toml(&text).map_err(|e| CliError(format!("{}: {e}", path.display())))?;
        if tokens.is_empty() {
            return Err(CliError(format!("{} names no tokens", path.display())));
        }
        return Ok((tokens, None));
    }
    if let Ok(spec) = std::env::var("HOLDPOINT_TOKENS") {
        let tokens = Tokens::from_spec(&spec).map_err(|e| CliError(format!("HOLDPOINT_TOKENS: {e}")))?;
        if !tokens.is_empty() {
            return Ok((tokens, None));
        }
    }
    let path = args.data.join("token");
    let token = match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= server::MIN_TOKEN_LEN => t.trim().to_string(),
        _ => {
            let t = generate_token()?;
            write_private(&path, &t)?;
            t
        }
    };
    let mut tokens = Tokens::default();
    tokens
        .add(&token, Caller::new("local", &[server::roles::ADMIN]))
        .map_err(CliError)?;
    Ok((tokens, Some(token)))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down: no new work is claimed; running activations finish");
}

fn load_policy(path: Option<&Path>) -> Result<crate::Policy> {
    Ok(match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError(format!("reading {}: {e}", path.display())))?;
            crate::Policy::from_toml(&text).map_err(|e| CliError(format!("{}: {e}", path.display())))?
        }
        None => crate::Policy::default(),
    })
}

async fn connect_pg(pg: &PgArgs, outbox: Option<Vec<String>>) -> Result<Option<holdpoint_pg::PgStore>> {
    let Some(url) = &pg.pg else { return Ok(None) };
    let store = holdpoint_pg::PgStore::connect(
        url,
        holdpoint_pg::PgOptions {
            schema: pg.pg_schema.clone(),
            pool_size: pg.pg_pool,
            outbox_endpoints: outbox,
            ..Default::default()
        },
    )
    .await?;
    Ok(Some(store))
}

async fn worker(args: WorkerArgs, registry: Registry) -> Result<()> {
    let store = connect_pg(&args.pg, None).await?.ok_or_else(|| {
        CliError("worker needs --pg URL (or HOLDPOINT_PG): the embedded store is one process".into())
    })?;
    let engine = Engine::builder(store, registry)
        .policy(load_policy(args.policy.as_deref())?)
        .config(crate::EngineConfig {
            concurrency: args.concurrency,
            lease_ttl: Duration::from_secs(args.lease_secs.max(1)),
            ..Default::default()
        })
        .build()?;
    let workers = engine.spawn_workers();
    say!(
        "holdpoint worker running against schema {} (Ctrl-C stops it)",
        args.pg.pg_schema
    );
    shutdown_signal().await;
    workers.shutdown().await;
    say!("stopped");
    Ok(())
}

async fn serve(args: ServeArgs, registry: Registry, demo: bool) -> Result<()> {
    std::fs::create_dir_all(&args.data)?;
    let hooks = match &args.webhooks {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError(format!("reading {}: {e}", path.display())))?;
            Some(
                crate::webhooks::WebhookConfig::from_toml(&text)
                    .map_err(|e| CliError(format!("{}: {e}", path.display())))?,
            )
        }
        None => None,
    };
    let outbox = hooks.as_ref().map(|h| h.names()).unwrap_or_default();
    if let Some(store) = connect_pg(&args.pg, Some(outbox.clone())).await? {
        return serve_on(store, args, registry, demo, hooks, |_| Ok(())).await;
    }
    let store = SledStore::open_with(
        args.data.join("journal"),
        crate::journal::SledOptions {
            outbox_endpoints: outbox,
            ..Default::default()
        },
    )?;
    serve_on(store, args, registry, demo, hooks, |store: SledStore| {
        Ok(store.close()?)
    })
    .await
}

/// Serves the API, the inbox, workers and webhooks on `store` until SIGINT/SIGTERM;
/// `close` finishes with the store once nothing else holds it.
async fn serve_on<St: Store + Clone>(
    store: St,
    args: ServeArgs,
    registry: Registry,
    demo: bool,
    hooks: Option<crate::webhooks::WebhookConfig>,
    close: impl FnOnce(St) -> Result<()>,
) -> Result<()> {
    let (tokens, generated) = load_tokens(&args)?;
    let policy = load_policy(args.policy.as_deref())?;
    let engine = Engine::builder(store, registry).policy(policy).build()?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| CliError(format!("cannot listen on {}: {e}", args.addr)))?;
    let addr = listener.local_addr()?;
    let workers = (!args.no_workers).then(|| engine.spawn_workers());
    let url = format!("http://{addr}");
    let webhooks = hooks.as_ref().map(|h| {
        let public = args
            .public_url
            .clone()
            .or_else(|| h.public_url.clone())
            .unwrap_or_else(|| url.clone());
        crate::webhooks::Webhooks::spawn(
            engine.store().clone(),
            h,
            public,
            crate::webhooks::DeliveryOptions::default(),
        )
    });
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "holdpoint listening on {url} (data in {})",
            args.data.display()
        )?;
        if let Some(token) = &generated {
            writeln!(
                out,
                "no tokens configured: generated one for the local user (principal `local`, role admin),\nsaved in {}:\n  export HOLDPOINT_TOKEN={token}",
                args.data.join("token").display()
            )?;
        }
        out.flush()?;
    }
    if demo {
        seed_demo(&engine, &url).await?;
    }
    let state = AppState::new(engine.clone(), tokens);
    let closing = state.clone();
    let served = axum::serve(listener, server::router(state, args.body_limit))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            closing.close();
        })
        .await;
    if let Some(workers) = workers {
        workers.shutdown().await;
    }
    if let Some(w) = webhooks {
        w.shutdown().await;
    }
    // Connection tasks may still be dropping their handles after `serve` returned.
    match tokio::time::timeout(Duration::from_secs(10), engine.into_store_when_released()).await {
        Ok(store) => close(store)?,
        Err(_) => tracing::warn!("engine still referenced 10 s after shutdown; the store closes on exit"),
    }
    served.map_err(|e| CliError(format!("server failed: {e}")))?;
    say!("stopped");
    Ok(())
}

async fn seed_demo<St: Store>(engine: &Engine<St>, url: &str) -> Result<()> {
    let runs = [
        (
            "refund",
            json!({"order_id": "A-1001", "amount_cents": 25_000, "reason": "arrived damaged"}),
        ),
        (
            "refund",
            json!({"order_id": "A-1002", "amount_cents": 2_500, "reason": "late delivery"}),
        ),
        (
            "customer_email",
            json!({"customer": "Dana", "email": "dana@example.com", "complaint": "My order arrived broken"}),
        ),
        ("data_cleanup", json!({"table": "users", "older_than_days": 180})),
    ];
    let mut started = Vec::new();
    for (i, (workflow, input)) in runs.iter().enumerate() {
        match engine.start(workflow, input, Some(&format!("demo-{i}"))).await {
            Ok(run) => started.push(run),
            Err(crate::Error::UnknownWorkflow { .. }) => {
                return Err(CliError(format!(
                    "demo needs the example agents; workflow {workflow:?} is not registered"
                )))
            }
            Err(e) => return Err(e.into()),
        }
    }
    for &run in &started {
        engine.settled(run).await?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\ndemo: started {} runs; the safe ones finished, the risky ones wait for you.\n\nIn a browser: {url}/ (sign in with the token above).\nIn another terminal (with HOLDPOINT_TOKEN set as above):\n  holdpoint pending                       # what is waiting, and why\n  holdpoint approve RUN                   # run the action as proposed\n  holdpoint edit RUN --args '{{...}}'       # run it with changed arguments\n  holdpoint reject RUN --reason '...'     # the agent sees the reason\n  holdpoint respond RUN --input '[...]'   # answer the cleanup agent's question\n  holdpoint show RUN                      # the run's timeline\n\nStop this server (Ctrl-C, or even kill -9) and start it again: waiting runs resume.\nAPI: {url}/v1/pending",
        started.len()
    )?;
    out.flush()?;
    Ok(())
}

/// The CLI's HTTP client.
struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(base: &str, token: Option<String>) -> Result<Client> {
        let token = match token {
            Some(t) => t,
            None => std::fs::read_to_string(Path::new(DEFAULT_DATA).join("token"))
                .map(|t| t.trim().to_string())
                .map_err(|_| {
                    CliError(
                        "no token: set HOLDPOINT_TOKEN (or --token) to the token `holdpoint serve` printed"
                            .into(),
                    )
                })?,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        })
    }

    fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(resp)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.finish(resp)
    }

    fn finish(
        &self,
        resp: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut resp =
            resp.map_err(|e| CliError(format!("cannot reach the server at {}: {e}", self.base)))?;
        let status = resp.status();
        let body: Value = resp
            .body_mut()
            .read_json()
            .map_err(|e| CliError(format!("unreadable response ({status}): {e}")))?;
        if status.is_success() {
            return Ok(body);
        }
        let err = &body["error"];
        let mut msg = format!("{} ({status})", text(&err["message"]));
        if let Some(rec) = err.get("recorded") {
            msg.push_str(&format!(
                "\nrecorded decision: {} by {} at {}",
                json_line(&rec["decision"]),
                text(&rec["by"]),
                text(&rec["at"])
            ));
        }
        Err(CliError(msg))
    }
}
