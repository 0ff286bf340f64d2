//! An in-process HTTP server on a loopback port, and a blocking client, for tests that
//! need the real API but control the engine (its clock, its policy).
#![allow(dead_code)]

use holdpoint::journal::SledStore;
use holdpoint::server::{self, AppState, Tokens};
use holdpoint::Engine;
use serde_json::{json, Value};
use std::sync::Arc;

pub struct Server {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// Serves the API for `engine` on a free loopback port.
pub async fn serve(engine: Engine<SledStore>, tokens: Tokens) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState {
        engine,
        tokens: Arc::new(tokens),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        axum::serve(listener, server::router(state, server::DEFAULT_BODY_LIMIT))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
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
