//! The HTTP API (`/v1`), on axum.
//!
//! Errors are JSON, `{"error": {"code": ..., "message": ...}}`, with a stable code:
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `malformed` | the request is not valid JSON / does not match the schema / a bad id |
//! | 401 | `unauthorized` | no, malformed or unknown bearer token |
//! | 403 | `forbidden` | the caller's role may not do this |
//! | 404 | `not_found` | unknown run, gate, workflow or route |
//! | 409 | `conflict` | the gate was decided differently (body names the recorded decision), the run ended, or a reused start key |
//! | 413 | `too_large` | the body is over the limit (default 1 MiB) or an event over the journal's cap |
//! | 422 | `invalid` | input that does not fit the workflow, edited args that do not fit the action, a decision kind the gate does not take |
//! | 500 | `internal` | storage failure (the outcome may be unknown: retry with the same idempotency key) or a corrupt journal |
//!
//! Who decided is the authenticated principal, never a name from the request body.

use crate::journal::{Decision, GateId, Principal, RunId, RunStatus, SledStore, Store};
use crate::{Decided, DecisionRequest, Engine, Error};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Default request body limit.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// Roles with a meaning to the API. Others (`finance`, `team-lead`, ...) are named by
/// gates (policy rules) to say who may decide them.
pub mod roles {
    /// Read runs, events, pending gates, metrics. A principal with only this role
    /// cannot decide.
    pub const VIEWER: &str = "viewer";
    /// Decide gates that name no roles.
    pub const REVIEWER: &str = holdpoint_engine::engine::REVIEWER_ROLE;
    /// Start and cancel runs (what an agent host needs). Cannot decide.
    pub const OPERATOR: &str = "operator";
    /// An agent's own principal: starts runs, can never approve.
    pub const AGENT: &str = holdpoint_engine::engine::AGENT_ROLE;
    /// Everything.
    pub const ADMIN: &str = holdpoint_engine::engine::ADMIN_ROLE;
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    pub roles: Vec<String>,
}

impl Caller {
    pub fn new(principal: &str, roles: &[&str]) -> Caller {
        Caller {
            principal: Principal::new(principal),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }
    pub fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role) || self.roles.iter().any(|r| r == roles::ADMIN)
    }
    /// May start and cancel runs.
    fn may_run(&self) -> bool {
        self.has(roles::OPERATOR) || self.has(roles::AGENT)
    }
    /// May try to decide: holds some role besides viewer and operator. The engine then
    /// checks the gate's own roles, the initiator and agents.
    fn may_decide(&self) -> bool {
        self.roles
            .iter()
            .any(|r| r != roles::VIEWER && r != roles::OPERATOR)
    }
}

/// Bearer tokens and whom they name. Tokens are kept as SHA-256 digests and compared
/// in constant time, so neither timing nor a memory dump gives them away.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<([u8; 32], Caller)>,
}

/// Shortest token accepted from configuration.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    principal: String,
    /// One role (shorthand for `roles = [role]`).
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    pub fn add(&mut self, token: &str, caller: Caller) -> Result<(), String> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the token for {} is {} characters; tokens must have at least {MIN_TOKEN_LEN}",
                caller.principal,
                token.len()
            ));
        }
        self.entries.push((digest(token), caller));
        Ok(())
    }

    /// From a TOML file: `[[tokens]]` tables with `token`, `principal` and `role`
    /// (`viewer`, `reviewer`, `operator` or `admin`).
    pub fn from_toml(text: &str) -> Result<Tokens, String> {
        let file: TokensFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut tokens = Tokens::default();
        for t in file.tokens {
            let mut roles = t.roles;
            roles.extend(t.role);
            if roles.is_empty() {
                return Err(format!("the token of {} has no role", t.principal));
            }
            tokens.add(
                &t.token,
                Caller {
                    principal: Principal::new(t.principal),
                    roles,
                },
            )?;
        }
        Ok(tokens)
    }

    /// From `HOLDPOINT_TOKENS`-style text: `TOKEN=PRINCIPAL:ROLE[+ROLE...]`, separated
    /// by commas (no role: reviewer).
    pub fn from_spec(spec: &str) -> Result<Tokens, String> {
        let mut tokens = Tokens::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (token, who) = item.split_once('=').ok_or_else(|| {
                format!(
                    "expected TOKEN=PRINCIPAL:ROLE, got {:?}",
                    crate::sanitize::sanitize(item)
                )
            })?;
            let (principal, roles) = who.split_once(':').unwrap_or((who, roles::REVIEWER));
            tokens.add(
                token,
                Caller {
                    principal: Principal::new(principal),
                    roles: roles.split('+').map(str::to_string).collect(),
                },
            )?;
        }
        Ok(tokens)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller a token names. Every entry is compared, in constant time.
    pub fn lookup(&self, token: &str) -> Option<Caller> {
        let d = digest(token);
        let mut found = None;
        for (entry, caller) in &self.entries {
            if bool::from(entry.ct_eq(&d)) {
                found = Some(caller.clone());
            }
        }
        found
    }
}

