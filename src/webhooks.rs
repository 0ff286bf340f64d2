//! Webhooks: a JSON POST to each configured endpoint when a gate opens, is decided,
//! escalates or times out.
//!
//! **Nothing is lost.** Notifications are derived from journal events and queued in the
//! store's outbox *in the same transaction as the event* (one queue per endpoint), so a
//! crash can never record a gate without its notification. A delivery is removed from
//! its queue only after the receiver answered 2xx; after a crash it may be delivered
//! again, with the same `Holdpoint-Delivery` id (`run:seq`), never dropped.
//!
//! **Dead endpoints never block runs.** Each endpoint has its own task and queue; runs
//! never wait on delivery. A failing endpoint is retried with exponential backoff
//! (1 s doubling to 5 min by default), in order, forever (its queue grows meanwhile).
//!
//! **Signed.** `Holdpoint-Signature: t=UNIX,v1=HEX` where HEX is HMAC-SHA256 with the
//! endpoint's secret over `"{t}.{body}"`; receivers check it with
//! [`verify_signature`] (or the same three lines in their language) and reject stale
//! timestamps to stop replays.
//!
//! ```toml
//! # Deep links in notifications start with this (default: the server's address).
//! public_url = "https://holdpoint.example.com"
//!
//! [[endpoints]]
//! name = "ops-chat"                  # names the endpoint's queue; keep it stable
//! url = "https://hooks.example.com/holdpoint"
//! secret = "at least sixteen characters"
//! events = ["gate.opened", "gate.escalated"]   # default: every kind
//! ```

use crate::journal::{hex, Notification, NotificationKind, Store};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "Holdpoint-Signature";
/// The notification's id (`run:seq`): the same on every redelivery.
pub const DELIVERY_HEADER: &str = "Holdpoint-Delivery";
/// The notification's kind (`gate.opened`, ...).
pub const EVENT_HEADER: &str = "Holdpoint-Event";
/// Shortest endpoint secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// The webhooks file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    #[serde(default)]
    pub public_url: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// One receiver.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    pub secret: String,
    /// Kinds to send; empty: all.
    #[serde(default)]
    pub events: Vec<NotificationKind>,
}

impl Endpoint {
    fn wants(&self, kind: NotificationKind) -> bool {
        self.events.is_empty() || self.events.contains(&kind)
    }
}

impl WebhookConfig {
    /// Parses and checks a webhooks file.
    pub fn from_toml(text: &str) -> Result<WebhookConfig, String> {
        let config: WebhookConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut names = std::collections::BTreeSet::new();
        for ep in &config.endpoints {
            if ep.name.is_empty() || ep.name.contains('\0') || ep.name.len() > 64 {
                return Err(format!("endpoint name {:?}: 1 to 64 characters, no NUL", ep.name));
            }
            if !names.insert(ep.name.as_str()) {
                return Err(format!("endpoint name {:?} is used twice", ep.name));
            }
            if !(ep.url.starts_with("http://") || ep.url.starts_with("https://")) {
                return Err(format!("endpoint {}: url must be http:// or https://", ep.name));
            }
            if ep.secret.len() < MIN_SECRET_LEN {
                return Err(format!(
                    "endpoint {}: the secret must have at least {MIN_SECRET_LEN} characters",
                    ep.name
                ));
            }
        }
        Ok(config)
    }

    /// The endpoints' names: what the store's outbox queues for.
    pub fn names(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.name.clone()).collect()
    }
}

/// Retry timing.
#[derive(Clone, Debug)]
pub struct DeliveryOptions {
    /// First retry after this; doubles per failure.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Per request.
    pub timeout: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions {
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
        }
    }
}

