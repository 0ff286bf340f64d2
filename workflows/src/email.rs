//! The customer email agent: drafts a reply to a complaint; sending it needs a
//! person's approval, and an edit changes the text that is actually sent. Sent mail is
//! a file in an outbox directory, one per idempotency key.

use holdpoint_engine::{Ctx, Failure, Gated, Registry, StepInfo};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Complaint {
    pub customer: String,
    pub email: String,
    pub complaint: String,
}

/// The arguments of the gated `email_customer` action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Email {
    pub to: String,
    pub subject: String,
    pub body: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum EmailOutcome {
    Sent { email: Email, file: String },
    NotSent { reason: String },
}

/// Where sent mail lands.
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    pub fn new(dir: impl AsRef<Path>) -> Outbox {
        Outbox {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    /// Sends (writes) once per key: a repeat finds the file and sends nothing new.
    pub fn send(&self, key: &str, email: &Email) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let name: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.dir.join(format!("{name}.json"));
        if path.exists() {
            return Ok(path);
        }
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(email).map_err(std::io::Error::other)?,
        )?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Every sent email.
    pub fn sent(&self) -> std::io::Result<Vec<Email>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            out.push(serde_json::from_slice(&std::fs::read(p)?).map_err(std::io::Error::other)?);
        }
        Ok(out)
    }
}

fn draft(c: &Complaint) -> Email {
    Email {
        to: c.email.clone(),
        subject: "About your recent order".into(),
        body: format!(
            "Dear {},\n\nThank you for telling us: \"{}\". We are sorry. A replacement is on its way.\n\nKind regards,\nSupport",
            c.customer, c.complaint
        ),
    }
}

pub async fn email_agent(ctx: Ctx, c: Complaint, outbox: Arc<Outbox>) -> Result<EmailOutcome, Failure> {
    let complaint = c.clone();
    let email = ctx
        .step("draft_reply", || {
            let c = complaint.clone();
            async move { Ok(draft(&c)) }
        })
        .await?;
    let context = serde_json::json!({ "customer": c.customer, "complaint": c.complaint });
    let email = match ctx.gate("email_customer", email, context).await? {
        Gated::Approved { args, .. } | Gated::Edited { args, .. } => args,
        Gated::Rejected { reason, .. } => return Ok(EmailOutcome::NotSent { reason }),
    };
    let sent = email.clone();
    let file = ctx
        .step("email_customer", || {
            let (outbox, email) = (outbox.clone(), sent.clone());
            async move {
                let key = StepInfo::current()
                    .map(|s| s.idempotency_key)
                    .ok_or_else(|| Failure::terminal("email_customer ran outside a step"))?;
                Ok(outbox.send(&key, &email)?.display().to_string())
            }
        })
        .await?;
    Ok(EmailOutcome::Sent { email, file })
}

pub fn register(registry: Registry, outbox: Arc<Outbox>) -> Registry {
    registry
        .workflow("customer_email", 1, move |ctx, c| {
            email_agent(ctx, c, outbox.clone())
        })
        .action::<Email>("email_customer")
}
