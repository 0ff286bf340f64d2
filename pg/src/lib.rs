//! `PgStore`: Holdpoint's [`Store`] on PostgreSQL, for many worker processes on many
//! machines sharing one database.
//!
//! The same guarantees as the sled store, by the same code where it matters: records
//! are encoded by the journal's codec (checksum + hash chain) and verified by its
//! `verify_records` on every read; indexes are derived by `RunSummary::apply` and written
//! in the same transaction as the events.
//!
//! - **Schema**: everything lives in one schema (default `holdpoint`), created and
//!   migrated by [`PgStore::migrate`] (versioned, under an advisory lock so that many
//!   processes starting at once migrate once).
//! - **Appends**: one transaction: lock the run's row (`SELECT ... FOR UPDATE`), check
//!   the expected seq, the chain head and the lease token, insert the events
//!   (`PRIMARY KEY (run_id, seq)`), update indexes and the summary, `pg_notify`. The
//!   commit is durable (`synchronous_commit` on, PostgreSQL's default).
//! - **Leases and fencing**: `claim` takes ready runs (and runs whose lease expired) with
//!   `FOR UPDATE SKIP LOCKED`, giving each a new token from a sequence; every append by a
//!   worker names its token and is refused (`LeaseLost`) once another took the run, so a
//!   worker that was paused past its lease (GC pause, SIGSTOP) can never write again.
//! - **Wake-ups**: `LISTEN` on one connection; every write that could make a run ready
//!   sends `pg_notify` in its transaction. A slow poll (every 5 s) is the fallback if
//!   the listening connection is lost.

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::StreamExt;
use holdpoint_journal::codec::{self, ChainHash};
use holdpoint_journal::{
    check_append_limits, Append, AppendConflict, Appended, Created, DueDeadline, Error, Event, GateId,
    IndexChange, Lease, LeaseToken, NewRun, Outgoing, PendingGate, Result, RuleDecision, RunId, RunStatus,
    RunSummary, Seq, Store, WorkerId, DEFAULT_MAX_EVENT_BYTES,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::types::Json;
use tokio_postgres::{AsyncMessage, NoTls, Transaction};

mod migrations;

/// Options for [`PgStore::connect`].
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// The schema holding Holdpoint's tables (letters, digits, `_`).
    pub schema: String,
    pub pool_size: usize,
    pub max_event_bytes: usize,
    pub max_run_events: u64,
    pub max_run_bytes: u64,
    /// Webhook endpoints whose notifications are queued. They are kept in the database,
    /// so every process queues for them (workers append most gate events): `Some` makes
    /// the database's list exactly this one (what `serve` does with its webhooks file;
    /// queues of endpoints no longer named are dropped), `None` leaves it as it is
    /// (workers).
    pub outbox_endpoints: Option<Vec<String>>,
    /// Apply pending migrations on connect (what `serve --pg` does).
    pub migrate: bool,
    /// PostgreSQL ends a session left idle inside a transaction this long, releasing its
    /// row locks: a worker frozen mid-append (SIGSTOP, a long GC pause) must not keep
    /// others from taking its runs over once its lease has run out.
    pub idle_in_transaction_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            schema: "holdpoint".into(),
            pool_size: 16,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_run_events: 100_000,
            max_run_bytes: 64 * 1024 * 1024,
            outbox_endpoints: None,
            migrate: true,
            idle_in_transaction_timeout: Duration::from_secs(10),
        }
    }
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    schema: String,
    channel: String,
    options: PgOptions,
    changes: watch::Sender<u64>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn pg(e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("postgres: {e}"))
}

fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Statuses a claim never takes.
fn parked() -> Vec<String> {
    RunStatus::ALL
        .into_iter()
        .filter(|s| s.is_terminal() || *s == RunStatus::Stuck)
        .map(|s| s.as_str().to_string())
        .collect()
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Retries a transaction body on serialization failures and deadlocks (which
/// PostgreSQL's read committed rarely gives, and CockroachDB's serializable often).
async fn retrying<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, TxError>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(TxError::Db(e)) => {
                let retry = e
                    .code()
                    .is_some_and(|c| c.code() == "40001" || c.code() == "40P01");
                attempt += 1;
                if !retry || attempt >= 8 {
                    return Err(pg(e));
                }
            }
            Err(TxError::Journal(e)) => return Err(e),
        }
    }
}

