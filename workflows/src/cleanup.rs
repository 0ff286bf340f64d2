//! The data cleanup agent: finds stale records in a table, asks a person when it is not
//! sure which are stale, and deletes only with approval (always). The table is a JSON
//! file of rows; deleting an already deleted row is a no-op, so a retried delete is safe.

use holdpoint_engine::{Answer, Ctx, Failure, Gated, Registry};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub last_seen_days: u32,
    /// Rows someone flagged as important; a stale important row is not obviously stale.
    pub important: bool,
}

/// A table of rows in a JSON file.
pub struct Table {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Table {
    pub fn new(path: impl AsRef<Path>) -> Table {
        Table {
            path: path.as_ref().to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    /// The rows; a missing file is seeded with sample rows.
    pub fn rows(&self) -> std::io::Result<BTreeMap<String, Row>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.read()
    }

    fn read(&self) -> std::io::Result<BTreeMap<String, Row>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rows: BTreeMap<String, Row> = (1..=12)
                    .map(|i| {
                        let row = Row {
                            id: format!("user-{i:02}"),
                            last_seen_days: (i * 37) % 400,
                            important: i % 5 == 0,
                        };
                        (row.id.clone(), row)
                    })
                    .collect();
                self.write(&rows)?;
                Ok(rows)
            }
            Err(e) => Err(e),
        }
    }

    fn write(&self, rows: &BTreeMap<String, Row>) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(rows).map_err(std::io::Error::other)?,
        )?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(tmp, &self.path)
    }

    /// Deletes the rows; returns how many existed.
    pub fn delete(&self, ids: &[String]) -> std::io::Result<usize> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows = self.read()?;
        let n = ids.iter().filter(|id| rows.remove(*id).is_some()).count();
        self.write(&rows)?;
        Ok(n)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CleanupRequest {
    pub table: String,
    pub older_than_days: u32,
}

/// The arguments of the gated `delete_data` action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deletion {
    pub table: String,
    pub ids: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum CleanupOutcome {
    Deleted { ids: Vec<String>, existed: usize },
    NothingToDelete,
    NotDeleted { reason: String },
}

/// Below this confidence the agent asks before proposing a deletion.
pub const CONFIDENCE_THRESHOLD: f64 = 0.8;

pub async fn cleanup_agent(
    ctx: Ctx,
    req: CleanupRequest,
    table: Arc<Table>,
) -> Result<CleanupOutcome, Failure> {
    let t = table.clone();
    let days = req.older_than_days;
    let stale: Vec<Row> = ctx
        .step("find_stale", || {
            let t = t.clone();
            async move {
                Ok(t.rows()?
                    .into_values()
                    .filter(|r| r.last_seen_days > days)
                    .collect())
            }
        })
        .await?;
    if stale.is_empty() {
        return Ok(CleanupOutcome::NothingToDelete);
    }
    let unsure: Vec<&Row> = stale.iter().filter(|r| r.important).collect();
    let confidence = 1.0 - unsure.len() as f64 / stale.len() as f64;
    let mut ids: Vec<String> = stale.iter().map(|r| r.id.clone()).collect();
    if confidence < CONFIDENCE_THRESHOLD {
        let question = format!(
            "{} of {} stale rows are flagged important ({}). Respond with the list of ids to keep.",
            unsure.len(),
            stale.len(),
            unsure
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        match ctx.ask::<Vec<String>>(&question).await? {
            Answer::Responded { value: keep, .. } => ids.retain(|id| !keep.contains(id)),
            Answer::Declined { reason, .. } => return Ok(CleanupOutcome::NotDeleted { reason }),
        }
    }
    let deletion = Deletion {
        table: req.table.clone(),
        ids,
    };
    let context = serde_json::json!({
        "rows": stale, "older_than_days": days, "confidence": confidence,
    });
    let deletion = match ctx.gate("delete_data", deletion, context).await? {
        Gated::Approved { args, .. } | Gated::Edited { args, .. } => args,
        Gated::Rejected { reason, .. } => return Ok(CleanupOutcome::NotDeleted { reason }),
    };
    let ids = deletion.ids.clone();
    let existed = ctx
        .step("delete_data", || {
            let (t, ids) = (table.clone(), ids.clone());
            async move { Ok(t.delete(&ids)?) }
        })
        .await?;
    Ok(CleanupOutcome::Deleted {
        ids: deletion.ids,
        existed,
    })
}

pub fn register(registry: Registry, table: Arc<Table>) -> Registry {
    registry
        .workflow("data_cleanup", 1, move |ctx, req| {
            cleanup_agent(ctx, req, table.clone())
        })
        .action::<Deletion>("delete_data")
}
