//! End to end: the real `holdpoint` binary on a free loopback port with a temp data
//! directory; decisions through the CLI; effects observed in the agents' tools.

mod common;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_holdpoint");
const ADMIN: &str = "admin-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";

struct Server {
    child: Child,
    url: String,
    data: PathBuf,
}

impl Server {
    fn start(data: &Path) -> Server {
        Self::start_with(data, &[])
    }

    fn start_with(data: &Path, extra: &[&std::ffi::OsStr]) -> Server {
        let tokens = data.parent().unwrap().join("tokens.toml");
        std::fs::write(
            &tokens,
            format!(
                r#"
[[tokens]]
token = "{ADMIN}"
principal = "ana"
role = "admin"
[[tokens]]
token = "{VIEWER}"
principal = "val"
role = "viewer"
[[tokens]]
token = "{OPERATOR}"
principal = "agent-host"
role = "operator"
"#
            ),
        )
        .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--body-limit",
            "65536",
            "--data",
        ])
        .arg(data)
        .arg("--tokens")
        .arg(&tokens)
        .args(extra)
        .env("HOLDPOINT_LOG", "warn");
        let (child, first) = common::spawn_ready(&mut cmd);
        Server {
            child,
            url: common::url_in(&first),
            data: data.to_path_buf(),
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn hp(&self, args: &[&str]) -> Output {
        self.hp_as(ADMIN, args)
    }

    fn hp_as(&self, token: &str, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("HOLDPOINT_SERVER", &self.url)
            .env("HOLDPOINT_TOKEN", token)
            .output()
            .unwrap()
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.hp(args);
        assert!(
            out.status.success(),
            "holdpoint {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// Starts a run as the agent host (operator token) and waits for it to settle.
    fn start_run(&self, workflow: &str, input: Value) -> String {
        let out = self.hp_as(
            OPERATOR,
            &["start", workflow, "--input", &input.to_string(), "--json"],
        );
        assert!(out.status.success(), "start failed: {}", stderr(&out));
        let out: Value = serde_json::from_str(&stdout(&out)).unwrap();
        let run = out["run"].as_str().unwrap().to_string();
        self.ok(&["wait", &run]);
        run
    }

    fn tools(&self) -> PathBuf {
        self.data.join("tools")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The payments made: the log a person reads, checked against the ledger's record.
fn ledger(server: &Server) -> Vec<Value> {
    let path = server.tools().join("ledger.jsonl");
    let log: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let record = holdpoint::workflows::Ledger::new(&path).entries().unwrap();
    assert_eq!(log.len(), record.len(), "the log and the payment files agree");
    log
}

#[test]
fn approve_edit_reject_respond_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"));

    // Approve: the refund is paid as proposed.
    let refund = s.start_run(
        "refund",
        json!({"order_id": "R-1", "amount_cents": 20000, "reason": "broken"}),
    );
    assert!(s.ok(&["pending"]).contains(&refund));
    assert!(ledger(&s).is_empty());
    let out = s.ok(&["approve", &refund, "--comment", "photos checked"]);
    assert!(out.contains("recorded: approve"), "{out}");
    s.ok(&["wait", &refund]);
    let paid = ledger(&s);
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0]["amount_cents"], 20000);
    let shown = s.ok(&["show", &refund]);
    assert!(shown.contains("APPROVED by ana — photos checked"), "{shown}");
    assert!(shown.contains("COMPLETED"), "{shown}");

    // Edit: the email actually sent is the edited one.
    let email = s.start_run(
        "customer_email",
        json!({"customer": "Dana", "email": "dana@example.com", "complaint": "late"}),
    );
    let edited = json!({"to": "dana@example.com", "subject": "Sorry", "body": "Edited by a person."});
    s.ok(&["edit", &email, "--args", &edited.to_string()]);
    s.ok(&["wait", &email]);
    let outbox: Vec<_> = std::fs::read_dir(s.tools().join("outbox")).unwrap().collect();
    assert_eq!(outbox.len(), 1);
    let sent: Value =
        serde_json::from_slice(&std::fs::read(outbox[0].as_ref().unwrap().path()).unwrap()).unwrap();
    assert_eq!(sent, edited);

    // Reject: not sent; the agent reports the reason.
    let email2 = s.start_run(
        "customer_email",
        json!({"customer": "Eli", "email": "eli@example.com", "complaint": "rude"}),
    );
    s.ok(&["reject", &email2, "--reason", "legal must review this"]);
    s.ok(&["wait", &email2]);
    assert_eq!(std::fs::read_dir(s.tools().join("outbox")).unwrap().count(), 1);
    let view = s.json(&["show", &email2, "--json"]);
    assert_eq!(view["run"]["state"]["output"]["reason"], "legal must review this");

    // Respond, then approve: the cleanup deletes exactly the approved rows.
    let cleanup = s.start_run("data_cleanup", json!({"table": "users", "older_than_days": 180}));
    let pending = s.json(&["pending", "--json"]);
    let question = pending
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["run"] == cleanup.as_str())
        .unwrap();
    assert_eq!(question["action"], "ask");
    s.ok(&["respond", &cleanup, "--input", r#"["user-05"]"#]);
    s.ok(&["wait", &cleanup]);
    let view = s.json(&["show", &cleanup, "--json"]);
    let gates = view["run"]["state"]["gates"].as_object().unwrap();
    let delete = gates.values().find(|g| g["action"] == "delete_data").unwrap();
    let ids: Vec<String> = serde_json::from_value(delete["args"]["ids"].clone()).unwrap();
    assert!(
        !ids.contains(&"user-05".to_string()),
        "kept row is not proposed: {ids:?}"
    );
    let before: Value =
        serde_json::from_slice(&std::fs::read(s.tools().join("records.json")).unwrap()).unwrap();
    s.ok(&["approve", &cleanup]);
    s.ok(&["wait", &cleanup]);
    let after: Value =
        serde_json::from_slice(&std::fs::read(s.tools().join("records.json")).unwrap()).unwrap();
    for id in &ids {
        assert!(
            before.get(id).is_some() && after.get(id).is_none(),
            "{id} deleted"
        );
    }
    assert!(after.get("user-05").is_some());
    assert_eq!(
        before.as_object().unwrap().len() - after.as_object().unwrap().len(),
        ids.len()
    );

    // Review workload per action.
    let stats = s.ok(&["stats"]);
    for action in ["send_money", "email_customer", "delete_data"] {
        assert!(stats.contains(action), "{stats}");
    }
    // Every run completed; runs --status filters.
    let completed = s.json(&["runs", "--status", "completed", "--json"]);
    assert_eq!(completed.as_array().unwrap().len(), 4);
}

#[test]
fn runs_survive_a_sigkill_of_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data);
    let mut runs = Vec::new();
    for i in 0..5 {
        runs.push(s.start_run(
            "refund",
            json!({"order_id": format!("K-{i}"), "amount_cents": 30000, "reason": "x"}),
        ));
    }
    s.ok(&["approve", &runs[0]]);
    s.kill9();

    let s = Server::start(&data);
    for run in &runs[1..] {
        s.ok(&["approve", run]);
    }
    for run in &runs {
        let out = s.ok(&["wait", run]);
        assert!(out.contains("completed"), "{out}");
    }
    let paid = ledger(&s);
    assert_eq!(paid.len(), 5, "{paid:?}");
    let keys: std::collections::BTreeSet<_> = paid.iter().map(|p| p["idempotency_key"].to_string()).collect();
    assert_eq!(keys.len(), 5, "each paid once");
}

