//! The web inbox in a real browser: Debian's chromium, headless, driven through
//! chromedriver (WebDriver). These tests fail, never skip, when the browser is missing:
//! `.ci/run` installs `chromium` and `chromium-driver`.
//!
//! Waits are WebDriver's explicit waits (a condition polled until it holds), and the
//! engine's own notifications (`settled`); nothing sleeps.

mod common;

use fantoccini::{Client, ClientBuilder, Locator};
use holdpoint::journal::{Decision, EventKind, RunId, RunStatus, SledStore};
use holdpoint::server::{roles, Caller, Tokens};
use holdpoint::workflows::Tools;
use holdpoint::{Ctx, Engine, Failure, Gated, Registry};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const ALICE: &str = "alice-token-0123456789abcdef";
const BOB: &str = "bob-token-0123456789abcdef";
const VIEWER: &str = "viewer-token-0123456789abcdef";

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromedriver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start chromedriver ({e}): the browser tests need Debian's chromium and \
                 chromium-driver (apt-get install chromium chromium-driver); .ci/run installs them"
            )
        });
    // chromedriver says when it listens: wait for that line, not for time to pass.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "chromedriver exited before it started listening");
        if line.contains("started successfully") {
            break;
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn browser(driver: &Driver) -> Client {
    let chromium = std::env::var("HOLDPOINT_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: apt-get install chromium chromium-driver"
    );
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--window-size=1280,1000"]
        }
    });
    let Value::Object(caps) = caps else { unreachable!() };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("chromium starts under chromedriver")
}

/// The example agents and a test workflow whose gate shows whatever it is given.
struct App {
    url: String,
    engine: Engine<SledStore>,
    tools: Tools,
    _server: common::Server,
    _workers: holdpoint::Workers,
    _dir: tempfile::TempDir,
}

async fn show(ctx: Ctx, input: Value) -> Result<String, Failure> {
    match ctx
        .gate("send_money", input["args"].clone(), input["context"].clone())
        .await?
    {
        Gated::Approved { .. } | Gated::Edited { .. } => Ok("approved".into()),
        Gated::Rejected { reason, .. } => Ok(reason),
    }
}

async fn app() -> App {
    let dir = tempfile::tempdir().unwrap();
    let tools = Tools::new(dir.path().join("tools"));
    let registry = tools.register(Registry::new()).workflow("show", 1, show);
    let engine = Engine::new(SledStore::open(dir.path().join("journal")).unwrap(), registry).unwrap();
    let workers = engine.spawn_workers();
    let mut tokens = Tokens::default();
    tokens
        .add(ALICE, Caller::new("alice", &[roles::REVIEWER]))
        .unwrap();
    tokens.add(BOB, Caller::new("bob", &[roles::REVIEWER])).unwrap();
    tokens.add(VIEWER, Caller::new("vera", &[roles::VIEWER])).unwrap();
    let server = common::serve(engine.clone(), tokens).await;
    App {
        url: server.url.clone(),
        engine,
        tools,
        _server: server,
        _workers: workers,
        _dir: dir,
    }
}

impl App {
    async fn refund(&self, order: &str, cents: u64) -> RunId {
        let run = self
            .engine
            .start(
                "refund",
                &json!({"order_id": order, "amount_cents": cents, "reason": "arrived damaged"}),
                None,
            )
            .await
            .unwrap();
        assert_eq!(self.engine.settled(run).await.unwrap().status, RunStatus::Waiting);
        run
    }
}

async fn sign_in(c: &Client, app: &App, token: &str) {
    c.goto(&format!("{}/", app.url)).await.unwrap();
    // Not signed in: the inbox sends us to the sign-in page.
    assert!(c.current_url().await.unwrap().path().starts_with("/signin"));
    type_into(c, "#token", token).await;
    click(c, "main form button[type=submit]").await;
    c.wait()
        .for_element(Locator::Css("#pending"))
        .await
        .expect("signed in, the inbox shows");
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css)).await.unwrap().click().await.unwrap();
}

