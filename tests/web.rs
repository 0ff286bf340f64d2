//! The web inbox over plain HTTP (no browser): redirects, the sign-in cookie's
//! attributes, security headers, CSRF and cross-site refusals, filters, and decisions
//! recorded as the signed-in principal. The browser tests (`tests/browser.rs`) cover
//! what needs a real browser: scripts, live updates, XSS.

mod common;

use holdpoint::journal::{Decision, EventKind, RunId, RunStatus, SledStore};
use holdpoint::server::{roles, Caller, Tokens};
use holdpoint::workflows::Tools;
use holdpoint::{Engine, Registry};
use serde_json::json;

const ALICE: &str = "alice-token-0123456789abcdef";

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request, redirects not followed.
async fn call(
    url: String,
    method: &'static str,
    headers: Vec<(&'static str, String)>,
    form: Option<String>,
) -> Resp {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        let resp = if method == "GET" {
            let mut r = agent.get(&url);
            for (k, v) in &headers {
                r = r.header(*k, v);
            }
            r.call()
        } else {
            let mut r = agent
                .post(&url)
                .header("Content-Type", "application/x-www-form-urlencoded");
            for (k, v) in &headers {
                r = r.header(*k, v);
            }
            r.send(form.unwrap_or_default())
        };
        let mut resp = resp.unwrap();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        Resp {
            status: resp.status().as_u16(),
            headers,
            body: resp.body_mut().read_to_string().unwrap_or_default(),
        }
    })
    .await
    .unwrap()
}

struct App {
    url: String,
    engine: Engine<SledStore>,
    _server: common::Server,
    _workers: holdpoint::Workers,
    _dir: tempfile::TempDir,
}

async fn app() -> App {
    let dir = tempfile::tempdir().unwrap();
    let tools = Tools::new(dir.path().join("tools"));
    let engine = Engine::new(
        SledStore::open(dir.path().join("journal")).unwrap(),
        tools.register(Registry::new()),
    )
    .unwrap();
    let workers = engine.spawn_workers();
    let mut tokens = Tokens::default();
    tokens
        .add(ALICE, Caller::new("alice", &[roles::REVIEWER]))
        .unwrap();
    let server = common::serve(engine.clone(), tokens).await;
    App {
        url: server.url.clone(),
        engine,
        _server: server,
        _workers: workers,
        _dir: dir,
    }
}