/// An error inside a transaction body: retryable database errors stay typed.
enum TxError {
    Db(tokio_postgres::Error),
    Journal(Error),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Db(e)
    }
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Journal(e)
    }
}

impl From<deadpool_postgres::PoolError> for TxError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        TxError::Journal(pg(e))
    }
}

type Tx<T> = std::result::Result<T, TxError>;

impl PgStore {
    /// Connects (e.g. `postgres://user@127.0.0.1:5432/db`), migrates when the options
    /// say so, and starts listening for other processes' changes.
    pub async fn connect(url: &str, options: PgOptions) -> Result<PgStore> {
        if !valid_schema(&options.schema) {
            return Err(Error::Storage(format!(
                "schema name {:?}: lower-case letters, digits and _, at most 63",
                options.schema
            )));
        }
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Storage(format!("database URL {url:?}: {e}")))?;
        config.options(format!(
            "-c idle_in_transaction_session_timeout={}",
            options.idle_in_transaction_timeout.as_millis().max(1)
        ));
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .build()
            .map_err(pg)?;
        // Fail now, clearly, if the database is not there.
        drop(
            pool.get()
                .await
                .map_err(|e| Error::Storage(format!("cannot connect to PostgreSQL at {url}: {e}")))?,
        );
        if options.migrate {
            migrations::migrate(&pool, &options.schema).await?;
        } else {
            migrations::check(&pool, &options.schema).await?;
        }
        if let Some(names) = &options.outbox_endpoints {
            set_endpoints(&pool, &options.schema, names).await?;
        }
        let channel = format!("holdpoint_{}", options.schema);
        let (changes, _) = watch::channel(0);
        let listener = tokio::spawn(listen(config, channel.clone(), changes.clone()));
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                schema: options.schema.clone(),
                channel,
                options,
                changes,
                listener,
            }),
        })
    }

    /// Applies pending migrations and reports the schema version.
    pub async fn migrate(url: &str, schema: &str) -> Result<i32> {
        let store = PgStore::connect(
            url,
            PgOptions {
                schema: schema.into(),
                migrate: true,
                ..Default::default()
            },
        )
        .await?;
        migrations::version(&store.inner.pool, schema).await
    }

    /// Drops the schema and everything in it (tests).
    pub async fn drop_schema(&self) -> Result<()> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.inner.schema))
            .await
            .map_err(pg)
    }

    /// Bytes the schema's tables and indexes take.
    pub async fn size_on_disk(&self) -> Result<u64> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let row = c
            .query_one(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
                &[&self.inner.schema],
            )
            .await
            .map_err(pg)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    fn t(&self, table: &str) -> String {
        format!("{}.{table}", self.inner.schema)
    }

    fn bump(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The run's summary with the row's live columns (ready time) folded in, and the
    /// lease token, locked for update.
    async fn locked_summary(
        &self,
        tx: &Transaction<'_>,
        run: RunId,
    ) -> Tx<Option<(RunSummary, Option<i64>)>> {
        let row = tx
            .query_opt(
                &format!(
                    "SELECT summary, wake_at, lease_token FROM {} WHERE run_id = $1 FOR UPDATE",
                    self.t("runs")
                ),
                &[&run.as_uuid()],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let Json(mut summary): Json<RunSummary> = row.get(0);
        summary.wake_at = row.get(1);
        Ok(Some((summary, row.get(2))))
    }

    async fn put_summary(&self, tx: &Transaction<'_>, summary: &RunSummary) -> Tx<()> {
        tx.execute(
            &format!(
                "UPDATE {} SET summary = $2, status = $3, wake_at = $4 WHERE run_id = $1",
                self.t("runs")
            ),
            &[
                &summary.id.as_uuid(),
                &Json(summary),
                &summary.status.as_str(),
                &summary.wake_at,
            ],
        )
        .await?;
        Ok(())
    }

    async fn notify(&self, tx: &Transaction<'_>) -> Tx<()> {
        tx.execute("SELECT pg_notify($1, '')", &[&self.inner.channel])
            .await?;
        Ok(())
    }

    /// Mirrors index changes into the tables; `leased` says whether a worker holds the
    /// run (then wake-ups go onto the lease, to be queued at release).
    async fn apply_changes(
        &self,
        tx: &Transaction<'_>,
        summary: &mut RunSummary,
        changes: Vec<IndexChange>,
        leased: bool,
    ) -> Tx<()> {
        let run = summary.id.as_uuid();
        for change in changes {
            match change {
                IndexChange::GateOpened(gate) => {
                    tx.execute(
                        &format!(
                            "INSERT INTO {} (run_id, gate, entry) VALUES ($1, $2, $3) \
                             ON CONFLICT (run_id, gate) DO UPDATE SET entry = excluded.entry",
                            self.t("pending")
                        ),
                        &[&run, &i64::from(gate.gate.0), &Json(&*gate)],
                    )
                    .await?;
                }
                IndexChange::GateClosed(gate) => {
                    tx.execute(
                        &format!(
                            "DELETE FROM {} WHERE run_id = $1 AND gate = $2",
                            self.t("pending")
                        ),
                        &[&run, &i64::from(gate.0)],
                    )
                    .await?;
                }
                IndexChange::Wake(at) => {
                    if leased {
                        tx.execute(
                            &format!(
                                "UPDATE {} SET lease_rewake = CASE WHEN lease_rewake IS NULL OR lease_rewake > $2 \
                                 THEN $2 ELSE lease_rewake END WHERE run_id = $1",
                                self.t("runs")
                            ),
                            &[&run, &at],
                        )
                        .await?;
                    } else if summary.wake_at.is_none_or(|old| old > at) {
                        summary.wake_at = Some(at);
                    }
                }
                IndexChange::Ended => summary.wake_at = None,
                IndexChange::DeadlineSet { gate, at, .. } => {
                    tx.execute(
                        &format!(
                            "INSERT INTO {} (run_id, gate, at) VALUES ($1, $2, $3) \
                             ON CONFLICT (run_id, gate) DO UPDATE SET at = excluded.at",
                            self.t("deadlines")
                        ),
                        &[&run, &i64::from(gate.0), &at],
                    )
                    .await?;
                }
                IndexChange::DeadlineCleared { gate, .. } => {
                    tx.execute(
                        &format!(
                            "DELETE FROM {} WHERE run_id = $1 AND gate = $2",
                            self.t("deadlines")
                        ),
                        &[&run, &i64::from(gate.0)],
                    )
                    .await?;
                }
                IndexChange::Decided { gate, kind, by, at } => {
                    if let Some(entry) = self.pending_entry(tx, summary.id, gate).await? {
                        if let Some(rule) = entry.rule {
                            let d = RuleDecision {
                                auto: false,
                                kind,
                                by,
                                at,
                                run: summary.id,
                                gate,
                            };
                            self.put_rule_decision(tx, &rule, &d).await?;
                        }
                    }
                }
                IndexChange::TrustedAllow { rule, position, at } => {
                    let d = RuleDecision {
                        auto: true,
                        kind: holdpoint_journal::DecisionKind::Approve,
                        by: holdpoint_journal::Principal::system(),
                        at,
                        run: summary.id,
                        gate: GateId(position.0),
                    };
                    self.put_rule_decision(tx, &rule, &d).await?;
                }
                IndexChange::GateChanged(gate, change) => {
                    if let Some(mut entry) = self.pending_entry(tx, summary.id, gate).await? {
                        entry.change(&change);
                        tx.execute(
                            &format!(
                                "UPDATE {} SET entry = $3 WHERE run_id = $1 AND gate = $2",
                                self.t("pending")
                            ),
                            &[&run, &i64::from(gate.0), &Json(&entry)],
                        )
                        .await?;
                    }
                }
                IndexChange::Notify(mut n) => {
                    if n.action.is_none() {
                        n.action = self
                            .pending_entry(tx, summary.id, n.gate)
                            .await?
                            .map(|g| g.action);
                    }
                    // One row per configured endpoint (none: nothing queued).
                    tx.execute(
                        &format!(
                            "INSERT INTO {} (endpoint, id, notification) \
                             SELECT name, nextval('{}'), $1 FROM {} ORDER BY name",
                            self.t("outbox"),
                            self.t("outbox_ids"),
                            self.t("webhook_endpoints")
                        ),
                        &[&Json(&*n)],
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn pending_entry(&self, tx: &Transaction<'_>, run: RunId, gate: GateId) -> Tx<Option<PendingGate>> {
        let row = tx
            .query_opt(
                &format!(
                    "SELECT entry FROM {} WHERE run_id = $1 AND gate = $2",
                    self.t("pending")
                ),
                &[&run.as_uuid(), &i64::from(gate.0)],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, Json<PendingGate>>(0).0))
    }

    async fn put_rule_decision(&self, tx: &Transaction<'_>, rule: &str, d: &RuleDecision) -> Tx<()> {
        tx.execute(
            &format!(
                "INSERT INTO {} (rule, at, run_id, gate, entry) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                self.t("rule_decisions")
            ),
            &[&rule, &d.at, &d.run.as_uuid(), &i64::from(d.gate.0), &Json(d)],
        )
        .await?;
        Ok(())
    }

    async fn read_summary(&self, run: RunId) -> Result<Option<RunSummary>> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT summary, wake_at FROM {} WHERE run_id = $1",
                    self.t("runs")
                ),
                &[&run.as_uuid()],
            )
            .await
            .map_err(pg)?;
        Ok(row.map(|r| {
            let Json(mut s): Json<RunSummary> = r.get(0);
            s.wake_at = r.get(1);
            s
        }))
    }

    /// Every record of the run, verified, and nothing stored past what the summary
    /// knows (the offline check `holdpoint verify` runs).
    pub async fn verify_run(&self, run: RunId) -> Result<(Seq, ChainHash)> {
        let summary = self.read_summary(run).await?.ok_or(Error::UnknownRun(run))?;
        self.read(run, Seq::ZERO).await?;
        let c = self.inner.pool.get().await.map_err(pg)?;
        let past = c
            .query_opt(
                &format!(
                    "SELECT seq FROM {} WHERE run_id = $1 AND seq >= $2 LIMIT 1",
                    self.t("events")
                ),
                &[&run.as_uuid(), &i64_of(summary.next_seq.0)],
            )
            .await
            .map_err(pg)?;
        if past.is_some() {
            return Err(codec::past_summary(run, summary.next_seq));
        }
        Ok((summary.next_seq, summary.head))
    }

    /// Overwrites one stored record (corruption tests).
    #[doc(hidden)]
    pub async fn overwrite_record(&self, run: RunId, seq: Seq, record: &[u8]) -> Result<()> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        c.execute(
            &format!(
                "UPDATE {} SET record = $3 WHERE run_id = $1 AND seq = $2",
                self.t("events")
            ),
            &[&run.as_uuid(), &i64_of(seq.0), &record],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }

    /// One stored record (corruption tests).
    #[doc(hidden)]
    pub async fn raw_record(&self, run: RunId, seq: Seq) -> Result<Option<Vec<u8>>> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT record FROM {} WHERE run_id = $1 AND seq = $2",
                    self.t("events")
                ),
                &[&run.as_uuid(), &i64_of(seq.0)],
            )
            .await
            .map_err(pg)?;
        Ok(row.map(|r| r.get(0)))
    }
}

