//! The web inbox, served by `holdpoint serve` at `/`: what waits for the signed-in
//! reviewer, each gate with its context, and forms to decide.
//!
//! - **Server-rendered** (maud: every inserted value is HTML-escaped by construction), a
//!   small script for live updates and JSON checks; the approve/reject/respond/edit forms
//!   work without it.
//! - **Sign-in** with the API's bearer tokens: the token, once entered, is kept in an
//!   `HttpOnly; SameSite=Strict` cookie and checked on every request exactly as the API
//!   checks its `Authorization` header. Decisions go through [`Engine::decide`] with the
//!   signed-in principal and its roles, so the inbox can do nothing the API would refuse.
//! - **CSRF**: every form carries a token derived from the session's bearer token
//!   (SHA-256, compared in constant time); cross-site requests are refused by their
//!   `Sec-Fetch-Site`/`Origin` headers too; and the cookie is `SameSite=Strict`.
//! - **Headers**: a strict Content-Security-Policy (`script-src 'self'`, no inline
//!   script or style, `frame-ancestors 'none'`), `nosniff`, `Referrer-Policy: same-origin` (with `no-referrer` browsers send `Origin: null`, which the cross-site check must refuse), `no-store`.
//! - **Live**: `/inbox/events` is a server-sent event stream that says `pending` whenever
//!   the set of open gates changes; the script then fetches the list fragment again.

use crate::journal::{Decision, DecisionKind, EventKind, GateId, PendingGate, RunId, Seq, Store};
use crate::server::{roles, ApiError, AppState, Caller};
use crate::{Decided, DecisionRequest, Error};
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use holdpoint_engine::engine::roles_may_decide;
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use subtle::ConstantTimeEq;

/// The sign-in cookie's name.
pub const COOKIE: &str = "holdpoint_token";
/// How long a sign-in lasts.
const SESSION_HOURS: i64 = 12;
/// Open gates the inbox reads (from the index) before filtering and sorting.
const INBOX_SCAN: usize = 1000;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

/// The inbox's routes (they share the API's state).
pub fn routes<St: Store>() -> Router<AppState<St>> {
    Router::new()
        .route("/", get(inbox::<St>))
        .route("/inbox/list", get(inbox_list::<St>))
        .route("/inbox/events", get(inbox_events::<St>))
        .route("/signin", get(signin_page).post(signin::<St>))
        .route("/signout", post(signout::<St>))
        .route("/runs/{run}", get(run_page::<St>))
        .route(
            "/runs/{run}/gates/{gate}",
            get(gate_page::<St>).post(decide::<St>),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .layer(middleware::from_fn(security_headers))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// The signed-in reviewer.
struct Session {
    caller: Caller,
    csrf: String,
}

impl Session {
    fn may_decide(&self, gate: &PendingGate) -> Result<(), String> {
        if !self
            .caller
            .roles
            .iter()
            .any(|r| r != roles::VIEWER && r != roles::OPERATOR)
        {
            return Err("your roles may only view".into());
        }
        roles_may_decide(&gate.roles, &self.caller.roles)
    }
}

fn csrf_for(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"holdpoint-csrf\0");
    h.update(token.as_bytes());
    crate::journal::hex(&h.finalize())
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
}

fn session<St: Store>(state: &AppState<St>, headers: &HeaderMap) -> Option<Session> {
    let token = cookie_token(headers)?;
    let caller = state.tokens.lookup(&token)?;
    Some(Session {
        caller,
        csrf: csrf_for(&token),
    })
}

/// Refuses requests a browser marks as cross-site, and any whose `Origin` is not this
/// server. (SameSite=Strict and the CSRF token are the other two locks.)
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site != "same-origin" && site != "none" {
            return false;
        }
    }
    match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                == Some(host)
        }
        (Some(_), None) => false,
        (None, _) => true,
    }
}

fn csrf_ok(session: &Session, given: &str) -> bool {
    bool::from(session.csrf.as_bytes().ct_eq(given.as_bytes()))
}

