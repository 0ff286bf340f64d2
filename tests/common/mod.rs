//! An in-process HTTP server on a loopback port, and a blocking client, for tests that
//! need the real API but control the engine (its clock, its policy).
#![allow(dead_code)]

use holdpoint::journal::{Decision, DecisionKind, EventKind, GateId, GateKind, Principal, SledStore};
use holdpoint::server::{self, AppState, Tokens};
use holdpoint::Engine;
use serde_json::{json, Value};

pub struct Server {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// Serves the API for `engine` on a free loopback port.
pub async fn serve(engine: Engine<SledStore>, tokens: Tokens) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(engine, tokens);
    let closing = state.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        axum::serve(listener, server::router(state, server::DEFAULT_BODY_LIMIT))
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
                closing.close();
            })
            .await
            .unwrap();
    });
    Server {
        url,
        stop: Some(stop),
        handle: Some(handle),
    }
}

impl Server {
    /// Stops serving and waits until the server (and its engine handle) is gone.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One request; `(status, JSON body or null)`.
pub async fn call(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{url}{path}");
    let token = token.map(str::to_string);
    let method = method.to_string();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut resp = match method.as_str() {
            "GET" => {
                let mut r = agent.get(&url);
                if let Some(t) = &token {
                    r = r.header("Authorization", format!("Bearer {t}"));
                }
                r.call()
            }
            _ => {
                let mut r = agent.post(&url);
                if let Some(t) = &token {
                    r = r.header("Authorization", format!("Bearer {t}"));
                }
                r.send_json(body.unwrap_or(json!({})))
            }
        }
        .unwrap();
        let status = resp.status().as_u16();
        (
            status,
            resp.body_mut().read_json::<Value>().unwrap_or(Value::Null),
        )
    })
    .await
    .unwrap()
}

/// Copies a directory tree (a store to damage, keeping the original).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Flushes a plain sled `Db` opened on a store's directory and waits until sled has let
/// go of the directory's lock. Every `Tree` of `db` must be dropped first.
pub fn release_sled(db: sled::Db, dir: &std::path::Path) {
    db.flush().unwrap();
    drop(db);
    let file = std::fs::File::open(dir.join("db")).unwrap();
    fs2::FileExt::lock_exclusive(&file).unwrap();
    fs2::FileExt::unlock(&file).unwrap();
}

/// A number in 0..n chosen by a seed and a label: the same in every process and run.
pub fn pick(seed: u64, label: &str, n: u64) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::new()
        .chain_update(seed.to_be_bytes())
        .chain_update(label)
        .finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap()) % n.max(1)
}

/// A closed store with two runs: the first of `events` events (step outputs
/// `{"n": i, "note": ...}`), the second of one. For tests that damage a long journal.
pub async fn store_with_long_run(
    dir: &std::path::Path,
    events: u64,
    layout: Layout,
) -> (holdpoint::journal::RunId, holdpoint::journal::RunId) {
    use holdpoint::journal::{
        Append, EventKind, NewRun, Position, RunId, Seq, SledOptions, SledStore, Store,
    };
    let options = SledOptions {
        pack_commits: layout == Layout::Packed,
        ..SledOptions::default()
    };
    let store = SledStore::open_with(dir, options).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let new = NewRun {
            id: RunId::new(),
            started_by: None,
            workflow: "w".into(),
            version: 1,
            input: json!(null),
            idempotency_key: None,
            at: chrono::Utc::now(),
        };
        runs.push(store.create_run(new).await.unwrap().run());
    }
    let mut next = 1;
    while next < events {
        let n = (events - next).min(500);
        let batch = (0..n)
            .map(|i| EventKind::StepCompleted {
                position: Position((next + i) as u32),
                output: json!({"n": next + i, "note": "an ordinary step output"}),
            })
            .collect();
        let append = Append {
            run: runs[0],
            expected: Seq(next),
            at: chrono::Utc::now(),
            events: batch,
            lease: None,
        };
        store.append(append).await.unwrap().unwrap();
        next += n;
    }
    store.close().unwrap();
    (runs[0], runs[1])
}

/// How a store writes a commit of several events: one value (the default), or a record
/// per key (builds before packed commits; tests that tamper with single records' keys
/// use it, and every build reads it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Packed,
    RecordPerKey,
}

/// Where the record of `run` at `seq` is in a raw `events` tree: the key of the value
/// holding it (alone, or in a packed commit under the commit's first seq), that value's
/// records in order, and which of them it is.
pub fn held_record(
    events: &sled::Tree,
    run: holdpoint::journal::RunId,
    seq: u64,
) -> Option<(sled::IVec, Vec<Vec<u8>>, usize)> {
    use holdpoint::journal::{codec, Seq};
    let (key, value) = events
        .range(event_key(run, 0)..=event_key(run, seq))
        .next_back()?
        .unwrap();
    let first = u64::from_be_bytes(key[16..24].try_into().unwrap());
    let ranges = codec::unpack(run, Seq(first), &value).unwrap();
    let i = ranges.iter().position(|(s, _)| s.0 == seq)?;
    let records = ranges.into_iter().map(|(_, r)| value[r].to_vec()).collect();
    Some((key, records, i))
}