/// Makes the database's webhook endpoints exactly `names`, dropping the queues of the
/// others.
async fn set_endpoints(pool: &Pool, schema: &str, names: &[String]) -> Result<()> {
    let mut c = pool.get().await.map_err(pg)?;
    let tx = c.transaction().await.map_err(pg)?;
    let names: Vec<String> = names.to_vec();
    tx.execute(
        &format!("DELETE FROM {schema}.outbox WHERE endpoint <> ALL($1)"),
        &[&names],
    )
    .await
    .map_err(pg)?;
    tx.execute(
        &format!("DELETE FROM {schema}.webhook_endpoints WHERE name <> ALL($1)"),
        &[&names],
    )
    .await
    .map_err(pg)?;
    tx.execute(
        &format!(
            "INSERT INTO {schema}.webhook_endpoints (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING"
        ),
        &[&names],
    )
    .await
    .map_err(pg)?;
    tx.commit().await.map_err(pg)
}

/// Holds a LISTEN connection and bumps `changes` on every notification; reconnects when
/// it drops, and bumps every 5 s regardless (the slow fallback).
async fn listen(config: tokio_postgres::Config, channel: String, changes: watch::Sender<u64>) {
    let bump = || changes.send_modify(|n| *n = n.wrapping_add(1));
    let mut fallback = tokio::time::interval(Duration::from_secs(5));
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                let statement = format!("LISTEN {channel}");
                let listening = client.batch_execute(&statement);
                tokio::pin!(listening);
                let mut subscribed = false;
                loop {
                    tokio::select! {
                        r = &mut listening, if !subscribed => {
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "LISTEN failed");
                                break;
                            }
                            subscribed = true;
                            bump();
                        }
                        m = messages.next() => match m {
                            Some(Ok(AsyncMessage::Notification(_))) => bump(),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => { tracing::warn!(error = %e, "the LISTEN connection failed"); break }
                            None => break,
                        },
                        _ = fallback.tick() => bump(),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the LISTEN connection"),
        }
        // Before reconnecting: the fallback tick paces the retries.
        fallback.tick().await;
        bump();
    }
}