impl DeliveryOptions {
    /// The wait before retry number `failures` (1 = after the first failure).
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(20);
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// `t=UNIX,v1=HEX` for `body` sent at `unix`.
pub fn sign(secret: &str, unix: i64, body: &[u8]) -> String {
    format!("t={unix},v1={}", hex(&mac(secret, unix, body)))
}

fn mac(secret: &str, unix: i64, body: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length; were it ever refused, the empty signature fails
    // every check (nothing is sent unsigned-but-valid).
    let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else {
        return Vec::new();
    };
    m.update(unix.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// Checks a `Holdpoint-Signature` header: the HMAC matches (in constant time) and the
/// timestamp is within `tolerance` of `now_unix` (stale or future: a replay).
pub fn verify_signature(
    secret: &str,
    header: &str,
    body: &[u8],
    now_unix: i64,
    tolerance: Duration,
) -> Result<(), String> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err("malformed signature header".into());
    };
    if (now_unix - t).unsigned_abs() > tolerance.as_secs() {
        return Err(format!("timestamp {t} is outside the tolerance (now {now_unix})"));
    }
    let given: Vec<u8> = (0..v1.len() / 2)
        .filter_map(|i| {
            v1.get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).map_err(|e| e.to_string())?;
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.verify_slice(&given)
        .map_err(|_| "signature does not match".to_string())
}

/// The JSON body of a notification: its fields and a deep link to the gate page.
pub fn body(n: &Notification, public_url: &str) -> Vec<u8> {
    let mut v = serde_json::to_value(n).unwrap_or(Value::Null);
    v["link"] = Value::String(format!(
        "{}/runs/{}/gates/{}",
        public_url.trim_end_matches('/'),
        n.run,
        n.gate
    ));
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The delivery tasks (one per endpoint).
pub struct Webhooks {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Webhooks {
    /// Starts delivering every endpoint's queue from `store`.
    pub fn spawn<S: Store + Clone>(
        store: S,
        config: &WebhookConfig,
        public_url: String,
        options: DeliveryOptions,
    ) -> Webhooks {
        let (stop, _) = watch::channel(false);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(options.timeout))
            .build()
            .into();
        let tasks = config
            .endpoints
            .iter()
            .map(|ep| {
                let worker = Delivery {
                    store: store.clone(),
                    endpoint: ep.clone(),
                    public_url: public_url.clone(),
                    options: options.clone(),
                    agent: agent.clone(),
                    stop: stop.subscribe(),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        Webhooks { stop, tasks }
    }

    /// Stops delivering (an attempt in flight finishes first).
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

struct Delivery<S> {
    store: S,
    endpoint: Endpoint,
    public_url: String,
    options: DeliveryOptions,
    agent: ureq::Agent,
    stop: watch::Receiver<bool>,
}

impl<S: Store + Clone> Delivery<S> {
    async fn run(mut self) {
        let name = self.endpoint.name.clone();
        let mut changes = self.store.changes();
        let mut failures = 0u32;
        loop {
            if *self.stop.borrow() {
                return;
            }
            changes.borrow_and_update();
            let batch = match self.store.outbox(&name, 32).await {
                Ok(b) => b,
                Err(e) => {
                    failures += 1;
                    tracing::error!(endpoint = %name, error = %e, "reading the webhook queue failed");
                    if self.pause(failures).await {
                        return;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = self.stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            for item in batch {
                let n = &item.notification;
                if self.endpoint.wants(n.kind) {
                    loop {
                        match self.deliver(n).await {
                            Ok(()) => {
                                failures = 0;
                                break;
                            }
                            Err(e) => {
                                failures += 1;
                                let wait = self.options.delay(failures);
                                tracing::warn!(endpoint = %name, delivery = %n.id, error = %e,
                                    retry_in_ms = wait.as_millis() as u64, "webhook delivery failed");
                                if self.pause(failures).await {
                                    return;
                                }
                            }
                        }
                    }
                }
                if let Err(e) = self.store.outbox_done(&name, item.key).await {
                    tracing::error!(endpoint = %name, error = %e, "removing a delivered webhook failed");
                }
            }
        }
    }

    /// Waits out the backoff; true when told to stop meanwhile.
    async fn pause(&mut self, failures: u32) -> bool {
        let wait = self.options.delay(failures);
        tokio::select! {
            () = tokio::time::sleep(wait) => false,
            _ = self.stop.wait_for(|s| *s) => true,
        }
    }

    async fn deliver(&self, n: &Notification) -> Result<(), String> {
        let body = body(n, &self.public_url);
        let signature = sign(&self.endpoint.secret, chrono::Utc::now().timestamp(), &body);
        let agent = self.agent.clone();
        let url = self.endpoint.url.clone();
        let id = n.id.clone();
        let kind = n.kind.as_str();
        tokio::task::spawn_blocking(move || {
            let resp = agent
                .post(&url)
                .header("Content-Type", "application/json")
                .header(SIGNATURE_HEADER, &signature)
                .header(DELIVERY_HEADER, &id)
                .header(EVENT_HEADER, kind)
                .send(&body[..])
                .map_err(|e| e.to_string())?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("the receiver answered {}", resp.status()))
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }
}
