//! Versioned schema migrations. Each one runs once, in order, in a transaction that
//! also records it; concurrent migrators wait on an advisory lock (CockroachDB has no
//! advisory locks: migrate once, with `holdpoint migrate`, before starting workers).

use crate::pg;
use deadpool_postgres::Pool;
use holdpoint_journal::{Error, Result};

/// `(version, SQL)`; `{s}` is the schema. Never edit a released migration: add one.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE {s}.runs (
        run_id UUID PRIMARY KEY,
        summary JSONB NOT NULL,
        status TEXT NOT NULL,
        wake_at TIMESTAMPTZ,
        lease_owner UUID,
        lease_token BIGINT,
        lease_expires TIMESTAMPTZ,
        lease_rewake TIMESTAMPTZ
    );
    CREATE INDEX runs_by_status ON {s}.runs (status, run_id);
    CREATE INDEX runs_ready ON {s}.runs (wake_at) WHERE wake_at IS NOT NULL;
    CREATE INDEX runs_leased ON {s}.runs (lease_expires) WHERE lease_token IS NOT NULL;
    CREATE TABLE {s}.events (
        run_id UUID NOT NULL,
        seq BIGINT NOT NULL,
        record BYTEA NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE {s}.pending (
        run_id UUID NOT NULL,
        gate BIGINT NOT NULL,
        entry JSONB NOT NULL,
        PRIMARY KEY (run_id, gate)
    );
    CREATE TABLE {s}.starts (
        idempotency_key TEXT PRIMARY KEY,
        run_id UUID NOT NULL,
        request_hash BYTEA NOT NULL
    );
    CREATE TABLE {s}.deadlines (
        run_id UUID NOT NULL,
        gate BIGINT NOT NULL,
        at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (run_id, gate)
    );
    CREATE INDEX deadlines_by_at ON {s}.deadlines (at);
    CREATE TABLE {s}.rule_decisions (
        rule TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL,
        run_id UUID NOT NULL,
        gate BIGINT NOT NULL,
        entry JSONB NOT NULL,
        PRIMARY KEY (rule, at, run_id, gate)
    );
    CREATE TABLE {s}.outbox (
        endpoint TEXT NOT NULL,
        id BIGINT NOT NULL,
        notification JSONB NOT NULL,
        PRIMARY KEY (endpoint, id)
    );
    CREATE SEQUENCE {s}.outbox_ids;
    CREATE SEQUENCE {s}.lease_tokens;",
    ),
    (2, "CREATE TABLE {s}.webhook_endpoints (name TEXT PRIMARY KEY);"),
];

/// The newest version this build knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

fn lock_key(schema: &str) -> i64 {
    // A stable key per schema (FNV-1a), so different schemas migrate independently.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in schema.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

pub async fn migrate(pool: &Pool, schema: &str) -> Result<()> {
    let mut c = pool.get().await.map_err(pg)?;
    let tx = c.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(schema)])
        .await
        .map_err(pg)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.migrations (
            version INT PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(pg)?;
    let row = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {schema}.migrations"),
            &[],
        )
        .await
        .map_err(pg)?;
    let current: i32 = row.get(0);
    if current > latest() {
        return Err(too_new(schema, current));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(&sql.replace("{s}", schema))
            .await
            .map_err(|e| Error::Storage(format!("migration {version} of schema {schema}: {e}")))?;
        tx.execute(
            &format!("INSERT INTO {schema}.migrations (version) VALUES ($1)"),
            &[version],
        )
        .await
        .map_err(pg)?;
        tracing::info!(schema, version, "applied migration");
    }
    tx.commit().await.map_err(pg)
}

fn too_new(schema: &str, current: i32) -> Error {
    Error::Storage(format!(
        "schema {schema} is at version {current}, newer than this build knows ({}): upgrade Holdpoint",
        latest()
    ))
}

/// The schema's version (0: not created).
pub async fn version(pool: &Pool, schema: &str) -> Result<i32> {
    let c = pool.get().await.map_err(pg)?;
    let exists = c
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'migrations'",
            &[&schema],
        )
        .await
        .map_err(pg)?
        .get::<_, i64>(0)
        > 0;
    if !exists {
        return Ok(0);
    }
    let row = c
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {schema}.migrations"),
            &[],
        )
        .await
        .map_err(pg)?;
    Ok(row.get(0))
}

/// Without migrating: the schema must be exactly what this build expects.
pub async fn check(pool: &Pool, schema: &str) -> Result<()> {
    match version(pool, schema).await? {
        v if v == latest() => Ok(()),
        v if v > latest() => Err(too_new(schema, v)),
        v => Err(Error::Storage(format!(
            "schema {schema} is at version {v}; this build needs {}: run `holdpoint migrate`",
            latest()
        ))),
    }
}
