//! Many processes, one PostgreSQL store: the real `holdpoint` binary as an API process
//! (no workers) and several `holdpoint worker` processes, on loopback, each test in its
//! own schema. Needs PostgreSQL (`HOLDPOINT_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`): missing, the tests fail.
//!
//! `HOLDPOINT_MP_RUNS` sets the runs of the main test (default 1,000).

mod common;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_holdpoint");
const ADMIN: &str = "admin-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";

fn pg_url() -> String {
    std::env::var("HOLDPOINT_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema, dropped when the test ends (also on failure).
struct Schema(String);

impl Schema {
    fn new() -> Schema {
        let name = format!("hp_mp_{}", uuid::Uuid::now_v7().simple());
        let out = Command::new(BIN)
            .args(["migrate", "--pg", &pg_url(), "--pg-schema", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PostgreSQL is required (HOLDPOINT_PG_URL): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Schema(name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &pg_url(),
                "-q",
                "-c",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0),
            ])
            .output();
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

/// Spawns `holdpoint ARGS` and waits for its first line of output (it is ready then).
fn spawn(args: &[&str]) -> (Proc, String) {
    let (child, first) = common::spawn_ready(Command::new(BIN).args(args).env("HOLDPOINT_LOG", "warn"));
    (Proc(child), first)
}

fn tokens(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            "[[tokens]]\ntoken = \"{ADMIN}\"\nprincipal = \"ana\"\nrole = \"admin\"\n\
             [[tokens]]\ntoken = \"{OPERATOR}\"\nprincipal = \"agent-host\"\nrole = \"operator\"\n"
        ),
    )
    .unwrap();
    path
}

fn api(schema: &Schema, dir: &Path) -> (Proc, String) {
    let tokens = tokens(dir);
    let data = dir.join("data");
    let (p, first) = spawn(&[
        "serve",
        "--no-workers",
        "--addr",
        "127.0.0.1:0",
        "--pg",
        &pg_url(),
        "--pg-schema",
        &schema.0,
        "--tokens",
        tokens.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    (p, common::url_in(&first))
}

fn worker(schema: &Schema, dir: &Path, lease_secs: u64) -> Proc {
    let data = dir.join("data");
    let (p, first) = spawn(&[
        "worker",
        "--pg",
        &pg_url(),
        "--pg-schema",
        &schema.0,
        "--data",
        data.to_str().unwrap(),
        "--lease-secs",
        &lease_secs.to_string(),
    ]);
    assert!(first.contains("worker running"), "{first}");
    p
}

struct Client {
    url: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(url: &str) -> Client {
        Client {
            url: url.into(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into(),
        }
    }
    fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {token}");
        let resp = match method {
            "GET" => self.agent.get(&url).header("Authorization", &auth).call(),
            _ => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(body.unwrap_or(json!({}))),
        };
        let mut resp = resp.unwrap();
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_json().unwrap_or(Value::Null))
    }
    fn start(&self, order: usize) -> String {
        let (st, b) = self.call(
            "POST",
            "/v1/runs",
            OPERATOR,
            Some(json!({"workflow": "refund", "input": {
                "order_id": format!("M-{order}"), "amount_cents": 30_000 + order, "reason": "broken"}})),
        );
        assert_eq!(st, 201, "{b}");
        b["run"].as_str().unwrap().to_string()
    }
    /// Long-polls until the run is quiet (waiting for a person, or ended); the API
    /// process hears of other processes' writes by LISTEN/NOTIFY.
    fn settle(&self, run: &str) -> Value {
        // At most four minutes: a run that never settles fails the test, never hangs it.
        for _ in 0..8 {
            let (st, b) = self.call(
                "GET",
                &format!("/v1/runs/{run}/wait?timeout_ms=30000"),
                ADMIN,
                None,
            );
            assert_eq!(st, 200, "{b}");
            if b["settled"] == json!(true) {
                return b;
            }
        }
        panic!("run {run} did not settle in four minutes");
    }
    fn approve(&self, run: &str) {
        let (st, b) = self.call(
            "POST",
            &format!("/v1/runs/{run}/gates/1/decision"),
            ADMIN,
            Some(json!({"decision": {"kind": "approve"}})),
        );
        assert_eq!(st, 200, "{b}");
    }
}

/// The payments made (the ledger's payment files, its record).
fn ledger(dir: &Path) -> Vec<Value> {
    holdpoint::workflows::Ledger::new(dir.join("data/tools/ledger.jsonl"))
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect()
}

/// Every run completed exactly once, and paid once with the approved amount.
fn check_exactly_once(client: &Client, dir: &Path, runs: &[String]) {
    for (i, run) in runs.iter().enumerate() {
        let done = client.settle(run);
        assert_eq!(done["summary"]["status"], "completed", "{done}");
        let (_, events) = client.call("GET", &format!("/v1/runs/{run}/events"), ADMIN, None);
        let kinds: Vec<&str> = events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"]["type"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "run-completed").count(),
            1,
            "{kinds:?}"
        );
        assert_eq!(
            kinds.iter().filter(|k| **k == "decision-recorded").count(),
            1,
            "{kinds:?}"
        );
        let _ = i;
    }
    let paid = ledger(dir);
    assert_eq!(paid.len(), runs.len(), "one payment per run");
    let keys: std::collections::BTreeSet<_> = paid.iter().map(|p| p["idempotency_key"].to_string()).collect();
    assert_eq!(keys.len(), runs.len(), "no payment twice");
    for p in &paid {
        let order: usize = p["memo"]
            .as_str()
            .unwrap()
            .split("order M-")
            .nth(1)
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            p["amount_cents"],
            json!(30_000 + order),
            "paid the approved amount"
        );
    }
}

#[test]
fn three_workers_and_an_api_process_complete_every_run_exactly_once() {
    let runs_wanted: usize = std::env::var("HOLDPOINT_MP_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let schema = Schema::new();
    let (_api, url) = api(&schema, dir.path());
    let _workers: Vec<Proc> = (0..3).map(|_| worker(&schema, dir.path(), 30)).collect();
    let client = Client::new(&url);
    let runs: Vec<String> = (0..runs_wanted).map(|i| client.start(i)).collect();
    for run in &runs {
        let s = client.settle(run);
        assert_eq!(s["summary"]["status"], "waiting", "{s}");
    }
    assert!(ledger(dir.path()).is_empty(), "nothing paid before approval");
    // Decisions through the API process, which runs no workers: each wakes a run held by
    // no one, and a worker in another process resumes it.
    for run in &runs {
        client.approve(run);
    }
    check_exactly_once(&client, dir.path(), &runs);
}

/// Runs some worker holds a lease on right now.
fn leased(schema: &Schema) -> usize {
    let out = Command::new("psql")
        .args([
            &pg_url(),
            "-tAc",
            &format!(
                "SELECT count(*) FROM {}.runs WHERE lease_token IS NOT NULL",
                schema.0
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Starts and approves batches of runs until `w`, frozen by SIGSTOP right after a batch's
/// approvals, holds leases. Returns every run started.
fn freeze_holding_leases(client: &Client, schema: &Schema, w: &Proc) -> Vec<String> {
    let mut runs = Vec::new();
    for batch in 0..20 {
        let fresh: Vec<String> = (0..40).map(|i| client.start(batch * 100 + i)).collect();
        for run in &fresh {
            client.settle(run);
        }
        for run in &fresh {
            client.approve(run);
        }
        w.signal("-STOP");
        runs.extend(fresh);
        if leased(schema) > 0 {
            return runs;
        }
        w.signal("-CONT");
    }
    panic!("the worker never held a lease when stopped");
}

fn event_counts(client: &Client, runs: &[String]) -> Vec<usize> {
    runs.iter()
        .map(|run| {
            let (_, events) = client.call("GET", &format!("/v1/runs/{run}/events"), ADMIN, None);
            events.as_array().unwrap().len()
        })
        .collect()
}

#[test]
fn a_killed_workers_runs_are_taken_over_after_its_lease_expires() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Schema::new();
    let (_api, url) = api(&schema, dir.path());
    let client = Client::new(&url);
    let doomed = worker(&schema, dir.path(), 2);
    let runs = freeze_holding_leases(&client, &schema, &doomed);
    // It dies holding leases; another worker takes its runs over once they expire.
    doomed.signal("-KILL");
    let _survivor = worker(&schema, dir.path(), 2);
    check_exactly_once(&client, dir.path(), &runs);
}

#[test]
fn a_worker_paused_past_its_lease_cannot_append_when_it_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Schema::new();
    let (_api, url) = api(&schema, dir.path());
    let client = Client::new(&url);
    let mut paused = worker(&schema, dir.path(), 2);
    let runs = freeze_holding_leases(&client, &schema, &paused);
    // While it is stopped, another worker takes over and finishes everything.
    let _other = worker(&schema, dir.path(), 2);
    check_exactly_once(&client, dir.path(), &runs);
    let before = event_counts(&client, &runs);
    // It wakes up mid-activation, still believing in its leases; then it is asked to
    // stop, which lets its in-flight activations finish (or fail) first.
    paused.signal("-CONT");
    paused.signal("-TERM");
    let status = paused.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        event_counts(&client, &runs),
        before,
        "0 appends accepted from the resumed worker"
    );
    check_exactly_once(&client, dir.path(), &runs);
}