#[test]
fn a_second_server_on_the_same_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _s = Server::start(&data);
    let out = Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("in use by another process"), "{err}");
    assert!(err.contains(&data.join("journal").display().to_string()), "{err}");
    // Offline commands refuse too.
    let out = Command::new(BIN)
        .args(["verify", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("in use by another process"));
}

#[test]
fn hostile_strings_are_shown_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"));
    let hostile = "Dana\u{1b}[2K\r\u{1b}[32mAPPROVED\u{7}\u{202e}moc.live\u{200b}";
    let run = s.start_run(
        "customer_email",
        json!({"customer": hostile, "email": "d@example.com", "complaint": hostile}),
    );
    for args in [vec!["pending"], vec!["show", run.as_str()], vec!["runs"]] {
        let out = s.ok(&args);
        for bad in ['\u{1b}', '\r', '\u{7}', '\u{202e}', '\u{200b}'] {
            assert!(!out.contains(bad), "{args:?} printed {bad:?} raw:\n{out}");
        }
        if args[0] != "runs" {
            assert!(
                out.contains("\\u{202e}") || out.contains("\\u202e"),
                "{args:?}: {out}"
            );
        }
    }
}

#[test]
fn exit_codes_and_offline_commands() {
    let out = Command::new(BIN).args(["approve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage error");
    let out = Command::new(BIN).args(["--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    for cmd in [
        "serve", "demo", "start", "runs", "show", "pending", "approve", "edit", "reject", "respond",
        "cancel", "verify", "export", "replay", "wait",
    ] {
        let out = Command::new(BIN).args([cmd, "--help"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{cmd} --help");
        assert!(stdout(&out).contains("Usage"), "{cmd}");
    }

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data);
    let run = s.start_run(
        "refund",
        json!({"order_id": "E-1", "amount_cents": 30000, "reason": "x"}),
    );
    // A closed pipe (`holdpoint runs | head -0`) ends the command quietly, not in a panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(["runs"])
        .env("HOLDPOINT_SERVER", &s.url)
        .env("HOLDPOINT_TOKEN", ADMIN)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    // Deciding a gate twice differently: exit 1 and the recorded decision named.
    s.ok(&["approve", &run, "1"]);
    let out = s.hp(&["reject", &run, "1", "--reason", "no"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already decided: approve by ana"),
        "{}",
        stderr(&out)
    );
    s.ok(&["wait", &run]);
    s.kill9();

    let data_arg = data.to_str().unwrap();
    let out = Command::new(BIN)
        .args(["verify", "--data", data_arg])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("verified 1 runs"), "{}", stdout(&out));
    let out = Command::new(BIN)
        .args(["export", &run, "--data", data_arg])
        .output()
        .unwrap();
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.first().unwrap()["event"]["type"], "run-started");
    assert_eq!(lines.last().unwrap()["event"]["type"], "run-completed");
    let out = Command::new(BIN)
        .args(["replay", &run, "--data", data_arg])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("matches its journal"));
    let out = Command::new(BIN)
        .args(["verify", "--head", "--data", data_arg])
        .output()
        .unwrap();
    assert!(stdout(&out).contains(&run));

    // Corrupt one byte of the journal: verify names the run and seq, exit 1.
    {
        let db = holdpoint::journal::sled_raw_config(data.join("journal"))
            .open()
            .unwrap();
        let events = db.open_tree("events").unwrap();
        let run_id: holdpoint::journal::RunId = run.parse().unwrap();
        common::edit_record(&events, run_id, 3, |record| {
            let n = record.len();
            record[n - 4] ^= 1;
        });
        db.flush().unwrap();
        drop(events);
        drop(db);
        let f = std::fs::File::open(data.join("journal").join("db")).unwrap();
        fs2::FileExt::lock_exclusive(&f).unwrap();
        fs2::FileExt::unlock(&f).unwrap();
    }
    let out = Command::new(BIN)
        .args(["verify", "--data", data_arg])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains(&format!("BAD {run}")), "{}", stdout(&out));
    assert!(stdout(&out).contains("seq 3"), "{}", stdout(&out));
}