impl Store for PgStore {
    async fn create_run(&self, run: NewRun) -> Result<Created> {
        let event = run.first_event();
        let (record, head) = codec::encode(&event, &ChainHash::GENESIS, self.inner.options.max_event_bytes)?;
        let hash = run.request_hash()?;
        let created = retrying(|| async {
            let mut c = self.inner.pool.get().await?;
            let tx = c.transaction().await?;
            if let Some(key) = &run.idempotency_key {
                let inserted = tx
                    .execute(
                        &format!(
                            "INSERT INTO {} (idempotency_key, run_id, request_hash) VALUES ($1, $2, $3) \
                             ON CONFLICT (idempotency_key) DO NOTHING",
                            self.t("starts")
                        ),
                        &[key, &run.id.as_uuid(), &&hash[..]],
                    )
                    .await?;
                if inserted == 0 {
                    let row = tx
                        .query_one(
                            &format!(
                                "SELECT run_id, request_hash FROM {} WHERE idempotency_key = $1",
                                self.t("starts")
                            ),
                            &[key],
                        )
                        .await?;
                    let existing = RunId::from_uuid(row.get(0));
                    let stored: Vec<u8> = row.get(1);
                    tx.rollback().await?;
                    if stored != hash {
                        return Err(TxError::Journal(Error::StartConflict {
                            key: key.clone(),
                            existing,
                        }));
                    }
                    return Ok(Created::Existing(existing));
                }
            }
            let mut summary = RunSummary::start(&run);
            summary.bytes = record.len() as u64;
            let changes = summary.apply(&event, head);
            let inserted = tx
                .execute(
                    &format!(
                        "INSERT INTO {} (run_id, summary, status) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        self.t("runs")
                    ),
                    &[&run.id.as_uuid(), &Json(&summary), &summary.status.as_str()],
                )
                .await?;
            if inserted == 0 {
                return Err(TxError::Journal(Error::Storage(format!(
                    "run {} already exists",
                    run.id
                ))));
            }
            tx.execute(
                &format!(
                    "INSERT INTO {} (run_id, seq, record) VALUES ($1, 0, $2)",
                    self.t("events")
                ),
                &[&run.id.as_uuid(), &record],
            )
            .await?;
            self.apply_changes(&tx, &mut summary, changes, false).await?;
            self.put_summary(&tx, &summary).await?;
            self.notify(&tx).await?;
            tx.commit().await?;
            Ok(Created::New(run.id))
        })
        .await?;
        self.bump();
        Ok(created)
    }