async fn type_into(c: &Client, css: &str, text: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

async fn open_gate(c: &Client, app: &App, run: RunId) {
    c.goto(&format!("{}/runs/{run}/gates/1", app.url)).await.unwrap();
    c.wait().for_element(Locator::Css("h1")).await.unwrap();
}

fn screenshot_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn decisions(events: &[holdpoint::journal::Event]) -> Vec<(Decision, String)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            EventKind::DecisionRecorded { decision, by, .. } => Some((decision.clone(), by.to_string())),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_edit_with_an_invalid_then_a_valid_attempt_and_the_run_pays_the_edited_amount() {
    let app = app().await;
    let run = app.refund("A-1001", 25_000).await;
    let driver = chromedriver();
    let c = browser(&driver).await;
    sign_in(&c, &app, ALICE).await;

    // The pending gate from the refund agent, with why it asks.
    let row = format!("tr.gate[data-run='{run}']");
    c.wait().for_element(Locator::Css(&row)).await.unwrap();
    let listed = text_of(&c, &row).await;
    assert!(
        listed.contains("send_money") && listed.contains("refund"),
        "{listed}"
    );
    assert_eq!(
        c.find(Locator::Css(&row))
            .await
            .unwrap()
            .attr("data-actionable")
            .await
            .unwrap()
            .as_deref(),
        Some("true")
    );
    std::fs::write(screenshot_dir().join("inbox.png"), c.screenshot().await.unwrap()).unwrap();

    click(&c, &format!("{row} a.button")).await;
    c.wait().for_element(Locator::Css("#edit-form")).await.unwrap();
    let gate_url = c.current_url().await.unwrap();
    assert!(text_of(&c, "#args").await.contains("customer-of-A-1001"));
    assert!(text_of(&c, "#context").await.contains("requested_cents"));
    std::fs::write(screenshot_dir().join("gate.png"), c.screenshot().await.unwrap()).unwrap();

    // Attempt 1: not JSON. The page says so before anything is sent.
    let area = c.find(Locator::Css("#edit-args")).await.unwrap();
    area.clear().await.unwrap();
    area.send_keys("{\"to\": \"x\", oops").await.unwrap();
    click(&c, "#edit-form button[type=submit]").await;
    let shown = text_of(&c, "#edit-error").await;
    assert!(shown.contains("Not valid JSON"), "inline error: {shown:?}");
    assert_eq!(c.current_url().await.unwrap(), gate_url, "nothing was submitted");

    // Attempt 2: JSON, but not a payment: the server's 422 is shown, nothing recorded.
    let area = c.find(Locator::Css("#edit-args")).await.unwrap();
    area.clear().await.unwrap();
    area.send_keys("{\"to\": 5}").await.unwrap();
    click(&c, "#edit-form button[type=submit]").await;
    let refused = c
        .wait()
        .for_element(Locator::Css("#decision-error"))
        .await
        .unwrap();
    let refused = refused.text().await.unwrap();
    assert!(
        refused.contains("send_money"),
        "the server's error is shown: {refused}"
    );
    assert!(decisions(&app.engine.events(run).await.unwrap()).is_empty());

    // Attempt 3: a valid edit.
    let edited = json!({"to": "customer-of-A-1001", "amount_cents": 1234, "memo": "edited in the browser"});
    let area = c.find(Locator::Css("#edit-args")).await.unwrap();
    area.clear().await.unwrap();
    area.send_keys(&edited.to_string()).await.unwrap();
    type_into(&c, "#edit-form input[name=comment]", "half is fair").await;
    click(&c, "#edit-form button[type=submit]").await;
    c.wait().for_element(Locator::Css("#recorded")).await.unwrap();
    assert!(text_of(&c, "#recorded").await.contains("edit by alice"));

    // The run completes with the edited args: in the journal and in the ledger.
    let done = app.engine.settled(run).await.unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    let events = app.engine.events(run).await.unwrap();
    assert_eq!(
        decisions(&events),
        vec![(Decision::Edit { args: edited.clone() }, "alice".to_string())]
    );
    let paid = app.tools.ledger.entries().unwrap();
    assert_eq!(paid.len(), 1);
    assert_eq!(
        (paid[0].amount_cents, paid[0].memo.as_str()),
        (1234, "edited in the browser")
    );

    // The run page shows who decided what, with the comment.
    c.goto(&format!("{}/runs/{run}", app.url)).await.unwrap();
    let who = text_of(&c, "table.decisions").await;
    assert!(
        who.contains("edit") && who.contains("alice") && who.contains("half is fair"),
        "{who}"
    );
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_with_a_reason_approve_and_a_second_session_sees_the_conflict() {
    let app = app().await;
    let to_reject = app.refund("B-1", 30_000).await;
    let to_approve = app.refund("B-2", 30_000).await;
    let driver = chromedriver();
    let alice = browser(&driver).await;
    let bob = browser(&driver).await;
    sign_in(&alice, &app, ALICE).await;
    sign_in(&bob, &app, BOB).await;

    // Reject: the reason is required (the browser refuses an empty one), then recorded.
    open_gate(&alice, &app, to_reject).await;
    click(&alice, "#reject-form button[type=submit]").await;
    assert!(decisions(&app.engine.events(to_reject).await.unwrap()).is_empty());
    type_into(&alice, "#reject-reason", "the customer already got a voucher").await;
    click(&alice, "#reject-form button[type=submit]").await;
    alice.wait().for_element(Locator::Css("#recorded")).await.unwrap();
    assert_eq!(
        decisions(&app.engine.events(to_reject).await.unwrap()),
        vec![(
            Decision::Reject {
                reason: "the customer already got a voucher".into()
            },
            "alice".to_string()
        )]
    );

    // Both open the same gate; Alice approves first; Bob's reject finds her decision.
    open_gate(&alice, &app, to_approve).await;
    open_gate(&bob, &app, to_approve).await;
    click(&alice, "#approve-form button[type=submit]").await;
    alice.wait().for_element(Locator::Css("#recorded")).await.unwrap();
    type_into(&bob, "#reject-reason", "no").await;
    click(&bob, "#reject-form button[type=submit]").await;
    let conflict = bob
        .wait()
        .for_element(Locator::Css("#decision-error"))
        .await
        .unwrap();
    let conflict = conflict.text().await.unwrap();
    assert!(
        conflict.contains("Someone else decided first") && conflict.contains("approve by alice"),
        "{conflict}"
    );
    assert!(text_of(&bob, "#recorded").await.contains("approve by alice"));
    assert_eq!(
        app.engine.settled(to_approve).await.unwrap().status,
        RunStatus::Completed
    );
    assert_eq!(
        decisions(&app.engine.events(to_approve).await.unwrap()),
        vec![(Decision::Approve, "alice".to_string())],
        "one decision: Bob's was refused"
    );
    alice.close().await.unwrap();
    bob.close().await.unwrap();
}

/// OWASP XSS filter-evasion payloads, each of which would set a marker if it ran.
const XSS: &[&str] = &[
    "<script>window.__xss=1</script>",
    "<img src=x onerror=\"window.__xss=1\">",
    "<svg onload=window.__xss=1>",
    "\"><script>window.__xss=1</script>",
    "'><img src=x onerror=window.__xss=1>",
    "</textarea><script>window.__xss=1</script>",
    "</pre><img src=x onerror=window.__xss=1>",
    "</title><script>window.__xss=1</script>",
    "<iframe src=\"javascript:parent.__xss=1\"></iframe>",
    "<body onload=window.__xss=1>",
    "<details open ontoggle=window.__xss=1>",
    "<input autofocus onfocus=window.__xss=1>",
    "<video><source onerror=\"window.__xss=1\">",
    "<math><mtext></p><img src=x onerror=window.__xss=1>",
    "<scr<script>ipt>window.__xss=1</scr</script>ipt>",
    "<IMG SRC=&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;window.__xss=1>",
    "<object data=\"data:text/html,<script>parent.__xss=1</script>\"></object>",
    "<style>@import 'javascript:window.__xss=1';</style>",
    "javascript:window.__xss=1",
    "<a href=\"javascript:window.__xss=1\" id=xss-link>x</a>",
    "\u{202e}<script>window.__xss=1</script>",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xss_corpus_in_args_and_context_renders_as_text_and_runs_nothing() {
    let app = app().await;
    let args: serde_json::Map<String, Value> = XSS
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("{p}{i}"), json!(p)))
        .collect();
    let run = app
        .engine
        .start(
            "show",
            &json!({"args": args, "context": {"note": XSS, "title": XSS[7]}}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(app.engine.settled(run).await.unwrap().status, RunStatus::Waiting);
    let gate = app.engine.pending(None, 10).await.unwrap()[0].gate;
    let driver = chromedriver();
    let c = browser(&driver).await;
    sign_in(&c, &app, ALICE).await;
    for page in [
        "/".to_string(),
        format!("/runs/{run}/gates/{gate}"),
        format!("/runs/{run}"),
    ] {
        c.goto(&format!("{}{page}", app.url)).await.unwrap();
        c.wait().for_element(Locator::Css("main")).await.unwrap();
        let probe = c
            .execute(
                "return [window.__xss === undefined, document.querySelectorAll('script').length, \
                 document.querySelectorAll('img, svg, iframe, object, video, details, math, style, a#xss-link, input[autofocus]').length, \
                 document.body.innerText];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(probe[0], json!(true), "a payload ran on {page}");
        assert_eq!(probe[1], json!(1), "only the inbox's own script on {page}");
        assert_eq!(probe[2], json!(0), "no payload became an element on {page}");
        let text = probe[3].as_str().unwrap();
        if page != "/" {
            // Rendered, as text.
            assert!(text.contains("<script>window.__xss=1</script>"), "{page}: {text}");
            assert!(text.contains("</textarea><script>"), "{page}");
        }
    }
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_list_updates_live_when_a_gate_opens_and_closes() {
    let app = app().await;
    let first = app.refund("C-1", 30_000).await;
    let driver = chromedriver();
    let c = browser(&driver).await;
    sign_in(&c, &app, ALICE).await;
    c.wait()
        .for_element(Locator::Css("#pending[data-live='1']"))
        .await
        .expect("the event stream connects");
    // A marker that a reload would wipe.
    c.execute("window.__same_page = 42;", vec![]).await.unwrap();

    let second = app.refund("C-2", 30_000).await;
    c.wait()
        .for_element(Locator::Css(&format!("tr.gate[data-run='{second}']")))
        .await
        .expect("the new gate appears without a reload");

    app.engine
        .decide(
            first,
            holdpoint::DecisionRequest::approve(
                holdpoint::journal::GateId(1),
                holdpoint::journal::Principal::new("bob"),
            ),
        )
        .await
        .unwrap();
    let gone = format!("tr.gate[data-run='{first}']");
    c.wait()
        .for_element(Locator::XPath(&format!(
            "//div[@id='pending'][not(.//tr[@data-run='{first}'])]"
        )))
        .await
        .expect("the decided gate leaves the list");
    assert!(c.find(Locator::Css(&gone)).await.is_err());
    let probe = c
        .execute(
            "return [window.__same_page, Number(document.getElementById('pending').dataset.updates)];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(probe[0], json!(42), "the page was not reloaded");
    assert!(probe[1].as_u64().unwrap() >= 2, "{probe}");
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_gates_read_only_and_cannot_decide() {
    let app = app().await;
    let run = app.refund("D-1", 30_000).await;
    let driver = chromedriver();
    let c = browser(&driver).await;
    sign_in(&c, &app, VIEWER).await;
    let row = format!("tr.gate[data-run='{run}']");
    c.wait().for_element(Locator::Css(&row)).await.unwrap();
    assert!(text_of(&c, &row).await.contains("read-only"));
    open_gate(&c, &app, run).await;
    assert!(c.find(Locator::Css("#approve-form")).await.is_err());
    assert!(text_of(&c, "p.readonly").await.contains("only view"));
    // Sign out: the inbox asks for a token again.
    click(&c, "header form button").await;
    c.wait().for_element(Locator::Css("#token")).await.unwrap();
    c.goto(&format!("{}/", app.url)).await.unwrap();
    assert!(c.current_url().await.unwrap().path().starts_with("/signin"));
    c.close().await.unwrap();
}