/// Applies `f` to the record of `run` at `seq` in a raw `events` tree, in place: alone,
/// or inside its packed commit (framed again around the edited record).
pub fn edit_record(
    events: &sled::Tree,
    run: holdpoint::journal::RunId,
    seq: u64,
    f: impl FnOnce(&mut Vec<u8>),
) {
    let (key, mut records, i) = held_record(events, run, seq).expect("the record exists");
    f(&mut records[i]);
    events
        .insert(key, holdpoint::journal::codec::pack(records))
        .unwrap();
}

/// The raw key of a run's event in the `events` tree.
pub fn event_key(run: holdpoint::journal::RunId, seq: u64) -> Vec<u8> {
    let mut k = run.as_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Spawns `cmd` (the binary under test) with stdout piped and returns once it printed its
/// first line (it is ready then), with that line; the rest of its output is drained so it
/// never blocks on a full pipe.
pub fn spawn_ready(cmd: &mut std::process::Command) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("the process printed nothing").unwrap();
    std::thread::spawn(move || for _ in lines {});
    (child, first)
}

/// The `http://` address a server's first line names.
pub fn url_in(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no url in {line:?}"))
        .to_string()
}

/// An approval gate at position `p` on `send_money` (journal level).
pub fn gate_with(p: u32, deadline: Option<chrono::DateTime<chrono::Utc>>, rule: Option<&str>) -> EventKind {
    EventKind::ApprovalRequested {
        gate: GateId(p),
        kind: GateKind::Approval,
        action: "send_money".into(),
        args: json!({"amount": p}),
        context: json!(null),
        reason: "test".into(),
        allowed: vec![DecisionKind::Approve, DecisionKind::Reject],
        deadline,
        rule: rule.map(str::to_string),
        spec: None,
    }
}

/// An approve decision of gate `p` by `by` (journal level).
pub fn approve(p: u32, by: &str) -> EventKind {
    EventKind::DecisionRecorded {
        gate: GateId(p),
        decision: Decision::Approve,
        by: Principal::new(by),
        comment: None,
        idempotency_key: None,
        request_hash: None,
    }
}

/// The creation the crash tests' child makes (`commit_recovery`, `wal_recovery`): a run
/// of `pay` with the idempotency key `k1`.
pub fn the_creation() -> holdpoint::journal::NewRun {
    holdpoint::journal::NewRun {
        id: holdpoint::journal::RunId::new(),
        started_by: None,
        workflow: "pay".into(),
        version: 1,
        input: json!({}),
        idempotency_key: Some("k1".into()),
        at: chrono::Utc::now(),
    }
}

/// The crash tests' child: one run ([`the_creation`]), a gate with a deadline under
/// the rule `payments`, its decision, then two gates in one commit: four commits. A
/// failpoint stops it at the `n`-th commit that passes it.
pub async fn write_four_commits(store: &SledStore) {
    use holdpoint::journal::{Append, Seq, Store};
    let run = store.create_run(the_creation()).await.unwrap().run();
    let deadline = chrono::Utc::now() + chrono::Duration::hours(1);
    for (expected, events) in [
        (1, vec![gate_with(0, Some(deadline), Some("payments"))]),
        (2, vec![approve(0, "alice")]),
        (3, vec![gate_with(1, None, None), gate_with(2, None, None)]),
    ] {
        store
            .append(Append {
                run,
                expected: Seq(expected),
                at: chrono::Utc::now(),
                events,
                lease: None,
            })
            .await
            .unwrap()
            .unwrap();
    }
    println!("no crash");
}

/// Runs the test `test` of this binary as a child (`dir` in its environment as
/// `child_var`, and `env`) until the failpoint `point` aborts it at its `pass`-th pass.
pub fn crash_child(
    child_var: &str,
    dir: &std::path::Path,
    test: &str,
    point: &str,
    pass: u32,
    env: &[(&str, &str)],
) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", test, "--nocapture"])
        .env(child_var, dir)
        .env("HOLDPOINT_FAILPOINT", format!("{point}:{pass}"))
        .envs(env.iter().copied());
    let out = child.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("failpoint {point}")),
        "the child was to abort at the failpoint: {stderr}"
    );
}

/// The notifications queued for the endpoint `ops`, as `type@seq`.
pub async fn queued(store: &SledStore) -> Vec<String> {
    use holdpoint::journal::Store;
    store
        .outbox("ops", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|o| format!("{}@{}", o.notification.kind.as_str(), o.notification.seq.0))
        .collect()
}

/// Claims with a new worker and checks that the one ready run is `run`; its lease.
pub async fn claim_only(store: &SledStore, run: holdpoint::journal::RunId) -> holdpoint::journal::Lease {
    use holdpoint::journal::Store;
    let leases = store
        .claim(
            holdpoint::journal::WorkerId::new(),
            chrono::Utc::now(),
            std::time::Duration::from_secs(30),
            10,
        )
        .await
        .unwrap();
    assert_eq!(leases.iter().map(|l| l.run).collect::<Vec<_>>(), [run]);
    leases.into_iter().next().unwrap()
}