fn to_signin(next: &str) -> Response {
    let mut target = url_encode(next);
    if target.is_empty() {
        target.push('/');
    }
    Redirect::to(&format!("/signin?next={target}")).into_response()
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Only same-site paths are followed after sign-in.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/".to_string(),
    }
}

fn page(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Holdpoint" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "Holdpoint" }
                    @if let Some(s) = session {
                        span.who { "signed in as " strong { (s.caller.principal.as_str()) }
                            " (" (s.caller.roles.join(", ")) ")" }
                        form.inline method="post" action="/signout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn html_response(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

fn error_page(status: StatusCode, session: Option<&Session>, message: &str) -> Response {
    html_response(
        status,
        page(
            "Error",
            session,
            html! { p.error role="alert" { (message) } p { a href="/" { "Back to the inbox" } } },
        ),
    )
}

fn ago(now: DateTime<Utc>, t: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds();
    let (n, unit, future) = if secs >= 0 {
        span(secs)
    } else {
        let (n, u, _) = span(-secs);
        (n, u, true)
    };
    if future {
        format!("in {n} {unit}")
    } else {
        format!("{n} {unit} ago")
    }
}

fn span(secs: i64) -> (i64, &'static str, bool) {
    match secs {
        s if s < 120 => (s, "s", false),
        s if s < 7200 => (s / 60, "min", false),
        s if s < 172_800 => (s / 3600, "h", false),
        s => (s / 86_400, "d", false),
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn text(s: &str) -> String {
    crate::sanitize::sanitize(s).into_owned()
}

// ---------------------------------------------------------------- sign-in

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn signin_page(Query(q): Query<NextQuery>) -> Response {
    signin_form(StatusCode::OK, q.next.as_deref(), None)
}

fn signin_form(status: StatusCode, next: Option<&str>, error: Option<&str>) -> Response {
    let next = safe_next(next);
    html_response(
        status,
        page(
            "Sign in",
            None,
            html! {
                h1 { "Sign in" }
                p { "Paste the bearer token you were given (the same one the API and CLI take)." }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/signin" {
                    input type="hidden" name="next" value=(next);
                    label for="token" { "Token" }
                    input #token type="password" name="token" autocomplete="off" required;
                    button type="submit" { "Sign in" }
                }
            },
        ),
    )
}

#[derive(Deserialize)]
struct SigninForm {
    token: String,
    #[serde(default)]
    next: Option<String>,
}

async fn signin<St: Store>(
    State(state): State<AppState<St>>,
    headers: HeaderMap,
    Form(form): Form<SigninForm>,
) -> Response {
    if !same_origin(&headers) {
        return error_page(StatusCode::FORBIDDEN, None, "cross-site sign-in refused");
    }
    let token = form.token.trim();
    if state.tokens.lookup(token).is_none() {
        return signin_form(
            StatusCode::UNAUTHORIZED,
            form.next.as_deref(),
            Some("unknown token"),
        );
    }
    let cookie = cookie::Cookie::build((COOKIE, token.to_string()))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .max_age(cookie::time::Duration::hours(SESSION_HOURS))
        .build();
    let mut resp = Redirect::to(&safe_next(form.next.as_deref())).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie.to_string()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn signout<St: Store>(
    State(state): State<AppState<St>>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let Some(s) = session(&state, &headers) else {
        return to_signin("/");
    };
    if !same_origin(&headers) || !csrf_ok(&s, &form.csrf) {
        return error_page(
            StatusCode::FORBIDDEN,
            Some(&s),
            "the form's security token is wrong; reload the page",
        );
    }
    let mut gone = cookie::Cookie::build((COOKIE, ""))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .build();
    gone.make_removal();
    let mut resp = Redirect::to("/signin").into_response();
    if let Ok(v) = HeaderValue::from_str(&gone.to_string()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

// ---------------------------------------------------------------- inbox

#[derive(Deserialize, Default, Clone)]
struct InboxQuery {
    #[serde(default)]
    workflow: Option<String>,
    #[serde(default)]
    action: Option<String>,
    /// `newest` (default) or `urgent` (earliest deadline first).
    #[serde(default)]
    sort: Option<String>,
}

impl InboxQuery {
    fn wants(&self, g: &PendingGate) -> bool {
        let matches = |want: &Option<String>, have: &str| match want.as_deref().map(str::trim) {
            None | Some("") => true,
            Some(w) => have == w,
        };
        matches(&self.workflow, &g.workflow) && matches(&self.action, &g.action)
    }
    fn urgent(&self) -> bool {
        self.sort.as_deref() == Some("urgent")
    }
}

async fn open_gates<St: Store>(
    state: &AppState<St>,
    q: &InboxQuery,
) -> Result<(Vec<PendingGate>, Vec<String>), Error> {
    let all = state.engine.pending(None, INBOX_SCAN).await?;
    let mut workflows: Vec<String> = all.iter().map(|g| g.workflow.clone()).collect();
    workflows.sort();
    workflows.dedup();
    let mut gates: Vec<PendingGate> = all.into_iter().filter(|g| q.wants(g)).collect();
    if q.urgent() {
        // Earliest deadline first; gates without one last, newest first among them.
        gates.sort_by(|a, b| match (a.deadline, b.deadline) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => b.requested_at.cmp(&a.requested_at),
        });
    } else {
        gates.sort_by_key(|g| std::cmp::Reverse(g.requested_at));
    }
    Ok((gates, workflows))
}

fn gate_list(s: &Session, gates: &[PendingGate], now: DateTime<Utc>) -> Markup {
    html! {
        @if gates.is_empty() {
            p.empty { "Nothing waits for a decision." }
        } @else {
            table.gates {
                thead { tr {
                    th { "Action" } th { "Workflow" } th { "Waiting" } th { "Deadline" }
                    th { "Why" } th { "Approvals" } th {}
                } }
                tbody {
                    @for g in gates {
                        @let may = s.may_decide(g);
                        @let link = format!("/runs/{}/gates/{}", g.run, g.gate);
                        tr.gate data-run=(g.run) data-gate=(g.gate) data-actionable=(may.is_ok()) {
                            td.action { a href=(link) { (text(&g.action)) } }
                            td { (text(&g.workflow)) }
                            td title=(g.requested_at.to_rfc3339()) { (ago(now, g.requested_at)) }
                            td {
                                @if let Some(d) = g.deadline {
                                    span title=(d.to_rfc3339()) { (ago(now, d)) }
                                } @else { "—" }
                            }
                            td.why {
                                (text(&g.reason))
                                @if let Some(rule) = &g.rule { " " span.rule { "rule " (text(rule)) } }
                                @if g.level > 0 { " " span.escalated { "escalated to group " (g.level) } }
                            }
                            td {
                                @if g.quorum > 1 {
                                    (g.approvals.len()) " of " (g.quorum)
                                    " (" (g.quorum as usize - g.approvals.len().min(g.quorum as usize)) " more)"
                                } @else { "1" }
                            }
                            td {
                                @match &may {
                                    Ok(()) => a.button href=(link) { "Review" },
                                    Err(why) => span.readonly title=(why) { "read-only" },
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn inbox<St: Store>(
    State(state): State<AppState<St>>,
    headers: HeaderMap,
    Query(q): Query<InboxQuery>,
) -> Response {
    let Some(s) = session(&state, &headers) else {
        return to_signin("/");
    };
    let (gates, workflows) = match open_gates(&state, &q).await {
        Ok(x) => x,
        Err(e) => return engine_error(&s, e),
    };
    let now = state.engine.now();
    let body = html! {
        h1 { "Waiting for you" }
        form.filters method="get" action="/" {
            label { "Workflow "
                select name="workflow" {
                    option value="" { "all" }
                    @for w in &workflows {
                        option value=(w) selected[q.workflow.as_deref() == Some(w.as_str())] { (text(w)) }
                    }
                }
            }
            label { "Action " input type="text" name="action" value=(q.action.clone().unwrap_or_default()); }
            label { "Order "
                select name="sort" {
                    option value="newest" selected[!q.urgent()] { "newest first" }
                    option value="urgent" selected[q.urgent()] { "most urgent first" }
                }
            }
            button type="submit" { "Show" }
        }
        div #pending data-updates="0" { (gate_list(&s, &gates, now)) }
    };
    html_response(StatusCode::OK, page("Inbox", Some(&s), body))
}

async fn inbox_list<St: Store>(
    State(state): State<AppState<St>>,
    headers: HeaderMap,
    Query(q): Query<InboxQuery>,
) -> Response {
    let Some(s) = session(&state, &headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    match open_gates(&state, &q).await {
        Ok((gates, _)) => html_response(StatusCode::OK, gate_list(&s, &gates, state.engine.now())),
        Err(e) => engine_error(&s, e),
    }
}

/// One `pending` event whenever the open gates change (and once at connect).
async fn inbox_events<St: Store>(State(state): State<AppState<St>>, headers: HeaderMap) -> Response {
    if session(&state, &headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let changes = state.engine.store().changes();
    let stream = futures::stream::unfold(
        (state, changes, None::<Vec<(RunId, GateId)>>),
        |(state, mut changes, last)| async move {
            loop {
                let now: Vec<(RunId, GateId)> = match state.engine.pending(None, INBOX_SCAN).await {
                    Ok(g) => g.iter().map(|g| (g.run, g.gate)).collect(),
                    Err(_) => Vec::new(),
                };
                if last.as_ref() != Some(&now) {
                    let event = SseEvent::default().event("pending").data(now.len().to_string());
                    return Some((Ok::<_, Infallible>(event), (state, changes, Some(now))));
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return None },
                    () = state.closed() => return None,
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

// ---------------------------------------------------------------- gate page

#[derive(Deserialize)]
struct DoneQuery {
    #[serde(default)]
    done: Option<String>,
}

async fn gate_page<St: Store>(
    State(state): State<AppState<St>>,
    headers: HeaderMap,
    Path((run, gate)): Path<(String, String)>,
    Query(q): Query<DoneQuery>,
) -> Response {
    let Some(s) = session(&state, &headers) else {
        return to_signin(&format!("/runs/{run}/gates/{gate}"));
    };
    let Some((run, gate)) = parse_ids(&run, &gate) else {
        return error_page(StatusCode::NOT_FOUND, Some(&s), "no such run or gate");
    };
    let notice = q.done.map(|d| match d.as_str() {
        "voted" => Notice::Info("Your approval was counted; the gate needs more approvers.".into()),
        _ => Notice::Info("Your decision was recorded.".into()),
    });
    render_gate(&state, &s, run, gate, StatusCode::OK, notice, None).await
}

fn parse_ids(run: &str, gate: &str) -> Option<(RunId, GateId)> {
    Some((run.parse().ok()?, GateId(gate.parse().ok()?)))
}

enum Notice {
    Info(String),
    Error(String),
}

/// What the reviewer typed, shown again after a refused decision.
#[derive(Default)]
struct Typed {
    args: Option<String>,
}

async fn render_gate<St: Store>(
    state: &AppState<St>,
    s: &Session,
    run: RunId,
    gate: GateId,
    status: StatusCode,
    notice: Option<Notice>,
    typed: Option<Typed>,
) -> Response {
    let view = match state.engine.get(run).await {
        Ok(v) => v,
        Err(e) => return engine_error(s, e),
    };
    let events = match state.engine.events(run).await {
        Ok(e) => e,
        Err(e) => return engine_error(s, e),
    };
    let Some(g) = view.state.gates.get(&gate) else {
        return error_page(
            StatusCode::NOT_FOUND,
            Some(s),
            &format!("run {run} has no gate {gate}"),
        );
    };
    let as_pending = PendingGate {
        run,
        gate,
        workflow: view.summary.workflow.clone(),
        kind: g.kind,
        action: g.action.clone(),
        args: g.current_args.clone(),
        context: g.context.clone(),
        reason: g.reason.clone(),
        allowed: g.allowed.clone(),
        deadline: g.deadline,
        requested_at: g.requested_at,
        rule: g.rule.clone(),
        level: g.level,
        roles: g.roles().to_vec(),
        quorum: g.spec.quorum,
        approvals: g.approvers().into_iter().cloned().collect(),
        request_hash: g.request_hash.clone(),
    };
    let may = s.may_decide(&as_pending);
    let now = state.engine.now();
    let typed = typed.unwrap_or_default();
    let action = format!("/runs/{run}/gates/{gate}");
    let allows = |k: DecisionKind| g.allowed.contains(&k);
    let body = html! {
        p.crumbs { a href="/" { "Inbox" } " › " a href=(format!("/runs/{run}")) { "run " (run) } " › gate " (gate) }
        h1 { (text(&g.action)) }
        @match &notice {
            Some(Notice::Info(m)) => p.notice role="status" { (m) },
            Some(Notice::Error(m)) => p.error #decision-error role="alert" { (m) },
            None => {},
        }
        dl.facts {
            dt { "Workflow" } dd { (text(&view.summary.workflow)) " v" (view.summary.version) }
            dt { "Why it asks" } dd { (text(&g.reason)) }
            @if let Some(rule) = &g.rule { dt { "Policy rule" } dd.rule { (text(rule)) } }
            dt { "Asked" } dd title=(g.requested_at.to_rfc3339()) { (ago(now, g.requested_at)) }
            @if let Some(d) = g.deadline { dt { "Deadline" } dd title=(d.to_rfc3339()) { (ago(now, d)) } }
            @if g.level > 0 { dt { "Escalated" } dd { "to group " (g.level) } }
            @if g.spec.quorum > 1 {
                dt { "Approvals" } dd { (as_pending.approvals.len()) " of " (g.spec.quorum) }
            }
            @if !as_pending.roles.is_empty() { dt { "Who may decide" } dd { (as_pending.roles.join(", ")) } }
        }
        h2 { "Proposed arguments" }
        pre.json #args { (pretty(&g.current_args)) }
        @if !g.context.is_null() {
            h2 { "Context from the agent" }
            pre.json #context { (pretty(&g.context)) }
        }
        @if let Some(d) = &g.decision {
            section.decided #recorded {
                h2 { "Decided" }
                p { strong.kind { (d.decision.kind()) } " by " strong.by { (d.by.as_str()) }
                    " " span title=(d.at.to_rfc3339()) { (ago(now, d.at)) } }
                @match &d.decision {
                    Decision::Edit { args } => pre.json { (pretty(args)) },
                    Decision::Reject { reason } => p { "Reason: " (text(reason)) },
                    Decision::Respond { input } => pre.json { (pretty(input)) },
                    Decision::Approve => {},
                }
                @if let Some(c) = &d.comment { p.comment { "Comment: " (text(c)) } }
            }
        } @else if view.summary.status.is_terminal() {
            p.notice { "The run has ended (" (view.summary.status) "); this gate can no longer be decided." }
        } @else {
            @match &may {
                Err(why) => p.readonly { "Read-only for you: " (why) "." },
                Ok(()) => {
                    section.decide {
                        h2 { "Decide" }
                        @if allows(DecisionKind::Approve) {
                            form.decision #approve-form method="post" action=(action) {
                                (hidden(s, &g.request_hash, "approve"))
                                label { "Comment (optional) " input type="text" name="comment"; }
                                button.approve type="submit" { "Approve" }
                            }
                        }
                        @if allows(DecisionKind::Edit) {
                            form.decision #edit-form method="post" action=(action) {
                                (hidden(s, &g.request_hash, "edit"))
                                label for="edit-args" { "Edited arguments (JSON)" }
                                textarea #edit-args name="args" rows="8" spellcheck="false" required {
                                    (typed.args.clone().unwrap_or_else(|| pretty(&g.current_args)))
                                }
                                p.error #edit-error role="alert" aria-live="polite" {}
                                label { "Comment (optional) " input type="text" name="comment"; }
                                button type="submit" { "Approve with these arguments" }
                            }
                        }
                        @if allows(DecisionKind::Reject) {
                            form.decision #reject-form method="post" action=(action) {
                                (hidden(s, &g.request_hash, "reject"))
                                label for="reject-reason" { "Reason (the agent sees it)" }
                                textarea #reject-reason name="reason" rows="3" required {}
                                button.reject type="submit" { "Reject" }
                            }
                        }
                        @if allows(DecisionKind::Respond) {
                            form.decision #respond-form method="post" action=(action) {
                                (hidden(s, &g.request_hash, "respond"))
                                label for="respond-input" { "Your answer (JSON, or plain text)" }
                                textarea #respond-input name="input" rows="4" required {}
                                button type="submit" { "Respond" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Timeline" }
        (timeline(&events))
    };
    html_response(status, page(&g.action, Some(s), body))
}

fn hidden(s: &Session, request_hash: &str, kind: &str) -> Markup {
    html! {
        input type="hidden" name="csrf" value=(s.csrf);
        input type="hidden" name="kind" value=(kind);
        input type="hidden" name="request_hash" value=(request_hash);
    }
}

fn timeline(events: &[crate::journal::Event]) -> Markup {
    html! {
        ol.timeline {
            @for e in events {
                li class=(event_class(&e.event)) {
                    span.seq { (e.seq) }
                    time datetime=(e.at.to_rfc3339()) { (e.at.format("%Y-%m-%d %H:%M:%S")) }
                    span.what { (crate::cli::describe_event(&e.event)) }
                }
            }
        }
    }
}

fn event_class(e: &EventKind) -> &'static str {
    match e {
        EventKind::DecisionRecorded { .. } | EventKind::VoteRecorded { .. } => "ev decision",
        EventKind::ApprovalRequested { .. } => "ev gate",
        EventKind::RunFailed { .. } | EventKind::StepFailed { .. } => "ev failed",
        EventKind::RunCompleted { .. } => "ev completed",
        _ => "ev",
    }
}

#[derive(Deserialize)]
struct DecideForm {
    csrf: String,
    kind: String,
    #[serde(default)]
    args: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    request_hash: Option<String>,
}

async fn decide<St: Store>(
    State(state): State<AppState<St>>,
    headers: HeaderMap,
    Path((run, gate)): Path<(String, String)>,
    Form(form): Form<DecideForm>,
) -> Response {
    let Some(s) = session(&state, &headers) else {
        return to_signin(&format!("/runs/{run}/gates/{gate}"));
    };
    if !same_origin(&headers) || !csrf_ok(&s, &form.csrf) {
        return error_page(
            StatusCode::FORBIDDEN,
            Some(&s),
            "the form's security token is wrong; reload the page",
        );
    }
    let Some((run, gate)) = parse_ids(&run, &gate) else {
        return error_page(StatusCode::NOT_FOUND, Some(&s), "no such run or gate");
    };
    let typed = Typed {
        args: form.args.clone(),
    };
    let refuse = |status, msg: String, typed| {
        let state = state.clone();
        let s = &s;
        async move {
            render_gate(
                &state,
                s,
                run,
                gate,
                status,
                Some(Notice::Error(msg)),
                Some(typed),
            )
            .await
        }
    };
    let decision = match form.kind.as_str() {
        "approve" => Decision::Approve,
        "edit" => match serde_json::from_str::<Value>(form.args.as_deref().unwrap_or("")) {
            Ok(args) => Decision::Edit { args },
            Err(e) => {
                let msg = format!("The edited arguments are not valid JSON: {e}");
                return refuse(StatusCode::UNPROCESSABLE_ENTITY, msg, typed).await;
            }
        },
        "reject" => Decision::Reject {
            reason: form.reason.clone().unwrap_or_default(),
        },
        "respond" => {
            let raw = form.input.clone().unwrap_or_default();
            let input = serde_json::from_str(&raw).unwrap_or(Value::String(raw));
            Decision::Respond { input }
        }
        other => {
            let msg = format!("unknown decision kind {other:?}");
            return refuse(StatusCode::BAD_REQUEST, msg, typed).await;
        }
    };
    let req = DecisionRequest {
        gate,
        decision,
        by: s.caller.principal.clone(),
        comment: form.comment.filter(|c| !c.trim().is_empty()),
        idempotency_key: None,
        roles: Some(s.caller.roles.clone()),
        request_hash: form.request_hash.filter(|h| !h.is_empty()),
    };
    match state.engine.decide(run, req).await {
        Ok(Decided::Voted { .. }) => {
            Redirect::to(&format!("/runs/{run}/gates/{gate}?done=voted")).into_response()
        }
        Ok(_) => Redirect::to(&format!("/runs/{run}/gates/{gate}?done=recorded")).into_response(),
        Err(e) => {
            let msg = match &e {
                Error::DecisionConflict { recorded, .. } => format!(
                    "Someone else decided first: {} by {} — your decision was not recorded.",
                    recorded.decision.kind(),
                    recorded.by
                ),
                Error::StaleRequest { .. } => {
                    "The request changed while you were looking at it (an edit vote or escalation); \
                     review it again."
                        .to_string()
                }
                other => other.to_string(),
            };
            let status = ApiError::from(e).status();
            refuse(status, msg, typed).await
        }
    }
}

fn engine_error(s: &Session, e: Error) -> Response {
    let message = e.to_string();
    let status = ApiError::from(e).status();
    error_page(status, Some(s), &message)
}

// ---------------------------------------------------------------- run page

async fn run_page<St: Store>(
    State(state): State<AppState<St>>,
    headers: HeaderMap,
    Path(run): Path<String>,
) -> Response {
    let Some(s) = session(&state, &headers) else {
        return to_signin(&format!("/runs/{run}"));
    };
    let Ok(run) = run.parse::<RunId>() else {
        return error_page(StatusCode::NOT_FOUND, Some(&s), "no such run");
    };
    let view = match state.engine.get(run).await {
        Ok(v) => v,
        Err(e) => return engine_error(&s, e),
    };
    let events = match state.engine.store().read(run, Seq::ZERO).await {
        Ok(e) => e,
        Err(e) => return engine_error(&s, e.into()),
    };
    let decisions: Vec<_> = view
        .state
        .gates
        .values()
        .filter_map(|g| g.decision.as_ref().map(|d| (g, d)))
        .collect();
    let body = html! {
        p.crumbs { a href="/" { "Inbox" } " › run " (run) }
        h1 { (text(&view.summary.workflow)) " v" (view.summary.version) " " span.status { (view.summary.status) } }
        @if let Some(why) = &view.summary.stuck { p.error { "Stuck: " (text(why)) } }
        h2 { "Gates" }
        @if view.state.gates.is_empty() { p { "No gates." } }
        ul.gates {
            @for g in view.state.gates.values() {
                li { a href=(format!("/runs/{run}/gates/{}", g.gate)) { "gate " (g.gate) ": " (text(&g.action)) }
                    @if g.decision.is_none() { " — open" } }
            }
        }
        h2 { "Who decided what" }
        @if decisions.is_empty() { p { "No decisions yet." } }
        table.decisions {
            @for (g, d) in &decisions {
                tr {
                    td { "gate " (g.gate) " " (text(&g.action)) }
                    td.kind { (d.decision.kind()) }
                    td.by { (d.by.as_str()) }
                    td { time datetime=(d.at.to_rfc3339()) { (d.at.format("%Y-%m-%d %H:%M:%S")) } }
                    td.comment { (d.comment.as_deref().map(text).unwrap_or_default()) }
                }
            }
        }
        h2 { "Timeline" }
        (timeline(&events))
        @if let Some(out) = &view.state.output { h2 { "Output" } pre.json { (pretty(out)) } }
    };
    html_response(StatusCode::OK, page("Run", Some(&s), body))
}