/// Every error code of the API, each from a real request.
#[test]
fn http_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"));
    let run = s.start_run(
        "refund",
        json!({"order_id": "H-1", "amount_cents": 30000, "reason": "x"}),
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let call = |method: &str, path: &str, token: Option<&str>, body: Option<String>| -> (u16, Value) {
        let url = format!("{}{path}", s.url);
        let mut resp = match (method, body) {
            ("GET", _) => {
                let mut r = agent.get(&url);
                if let Some(t) = token {
                    r = r.header("Authorization", format!("Bearer {t}"));
                }
                r.call()
            }
            (_, body) => {
                let mut r = agent.post(&url).header("Content-Type", "application/json");
                if let Some(t) = token {
                    r = r.header("Authorization", format!("Bearer {t}"));
                }
                r.send(body.unwrap_or_default())
            }
        }
        .unwrap();
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    };
    let decision = format!("/v1/runs/{run}/gates/1/decision");
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_string();

    // 400: malformed JSON, wrong types, unknown fields, bad ids, JSON nested 10,000 deep.
    let (st, b) = call("POST", &decision, Some(ADMIN), Some("{not json".into()));
    assert_eq!((st, code(&b)), (400, "malformed".into()));
    let (st, _) = call("POST", &decision, Some(ADMIN), Some(r#"{"decision": 5}"#.into()));
    assert_eq!(st, 400);
    let (st, _) = call(
        "POST",
        &decision,
        Some(ADMIN),
        Some(r#"{"decision":{"kind":"approve"},"by":"mallory"}"#.into()),
    );
    assert_eq!(st, 400, "unknown fields (like a self-declared `by`) are refused");
    let (st, _) = call("GET", "/v1/runs/not-a-uuid", Some(ADMIN), None);
    assert_eq!(st, 400);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let (st, _) = call(
        "POST",
        "/v1/runs",
        Some(ADMIN),
        Some(format!(r#"{{"workflow":"refund","input":{deep}}}"#)),
    );
    assert_eq!(st, 400);
    // 401: missing, malformed, wrong token.
    let (st, b) = call("GET", "/v1/pending", None, None);
    assert_eq!((st, code(&b)), (401, "unauthorized".into()));
    let (st, _) = call("GET", "/v1/pending", Some("wrong-token-0123456789"), None);
    assert_eq!(st, 401);
    let resp = agent
        .get(format!("{}/v1/pending", s.url))
        .header("Authorization", "Basic abc")
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // 403: a viewer may not decide; an operator may not decide either.
    let approve = r#"{"decision":{"kind":"approve"}}"#.to_string();
    let (st, b) = call("POST", &decision, Some(VIEWER), Some(approve.clone()));
    assert_eq!((st, code(&b)), (403, "forbidden".into()));
    let (st, _) = call("POST", &decision, Some(OPERATOR), Some(approve.clone()));
    assert_eq!(st, 403);
    let (st, _) = call(
        "POST",
        "/v1/runs",
        Some(VIEWER),
        Some(r#"{"workflow":"refund","input":{}}"#.into()),
    );
    assert_eq!(st, 403);
    // 404: unknown run, gate, workflow.
    let (st, b) = call(
        "GET",
        &format!("/v1/runs/{}", uuid::Uuid::now_v7()),
        Some(ADMIN),
        None,
    );
    assert_eq!((st, code(&b)), (404, "not_found".into()));
    let (st, _) = call(
        "POST",
        &format!("/v1/runs/{run}/gates/77/decision"),
        Some(ADMIN),
        Some(approve.clone()),
    );
    assert_eq!(st, 404);
    let (st, _) = call(
        "POST",
        "/v1/runs",
        Some(ADMIN),
        Some(r#"{"workflow":"nope","input":{}}"#.into()),
    );
    assert_eq!(st, 404);
    // 422: edited args that do not fit; a decision kind the gate does not take.
    let (st, b) = call(
        "POST",
        &decision,
        Some(ADMIN),
        Some(r#"{"decision":{"kind":"edit","args":{"to":1}}}"#.into()),
    );
    assert_eq!((st, code(&b)), (422, "invalid".into()), "{b}");
    let (st, _) = call(
        "POST",
        &decision,
        Some(ADMIN),
        Some(r#"{"decision":{"kind":"respond","input":1}}"#.into()),
    );
    assert_eq!(st, 422);
    // 413: over the body limit (65,536 bytes in this test).
    let big = format!(
        r#"{{"decision":{{"kind":"reject","reason":"{}"}}}}"#,
        "x".repeat(70_000)
    );
    let (st, b) = call("POST", &decision, Some(ADMIN), Some(big));
    assert_eq!((st, code(&b)), (413, "too_large".into()));
    // 200, then a same-key retry gets the identical success, then 409 naming the winner.
    let keyed = r#"{"decision":{"kind":"approve"},"idempotency_key":"k-1"}"#.to_string();
    let (st, first) = call("POST", &decision, Some(ADMIN), Some(keyed.clone()));
    assert_eq!(st, 200);
    let (st, again) = call("POST", &decision, Some(ADMIN), Some(keyed));
    assert_eq!(st, 200);
    assert_eq!(first["decision"], again["decision"]);
    assert_eq!(again["recorded"], false);
    let (st, b) = call(
        "POST",
        &decision,
        Some(ADMIN),
        Some(r#"{"decision":{"kind":"reject","reason":"no"}}"#.into()),
    );
    assert_eq!((st, code(&b)), (409, "conflict".into()));
    assert_eq!(b["error"]["recorded"]["decision"]["kind"], "approve");
    assert_eq!(b["error"]["recorded"]["by"], "ana");
    // healthz needs no token; metrics report runs and decision latency.
    let (st, _) = call("GET", "/healthz", None, None);
    assert_eq!(st, 200);
    s.ok(&["wait", &run]);
    let mut resp = agent
        .get(format!("{}/metrics", s.url))
        .header("Authorization", format!("Bearer {VIEWER}"))
        .call()
        .unwrap();
    let text = resp.body_mut().read_to_string().unwrap();
    assert!(text.contains("holdpoint_runs{status=\"completed\"} 1"), "{text}");
    assert!(
        text.contains("holdpoint_decision_latency_seconds_count 1"),
        "{text}"
    );
    assert!(text.contains("holdpoint_pending_gates 0"), "{text}");
    // The server still serves after all that.
    assert_eq!(call("GET", "/healthz", None, None).0, 200);
}

/// A loopback webhook receiver on a fixed port, in its own runtime; deliveries arrive
/// on the channel as (headers, body).
fn hook_receiver(listener: std::net::TcpListener) -> std::sync::mpsc::Receiver<(String, String, Vec<u8>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let tx = tx.clone();
                    async move {
                        let h = |name: &str| headers[name].to_str().unwrap().to_string();
                        let _ = tx.send((h("holdpoint-signature"), h("holdpoint-delivery"), body.to_vec()));
                        "ok"
                    }
                }),
            );
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx
}

#[test]
fn a_webhook_queued_while_the_receiver_is_down_survives_a_sigkill_and_arrives_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A port with nothing listening yet: deliveries fail until the receiver starts.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = "webhook-secret-0123456789";
    let hooks = dir.path().join("webhooks.toml");
    std::fs::write(
        &hooks,
        format!(
            "public_url = \"https://review.example.com\"\n[[endpoints]]\nname = \"ops\"\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret = \"{secret}\"\n"
        ),
    )
    .unwrap();
    let args = [std::ffi::OsStr::new("--webhooks"), hooks.as_os_str()];
    let s = Server::start_with(&data, &args);
    let run = s.start_run(
        "refund",
        json!({"order_id": "W-1", "amount_cents": 30000, "reason": "x"}),
    );
    // The run is waiting and its notification queued; the receiver is down. Kill -9.
    s.kill9();

    let receiver = hook_receiver(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    let s = Server::start_with(&data, &args);
    let (signature, delivery, body) = receiver
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the queued notification is delivered after the restart");
    let now = chrono::Utc::now().timestamp();
    holdpoint::webhooks::verify_signature(
        secret,
        &signature,
        &body,
        now,
        std::time::Duration::from_secs(300),
    )
    .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "gate.opened");
    assert_eq!(v["run"], run.as_str());
    assert_eq!(delivery, v["id"].as_str().unwrap());
    assert!(
        v["link"]
            .as_str()
            .unwrap()
            .starts_with(&format!("https://review.example.com/runs/{run}/gates/")),
        "{v}"
    );
    // The decision is told too.
    s.ok(&["approve", &run]);
    let (_, _, body) = receiver.recv_timeout(std::time::Duration::from_secs(60)).unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["by"].as_str()),
        (Some("gate.decided"), Some("ana"))
    );
}