    async fn append(&self, append: Append) -> Result<std::result::Result<Appended, AppendConflict>> {
        let run = append.run;
        let expected = append.expected;
        let lease = append.lease;
        let prepared = codec::prepare_append(
            self.read_summary(run).await?,
            append,
            self.inner.options.max_event_bytes,
        )?;
        let (current, codec::Encoded { records, events }) = match prepared {
            Ok(p) => p,
            Err(conflict) => return Ok(Err(conflict)),
        };
        let outcome = retrying(|| async {
            let mut c = self.inner.pool.get().await?;
            let tx = c.transaction().await?;
            let Some((mut summary, token)) = self.locked_summary(&tx, run).await? else {
                return Err(TxError::Journal(Error::UnknownRun(run)));
            };
            if summary.next_seq != expected || summary.head != current.head {
                return Ok(Err(AppendConflict {
                    run,
                    expected,
                    found: summary.next_seq,
                }));
            }
            if summary.status.is_terminal() {
                return Err(TxError::Journal(Error::RunEnded(run)));
            }
            if let Some(want) = lease {
                if token != Some(want.0 as i64) {
                    return Err(TxError::Journal(Error::LeaseLost(run)));
                }
            }
            let o = &self.inner.options;
            let (_, bytes_after) =
                check_append_limits(&summary, &records, &events, o.max_run_events, o.max_run_bytes)?;
            summary.bytes = bytes_after;
            let insert = tx
                .prepare(&format!(
                    "INSERT INTO {} (run_id, seq, record) VALUES ($1, $2, $3)",
                    self.t("events")
                ))
                .await?;
            for ((event, hash), record) in events.iter().zip(&records) {
                tx.execute(&insert, &[&run.as_uuid(), &i64_of(event.seq.0), record])
                    .await?;
                let changes = summary.apply(event, *hash);
                self.apply_changes(&tx, &mut summary, changes, token.is_some())
                    .await?;
            }
            self.put_summary(&tx, &summary).await?;
            self.notify(&tx).await?;
            tx.commit().await?;
            Ok(Ok(Appended {
                next: summary.next_seq,
                head: summary.head,
            }))
        })
        .await?;
        if outcome.is_ok() {
            self.bump();
        }
        Ok(outcome)
    }