/// Shared state of the API.
pub struct AppState<St: Store = SledStore> {
    pub engine: Engine<St>,
    pub tokens: Arc<Tokens>,
    /// Set when the server is shutting down: long-lived responses (the inbox's event
    /// stream) end, so a graceful shutdown does not wait on them.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl<St: Store> Clone for AppState<St> {
    fn clone(&self) -> Self {
        AppState {
            engine: self.engine.clone(),
            tokens: self.tokens.clone(),
            closing: self.closing.clone(),
        }
    }
}

impl<St: Store> AppState<St> {
    pub fn new(engine: Engine<St>, tokens: Tokens) -> Self {
        AppState {
            engine,
            tokens: Arc::new(tokens),
            closing: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Ends the long-lived responses; call it when shutdown begins.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`close`](Self::close) was called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<(&'static str, Value)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    fn malformed(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "malformed", message)
    }
    fn unauthorized(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    fn forbidden(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some((k, v)) = self.extra {
            body[k] = v;
        }
        let mut resp = (self.status, Json(json!({ "error": body }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        use crate::journal::Error as J;
        let message = e.to_string();
        let (status, code) = match &e {
            Error::UnknownRun(_) | Error::UnknownGate { .. } | Error::UnknownWorkflow { .. } => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            Error::NotAllowed { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            Error::StaleRequest { current, .. } => {
                let mut err = ApiError::new(StatusCode::CONFLICT, "stale", message);
                err.extra = Some(("current_request_hash", json!(current)));
                return err;
            }
            Error::DecisionConflict { recorded, .. } => {
                let mut err = ApiError::new(StatusCode::CONFLICT, "conflict", message);
                err.extra = Some(("recorded", serde_json::to_value(recorded).unwrap_or(Value::Null)));
                return err;
            }
            Error::RunEnded(_) | Error::Journal(J::RunEnded(_)) | Error::Journal(J::StartConflict { .. }) => {
                (StatusCode::CONFLICT, "conflict")
            }
            Error::DecisionNotAllowed { .. }
            | Error::InvalidEdit { .. }
            | Error::InvalidInput { .. }
            | Error::InvalidDecision(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            Error::Journal(J::EventTooLarge { .. }) | Error::Journal(J::RunLimit { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
            }
            Error::Journal(J::UnknownRun(_)) => (StatusCode::NOT_FOUND, "not_found"),
            _ => {
                tracing::error!(error = %e, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

/// JSON body whose rejections are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(r)) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "request body is over the size limit",
                ))
            }
            Err(r) => Err(ApiError::malformed(r.body_text())),
        }
    }
}

/// Path parameters whose rejections are [`ApiError`]s (an unparsable id is a 400).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|r| ApiError::malformed(r.body_text()))
    }
}

/// Query parameters whose rejections are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|r| ApiError::malformed(r.body_text()))
    }
}

type Routes<St> = Vec<(
    &'static str,
    &'static [&'static str],
    axum::routing::MethodRouter<AppState<St>>,
)>;

/// Every authenticated route: path, methods, handlers. The router is built from this
/// table, and `routes()` exposes it, so a test can try every route (for example without
/// a token) and a new route cannot be left out of that test.
fn authed_routes<St: Store>() -> Routes<St> {
    vec![
        (
            "/v1/runs",
            &["GET", "POST"],
            post(create_run::<St>).get(list_runs::<St>),
        ),
        ("/v1/runs/{run}", &["GET"], get(get_run::<St>)),
        ("/v1/runs/{run}/events", &["GET"], get(run_events::<St>)),
        ("/v1/runs/{run}/wait", &["GET"], get(wait_run::<St>)),
        ("/v1/runs/{run}/cancel", &["POST"], post(cancel_run::<St>)),
        (
            "/v1/runs/{run}/gates/{gate}/decision",
            &["POST"],
            post(decide::<St>),
        ),
        ("/v1/pending", &["GET"], get(pending::<St>)),
        ("/v1/stats", &["GET"], get(stats::<St>)),
        ("/metrics", &["GET"], get(metrics::<St>)),
    ]
}

/// The authenticated routes: (path, methods). Every one needs a bearer token; only
/// `GET /healthz` does not.
pub fn routes() -> Vec<(&'static str, &'static [&'static str])> {
    authed_routes::<SledStore>()
        .into_iter()
        .map(|(p, m, _)| (p, m))
        .collect()
}

/// Builds the router. Every route but `/healthz` needs a bearer token.
pub fn router<St: Store>(state: AppState<St>, body_limit: usize) -> Router {
    let authed = authed_routes::<St>()
        .into_iter()
        .fold(Router::new(), |r, (path, _, handlers)| r.route(path, handlers))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::<St>));
    Router::new()
        .merge(authed)
        .merge(crate::web::routes::<St>())
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// One structured log line per request: method, path, status, principal, latency.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let began = std::time::Instant::now();
    let resp = next.run(req).await;
    let principal = resp.extensions().get::<Principal>().map(|p| p.to_string());
    tracing::info!(
        %method,
        path = %crate::sanitize::sanitize(&path),
        status = resp.status().as_u16(),
        principal = principal.as_deref().unwrap_or("-"),
        latency_us = began.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

async fn auth<St: Store>(State(state): State<AppState<St>>, mut req: Request, next: Next) -> Response {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return ApiError::unauthorized("missing bearer token (Authorization: Bearer TOKEN)").into_response();
    };
    let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return ApiError::unauthorized("malformed Authorization header; expected `Bearer TOKEN`")
            .into_response();
    };
    match state.tokens.lookup(token.trim()) {
        Some(caller) => {
            let principal = caller.principal.clone();
            req.extensions_mut().insert(caller);
            let mut resp = next.run(req).await;
            // For the request log.
            resp.extensions_mut().insert(principal);
            resp
        }
        None => ApiError::unauthorized("unknown token").into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    workflow: String,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    idempotency_key: Option<String>,
}

async fn create_run<St: Store>(
    State(s): State<AppState<St>>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !caller.may_run() {
        return Err(ApiError::forbidden(format!(
            "{} may not start runs",
            caller.principal
        )));
    }
    let run = s
        .engine
        .start_as(
            Some(caller.principal),
            &body.workflow,
            &body.input,
            body.idempotency_key.as_deref(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "run": run }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    after: Option<RunId>,
    limit: Option<usize>,
}

async fn list_runs<St: Store>(
    State(s): State<AppState<St>>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match q.status.as_deref() {
        Some(st) => Some(st.parse::<RunStatus>().map_err(ApiError::malformed)?),
        None => None,
    };
    let runs = s
        .engine
        .list(status, q.after, q.limit.unwrap_or(100).min(1000))
        .await?;
    Ok(Json(json!(runs)))
}

async fn get_run<St: Store>(
    State(s): State<AppState<St>>,
    ApiPath(run): ApiPath<RunId>,
) -> Result<Json<Value>, ApiError> {
    let view = s.engine.get(run).await?;
    Ok(Json(json!({"summary": view.summary, "state": view.state})))
}

async fn run_events<St: Store>(
    State(s): State<AppState<St>>,
    ApiPath(run): ApiPath<RunId>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(s.engine.events(run).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    timeout_ms: Option<u64>,
}

/// Long-poll: answers once the run is quiet (ended, stuck, or paused with no worker on
/// it), or after `timeout_ms` (default 30 s, at most 300 s) with its state then.
async fn wait_run<St: Store>(
    State(s): State<AppState<St>>,
    ApiPath(run): ApiPath<RunId>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<Value>, ApiError> {
    let timeout = std::time::Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(300_000));
    let settled = tokio::time::timeout(timeout, s.engine.settled(run)).await;
    let view = s.engine.get(run).await?;
    let settled = matches!(settled, Ok(Ok(_)));
    Ok(Json(
        json!({"settled": settled, "summary": view.summary, "state": view.state}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingQuery {
    after_run: Option<RunId>,
    after_gate: Option<GateId>,
    limit: Option<usize>,
}

async fn pending<St: Store>(
    State(s): State<AppState<St>>,
    ApiQuery(q): ApiQuery<PendingQuery>,
) -> Result<Json<Value>, ApiError> {
    let after = match (q.after_run, q.after_gate) {
        (Some(r), Some(g)) => Some((r, g)),
        (None, None) => None,
        _ => return Err(ApiError::malformed("after_run and after_gate go together")),
    };
    let gates = s.engine.pending(after, q.limit.unwrap_or(100).min(1000)).await?;
    Ok(Json(json!(gates)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    decision: Decision,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    /// The hash of the request the decider saw (`request_hash` of the pending gate).
    #[serde(default)]
    request_hash: Option<String>,
}

async fn decide<St: Store>(
    State(s): State<AppState<St>>,
    Extension(caller): Extension<Caller>,
    ApiPath((run, gate)): ApiPath<(RunId, GateId)>,
    ApiJson(body): ApiJson<DecisionBody>,
) -> Result<Json<Value>, ApiError> {
    if !caller.may_decide() {
        return Err(ApiError::forbidden(format!(
            "{} may not decide gates",
            caller.principal
        )));
    }
    let req = DecisionRequest {
        gate,
        decision: body.decision,
        by: caller.principal,
        comment: body.comment,
        idempotency_key: body.idempotency_key,
        roles: Some(caller.roles),
        request_hash: body.request_hash,
    };
    Ok(Json(match s.engine.decide(run, req).await? {
        Decided::Recorded(d) => json!({"recorded": true, "decision": d}),
        Decided::AlreadyRecorded(d) => json!({"recorded": false, "decision": d}),
        Decided::Voted { approvals, needed } => {
            json!({"recorded": false, "voted": true, "approvals": approvals, "needed": needed})
        }
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn cancel_run<St: Store>(
    State(s): State<AppState<St>>,
    Extension(caller): Extension<Caller>,
    ApiPath(run): ApiPath<RunId>,
    ApiJson(body): ApiJson<CancelBody>,
) -> Result<Json<Value>, ApiError> {
    if !caller.may_run() {
        return Err(ApiError::forbidden(format!(
            "{} may not cancel runs",
            caller.principal
        )));
    }
    s.engine.cancel(run, caller.principal, body.reason).await?;
    Ok(Json(json!({"cancelled": run})))
}

/// Review workload per action class (see `holdpoint stats`).
async fn stats<St: Store>(State(s): State<AppState<St>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(s.engine.stats().await?)))
}

async fn metrics<St: Store>(State(s): State<AppState<St>>) -> Result<Response, ApiError> {
    let store = s.engine.store();
    let mut out = String::from("# HELP holdpoint_runs Runs by status.\n# TYPE holdpoint_runs gauge\n");
    for status in RunStatus::ALL {
        let n = store.runs_with_status(status).await.map_err(Error::from)?;
        out.push_str(&format!("holdpoint_runs{{status=\"{status}\"}} {n}\n"));
    }
    let pending = store.open_gates().await.map_err(Error::from)?;
    out.push_str(&format!(
        "# HELP holdpoint_pending_gates Gates awaiting a decision.\n# TYPE holdpoint_pending_gates gauge\nholdpoint_pending_gates {pending}\n"
    ));
    s.engine.metrics().render(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