impl App {
    async fn refund(&self, order: &str) -> RunId {
        let run = self
            .engine
            .start(
                "refund",
                &json!({"order_id": order, "amount_cents": 30_000, "reason": "broken"}),
                None,
            )
            .await
            .unwrap();
        assert_eq!(self.engine.settled(run).await.unwrap().status, RunStatus::Waiting);
        run
    }
    async fn get(&self, path: &str) -> Resp {
        call(format!("{}{path}", self.url), "GET", vec![cookie()], None).await
    }
    async fn post(&self, path: &str, headers: Vec<(&'static str, String)>, form: String) -> Resp {
        let mut h = vec![cookie()];
        h.extend(headers);
        call(format!("{}{path}", self.url), "POST", h, Some(form)).await
    }
}

fn cookie() -> (&'static str, String) {
    ("Cookie", format!("holdpoint_token={ALICE}"))
}

/// The page's CSRF token (every form carries it).
fn csrf(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    page[at..at + 64].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_sets_a_strict_http_only_cookie_and_pages_need_it() {
    let app = app().await;
    let r = call(format!("{}/", app.url), "GET", vec![], None).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/signin?next=/")));
    let r = call(format!("{}/runs/x/gates/1", app.url), "GET", vec![], None).await;
    assert_eq!(r.header("location"), Some("/signin?next=/runs/x/gates/1"));

    let bad = call(
        format!("{}/signin", app.url),
        "POST",
        vec![],
        Some("token=nope&next=/".into()),
    )
    .await;
    assert_eq!(bad.status, 401);
    assert!(bad.body.contains("unknown token") && bad.header("set-cookie").is_none());

    // A hostile `next` is not followed off the site.
    let ok = call(
        format!("{}/signin", app.url),
        "POST",
        vec![],
        Some(format!("token={ALICE}&next=%2F%2Fevil.example%2F")),
    )
    .await;
    assert_eq!((ok.status, ok.header("location")), (303, Some("/")));
    let set = ok.header("set-cookie").unwrap();
    for attr in [
        "holdpoint_token=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=43200",
    ] {
        assert!(set.contains(attr), "{set}");
    }

    let page = app.get("/").await;
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert!(page.body.contains("signed in as <strong>alice</strong>"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_the_csrf_token_or_from_another_site_are_refused_and_record_nothing() {
    let app = app().await;
    let run = app.refund("E-1").await;
    let gate = app.engine.pending(None, 1).await.unwrap()[0].gate;
    let path = format!("/runs/{run}/gates/{gate}");
    let page = app.get(&path).await;
    assert_eq!(page.status, 200);
    let token = csrf(&page.body);
    let approve = |csrf: &str| format!("csrf={csrf}&kind=approve&comment=ok");

    for (headers, form) in [
        (vec![], approve("0".repeat(64).as_str())),
        (vec![], "kind=approve".to_string()),
        (
            vec![("Origin", "http://evil.example".to_string())],
            approve(&token),
        ),
        (
            vec![("Sec-Fetch-Site", "cross-site".to_string())],
            approve(&token),
        ),
    ] {
        let r = app.post(&path, headers, form.clone()).await;
        assert!(r.status == 403 || r.status == 422, "{form}: {}", r.status);
    }
    let decided = |events: &[holdpoint::journal::Event]| {
        events
            .iter()
            .filter_map(|e| match &e.event {
                EventKind::DecisionRecorded {
                    decision,
                    by,
                    comment,
                    ..
                } => Some((decision.clone(), by.to_string(), comment.clone())),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert!(decided(&app.engine.events(run).await.unwrap()).is_empty());

    // Same-origin, with the token: recorded as the signed-in principal.
    let origin = ("Origin", app.url.clone());
    let r = app.post(&path, vec![origin], approve(&token)).await;
    assert_eq!(
        (r.status, r.header("location")),
        (303, Some(format!("{path}?done=recorded").as_str()))
    );
    assert_eq!(
        decided(&app.engine.events(run).await.unwrap()),
        vec![(Decision::Approve, "alice".to_string(), Some("ok".to_string()))]
    );
    // A second decision is a conflict, shown with the recorded one.
    let r = app
        .post(&path, vec![], format!("csrf={token}&kind=reject&reason=late"))
        .await;
    assert_eq!(r.status, 409);
    assert!(
        r.body.contains("Someone else decided first: approve by alice"),
        "{}",
        r.body
    );
    // Sign-out needs the token too.
    let r = app.post("/signout", vec![], "csrf=wrong".into()).await;
    assert_eq!(r.status, 403);
    let r = app.post("/signout", vec![], format!("csrf={token}")).await;
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_filters_by_workflow_and_action_and_unknown_pages_are_404() {
    let app = app().await;
    let older = app.refund("F-1").await;
    let newer = app.refund("F-2").await;
    let page = app.get("/").await.body;
    let (a, b) = (
        page.find(&newer.to_string()).unwrap(),
        page.find(&older.to_string()).unwrap(),
    );
    assert!(a < b, "newest first");
    let only = app.get("/inbox/list?workflow=refund&action=send_money").await;
    assert_eq!(only.body.matches("<tr class=\"gate\"").count(), 2);
    let none = app.get("/inbox/list?workflow=customer_email").await;
    assert!(none.body.contains("Nothing waits"), "{}", none.body);
    let none = app.get("/?action=delete_rows").await;
    assert!(none.body.contains("Nothing waits"));

    assert_eq!(app.get("/runs/not-a-run").await.status, 404);
    assert_eq!(app.get(&format!("/runs/{}", RunId::new())).await.status, 404);
    assert_eq!(app.get(&format!("/runs/{older}/gates/99")).await.status, 404);
    let run_page = app.get(&format!("/runs/{older}")).await;
    assert!(run_page.body.contains("send_money") && run_page.body.contains("No decisions yet"));
    // The event stream needs a session.
    let r = call(format!("{}/inbox/events", app.url), "GET", vec![], None).await;
    assert_eq!(r.status, 401);
}