    async fn read(&self, run: RunId, from: Seq) -> Result<Vec<Event>> {
        let summary = self.read_summary(run).await?.ok_or(Error::UnknownRun(run))?;
        let c = self.inner.pool.get().await.map_err(pg)?;
        let start = from.0.saturating_sub(1);
        let rows = c
            .query(
                &format!(
                    "SELECT seq, record FROM {} WHERE run_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq",
                    self.t("events")
                ),
                &[&run.as_uuid(), &i64_of(start), &i64_of(summary.next_seq.0)],
            )
            .await
            .map_err(pg)?;
        let mut rows = rows
            .into_iter()
            .map(|r| (Seq(r.get::<_, i64>(0) as u64), r.get::<_, Vec<u8>>(1)));
        let mut peeked = rows.next();
        let before = match (from.0.checked_sub(1), &peeked) {
            (Some(at), Some((seq, _))) if seq.0 == at => peeked.take().map(|(_, r)| r),
            _ => None,
        };
        let records = peeked.into_iter().chain(rows).map(Ok);
        codec::verify_records(run, from, before, records, summary.next_seq, &summary.head)
    }

    async fn summary(&self, run: RunId) -> Result<Option<RunSummary>> {
        self.read_summary(run).await
    }

    async fn list_runs(
        &self,
        status: Option<RunStatus>,
        after: Option<RunId>,
        limit: usize,
    ) -> Result<Vec<RunSummary>> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let after = after.map(|a| a.as_uuid());
        let rows = c
            .query(
                &format!(
                    "SELECT summary, wake_at FROM {} WHERE ($1::text IS NULL OR status = $1) \
                     AND ($2::uuid IS NULL OR run_id > $2) ORDER BY run_id LIMIT $3",
                    self.t("runs")
                ),
                &[&status.map(|s| s.as_str()), &after, &i64_of(limit as u64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let Json(mut s): Json<RunSummary> = r.get(0);
                s.wake_at = r.get(1);
                s
            })
            .collect())
    }

    async fn pending(&self, after: Option<(RunId, GateId)>, limit: usize) -> Result<Vec<PendingGate>> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let (run, gate) = match after {
            Some((r, g)) => (Some(r.as_uuid()), Some(i64::from(g.0))),
            None => (None, None),
        };
        let rows = c
            .query(
                &format!(
                    "SELECT entry FROM {} WHERE ($1::uuid IS NULL OR (run_id, gate) > ($1, $2)) \
                     ORDER BY run_id, gate LIMIT $3",
                    self.t("pending")
                ),
                &[&run, &gate, &i64_of(limit as u64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .into_iter()
            .map(|r| r.get::<_, Json<PendingGate>>(0).0)
            .collect())
    }

    async fn claim(
        &self,
        owner: WorkerId,
        now: DateTime<Utc>,
        ttl: Duration,
        max: usize,
    ) -> Result<Vec<Lease>> {
        let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(60));
        let c = self.inner.pool.get().await.map_err(pg)?;
        // A worker that died between a run's last append and its release left a lease
        // on an ended (or parked) run: nothing to take over, just clear it.
        c.execute(
            &format!(
                "UPDATE {runs} SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL, lease_rewake = NULL \
                 WHERE run_id IN (SELECT run_id FROM {runs} WHERE lease_token IS NOT NULL AND lease_expires <= $1 \
                 AND status = ANY($2) FOR UPDATE SKIP LOCKED)",
                runs = self.t("runs")
            ),
            &[&now, &parked()],
        )
        .await
        .map_err(pg)?;
        let rows = c
            .query(
                &format!(
                    "WITH due AS (
                        SELECT run_id FROM {runs}
                        WHERE ((lease_token IS NULL AND wake_at <= $1)
                               OR (lease_token IS NOT NULL AND lease_expires <= $1))
                          AND status <> ALL($2)
                        ORDER BY wake_at NULLS LAST LIMIT $3
                        FOR UPDATE SKIP LOCKED)
                     UPDATE {runs} AS r SET lease_owner = $4, lease_token = nextval('{tokens}'),
                        lease_expires = $5, lease_rewake = NULL, wake_at = NULL
                     FROM due WHERE r.run_id = due.run_id
                     RETURNING r.run_id, r.lease_token",
                    runs = self.t("runs"),
                    tokens = self.t("lease_tokens"),
                ),
                &[
                    &now,
                    &parked(),
                    &i64_of(max as u64),
                    &owner.as_uuid(),
                    &expires_at,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .into_iter()
            .map(|r| Lease {
                run: RunId::from_uuid(r.get(0)),
                owner,
                token: LeaseToken(r.get::<_, i64>(1) as u64),
                expires_at,
                rewake_at: None,
            })
            .collect())
    }

    async fn release(&self, lease: &Lease, wake: Option<DateTime<Utc>>) -> Result<()> {
        let woke = retrying(|| async {
            let mut c = self.inner.pool.get().await?;
            let tx = c.transaction().await?;
            let row = tx
                .query_opt(
                    &format!(
                        "SELECT lease_token, lease_rewake, status FROM {} WHERE run_id = $1 FOR UPDATE",
                        self.t("runs")
                    ),
                    &[&lease.run.as_uuid()],
                )
                .await?;
            let Some(row) = row else { return Ok(false) };
            if row.get::<_, Option<i64>>(0) != Some(lease.token.0 as i64) {
                return Ok(false);
            }
            let rewake: Option<DateTime<Utc>> = row.get(1);
            let status: String = row.get(2);
            let parked = parked().contains(&status);
            let at = match (wake, rewake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .filter(|_| !parked);
            tx.execute(
                &format!(
                    "UPDATE {} SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL, \
                     lease_rewake = NULL, wake_at = $2 WHERE run_id = $1",
                    self.t("runs")
                ),
                &[&lease.run.as_uuid(), &at],
            )
            .await?;
            if at.is_some() {
                self.notify(&tx).await?;
            }
            tx.commit().await?;
            Ok(at.is_some())
        })
        .await?;
        if woke {
            self.bump();
        }
        Ok(())
    }

    async fn renew(&self, lease: &Lease, now: DateTime<Utc>, ttl: Duration) -> Result<Option<Lease>> {
        let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(60));
        let c = self.inner.pool.get().await.map_err(pg)?;
        let row = c
            .query_opt(
                &format!(
                    "UPDATE {} SET lease_expires = $3 WHERE run_id = $1 AND lease_token = $2 RETURNING lease_rewake",
                    self.t("runs")
                ),
                &[&lease.run.as_uuid(), &(lease.token.0 as i64), &expires_at],
            )
            .await
            .map_err(pg)?;
        Ok(row.map(|r| Lease {
            expires_at,
            rewake_at: r.get(0),
            ..lease.clone()
        }))
    }

    async fn mark_stuck(&self, lease: &Lease, reason: String) -> Result<()> {
        retrying(|| async {
            let mut c = self.inner.pool.get().await?;
            let tx = c.transaction().await?;
            let Some((mut summary, token)) = self.locked_summary(&tx, lease.run).await? else {
                return Err(TxError::Journal(Error::UnknownRun(lease.run)));
            };
            if token != Some(lease.token.0 as i64) {
                return Err(TxError::Journal(Error::LeaseLost(lease.run)));
            }
            summary.wake_at = None;
            summary.stuck = Some(reason.clone());
            if !summary.status.is_terminal() {
                summary.status = RunStatus::Stuck;
            }
            tx.execute(
                &format!(
                    "UPDATE {} SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL, lease_rewake = NULL \
                     WHERE run_id = $1",
                    self.t("runs")
                ),
                &[&lease.run.as_uuid()],
            )
            .await?;
            self.put_summary(&tx, &summary).await?;
            self.notify(&tx).await?;
            tx.commit().await?;
            Ok(())
        })
        .await?;
        self.bump();
        Ok(())
    }

    async fn is_leased(&self, run: RunId) -> Result<bool> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT lease_token IS NOT NULL FROM {} WHERE run_id = $1",
                    self.t("runs")
                ),
                &[&run.as_uuid()],
            )
            .await
            .map_err(pg)?;
        Ok(row.is_some_and(|r| r.get(0)))
    }

    async fn next_wake(&self) -> Result<Option<DateTime<Utc>>> {
        // Also when a lease runs out: its run is taken over then (its worker may be gone),
        // or, on an ended run, the lease is cleared.
        let c = self.inner.pool.get().await.map_err(pg)?;
        let row = c
            .query_one(
                &format!(
                    "SELECT (SELECT min(wake_at) FROM {runs} WHERE wake_at IS NOT NULL),
                            (SELECT min(lease_expires) FROM {runs} WHERE lease_token IS NOT NULL)",
                    runs = self.t("runs")
                ),
                &[],
            )
            .await
            .map_err(pg)?;
        let a: Option<DateTime<Utc>> = row.get(0);
        let b: Option<DateTime<Utc>> = row.get(1);
        Ok(match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    async fn due_deadlines(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<DueDeadline>> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let rows = c
            .query(
                &format!(
                    "SELECT run_id, gate, at FROM {} WHERE at <= $1 ORDER BY at, run_id, gate LIMIT $2",
                    self.t("deadlines")
                ),
                &[&now, &i64_of(limit as u64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .into_iter()
            .map(|r| DueDeadline {
                run: RunId::from_uuid(r.get(0)),
                gate: GateId(r.get::<_, i64>(1) as u32),
                at: r.get(2),
            })
            .collect())
    }

    async fn rule_history(&self, rule: &str, limit: usize) -> Result<Vec<RuleDecision>> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let rows = c
            .query(
                &format!(
                    "SELECT entry FROM {} WHERE rule = $1 ORDER BY at DESC, run_id DESC, gate DESC LIMIT $2",
                    self.t("rule_decisions")
                ),
                &[&rule, &i64_of(limit as u64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .into_iter()
            .map(|r| r.get::<_, Json<RuleDecision>>(0).0)
            .collect())
    }

    async fn next_deadline(&self) -> Result<Option<DateTime<Utc>>> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let row = c
            .query_one(&format!("SELECT min(at) FROM {}", self.t("deadlines")), &[])
            .await
            .map_err(pg)?;
        Ok(row.get(0))
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn max_event_bytes(&self) -> usize {
        self.inner.options.max_event_bytes
    }

    async fn runs_with_status(&self, status: RunStatus) -> Result<usize> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let row = c
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE status = $1", self.t("runs")),
                &[&status.as_str()],
            )
            .await
            .map_err(pg)?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    async fn open_gates(&self) -> Result<usize> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let row = c
            .query_one(&format!("SELECT count(*) FROM {}", self.t("pending")), &[])
            .await
            .map_err(pg)?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    async fn outbox(&self, endpoint: &str, limit: usize) -> Result<Vec<Outgoing>> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        let rows = c
            .query(
                &format!(
                    "SELECT id, notification FROM {} WHERE endpoint = $1 ORDER BY id LIMIT $2",
                    self.t("outbox")
                ),
                &[&endpoint, &i64_of(limit as u64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .into_iter()
            .map(|r| Outgoing {
                key: r.get::<_, i64>(0) as u64,
                notification: r.get::<_, Json<holdpoint_journal::Notification>>(1).0,
            })
            .collect())
    }

    async fn outbox_done(&self, endpoint: &str, key: u64) -> Result<()> {
        let c = self.inner.pool.get().await.map_err(pg)?;
        c.execute(
            &format!("DELETE FROM {} WHERE endpoint = $1 AND id = $2", self.t("outbox")),
            &[&endpoint, &i64_of(key)],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }
}
