//! The registry: workflows by name and version, and the argument types of gated
//! actions (so an edit can be checked before it is recorded).

use crate::ctx::Ctx;
use crate::error::{Error, Failure};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

pub(crate) type RunFn = Arc<dyn Fn(Ctx, Value) -> BoxFuture<'static, Result<Value, Failure>> + Send + Sync>;
type CheckFn = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Registered {
    pub run: RunFn,
    pub check_input: CheckFn,
}

/// Workflows and actions known to an engine.
///
/// ```
/// # use holdpoint_engine::{Ctx, Failure, Registry};
/// async fn greet(_ctx: Ctx, name: String) -> Result<String, Failure> {
///     Ok(format!("hello {name}"))
/// }
/// let registry = Registry::new().workflow("greet", 1, greet);
/// assert_eq!(registry.latest_version("greet"), Some(1));
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    workflows: BTreeMap<(String, u32), Registered>,
    actions: BTreeMap<String, CheckFn>,
    problems: Vec<String>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `f` as version `version` of workflow `name`. New runs start on the
    /// highest registered version; a run stays on the version it started with, so keep
    /// old versions registered while runs paused on them remain.
    pub fn workflow<I, O, F, Fut>(mut self, name: &str, version: u32, f: F) -> Registry
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(Ctx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, Failure>> + Send + 'static,
    {
        let key = (name.to_string(), version);
        if self.workflows.contains_key(&key) {
            self.problems
                .push(format!("workflow {name:?} version {version} is registered twice"));
            return self;
        }
        let f = Arc::new(f);
        let run: RunFn = Arc::new(move |ctx, input| {
            let f = f.clone();
            Box::pin(async move {
                let input: I = serde_json::from_value(input)
                    .map_err(|e| Failure::terminal(format!("input does not fit the workflow: {e}")))?;
                let output = f(ctx, input).await?;
                serde_json::to_value(output)
                    .map_err(|e| Failure::terminal(format!("output could not be encoded: {e}")))
            })
        });
        let check_input: CheckFn = Arc::new(|v| {
            serde_json::from_value::<I>(v.clone())
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        self.workflows.insert(key, Registered { run, check_input });
        self
    }

    /// Declares the argument type of a gated action, so `edit` decisions are checked
    /// against it before they are recorded. Without a declaration an edit must at least
    /// have the same JSON shape (object, array, ...) as the proposed arguments.
    pub fn action<A: DeserializeOwned + 'static>(mut self, name: &str) -> Registry {
        self.actions.insert(
            name.to_string(),
            Arc::new(|v| {
                serde_json::from_value::<A>(v.clone())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        );
        self
    }

    pub fn latest_version(&self, name: &str) -> Option<u32> {
        self.workflows
            .range((name.to_string(), 0)..=(name.to_string(), u32::MAX))
            .next_back()
            .map(|((_, v), _)| *v)
    }

    /// Registered (name, version) pairs.
    pub fn workflows(&self) -> impl Iterator<Item = (&str, u32)> {
        self.workflows.keys().map(|(n, v)| (n.as_str(), *v))
    }

    pub(crate) fn get(&self, name: &str, version: u32) -> Option<&Registered> {
        self.workflows.get(&(name.to_string(), version))
    }

    pub(crate) fn check_edit(&self, action: &str, proposed: &Value, edited: &Value) -> Result<(), String> {
        match self.actions.get(action) {
            Some(check) => check(edited),
            None if std::mem::discriminant(proposed) == std::mem::discriminant(edited) => Ok(()),
            None => Err(format!(
                "expected {} like the proposed arguments, got {}",
                shape(proposed),
                shape(edited)
            )),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Registry(self.problems.join("; ")))
        }
    }
}

fn shape(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
