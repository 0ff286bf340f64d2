//! Criterion benches of the core, as events per second (decisions per second for the
//! engine's decide → resume). `cargo bench -- --quick` runs them in a few minutes. The
//! raw sled baseline sits beside our append so the ratio comes from one run.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use holdpoint::journal::codec::{self, ChainHash};
use holdpoint::journal::wal::{Lsn, Wal, WalOptions};
use holdpoint::journal::{
    Append, Event, EventKind, GateId, NewRun, Position, Principal, RunId, RunStatus, Seq, SledStore, Store,
    FORMAT_VERSION,
};
use holdpoint::{fold, replay, Ctx, DecisionRequest, Engine, Failure, Registry};
use serde_json::json;
use std::time::{Duration, Instant};

fn event(run: RunId, seq: u64, kind: EventKind) -> Event {
    Event {
        run,
        seq: Seq(seq),
        at: chrono::Utc::now(),
        v: FORMAT_VERSION.min(1),
        event: kind,
    }
}

fn output(i: u64) -> serde_json::Value {
    json!({"order": i, "amount_cents": 25_000, "note": "a typical small step output"})
}

/// A finished run of `steps` steps, as its journal.
fn long_journal(steps: u64) -> Vec<Event> {
    let run = RunId::new();
    let mut events = vec![event(
        run,
        0,
        EventKind::RunStarted {
            workflow: "long".into(),
            version: 1,
            input: json!(steps),
            idempotency_key: None,
            started_by: None,
        },
    )];
    for i in 0..steps {
        let p = Position(i as u32);
        events.push(event(
            run,
            events.len() as u64,
            EventKind::StepStarted {
                position: p,
                name: "s".into(),
                attempt: 1,
                args_hash: None,
            },
        ));
        events.push(event(
            run,
            events.len() as u64,
            EventKind::StepCompleted {
                position: p,
                output: output(i),
            },
        ));
    }
    events.push(event(
        run,
        events.len() as u64,
        EventKind::RunCompleted { output: json!(steps) },
    ));
    events
}

/// The runtime the store and engine benches run on: two workers, as the machine's cores.
fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A new run in `store`, its start durable.
fn new_run(rt: &tokio::runtime::Runtime, store: &SledStore) -> RunId {
    rt.block_on(store.create_run(NewRun {
        id: RunId::new(),
        started_by: None,
        workflow: "w".into(),
        version: 1,
        input: json!(null),
        idempotency_key: None,
        at: chrono::Utc::now(),
    }))
    .unwrap()
    .run()
}

/// An external append to `run` at seq `expected`: one `step-completed` per position.
fn completed_steps(run: RunId, expected: u64, positions: std::ops::Range<u64>) -> Append {
    Append {
        run,
        expected: Seq(expected),
        at: chrono::Utc::now(),
        events: positions
            .map(|i| EventKind::StepCompleted {
                position: Position(i as u32),
                output: output(i),
            })
            .collect(),
        lease: None,
    }
}

async fn long(ctx: Ctx, steps: u64) -> Result<u64, Failure> {
    for i in 0..steps {
        ctx.step("s", || async move { Ok(output(i)) }).await?;
    }
    Ok(steps)
}

fn codec_and_fold(c: &mut Criterion) {
    let journal = long_journal(10_000);
    let run = journal[0].run;
    let (record, _) = codec::encode(&journal[2], &ChainHash::GENESIS, 65_536).unwrap();
    let mut g = c.benchmark_group("journal");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode one event", |b| {
        b.iter(|| codec::decode(run, Seq(2), &record, &ChainHash::GENESIS).unwrap())
    });
    g.throughput(Throughput::Elements(journal.len() as u64));
    // `fold` takes the journal by value too (what the engine's decisions do); the copy
    // made for each iteration is outside the measurement.
    g.bench_function("fold 20,002 events", |b| {
        b.iter_batched(|| journal.clone(), fold, BatchSize::LargeInput)
    });
    g.bench_function("fold 20,002 events from a borrowed journal", |b| {
        b.iter(|| fold(&journal))
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = Registry::new().workflow("long", 1, long);
    g.sample_size(10);
    // `replay` takes the journal by value, as the CLI and the engine have it; the copy
    // made for each iteration is outside the measurement.
    g.bench_function("replay a 10,000-step run", |b| {
        b.iter_batched(
            || journal.clone(),
            |owned| rt.block_on(replay(&registry, owned)),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("replay a 10,000-step run from a borrowed journal", |b| {
        b.iter(|| rt.block_on(replay(&registry, &journal)))
    });
    g.finish();
}

fn append(c: &mut Criterion) {
    let rt = two_workers();
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path().join("ours")).unwrap();
    let mut g = c.benchmark_group("append (durable)");
    g.sample_size(10);
    for batch in [1u64, 100] {
        g.throughput(Throughput::Elements(batch));
        g.bench_function(format!("{batch} events"), |b| {
            b.iter_batched(
                || new_run(&rt, &store),
                |run| {
                    rt.block_on(store.append(completed_steps(run, 1, 0..batch)))
                        .unwrap()
                        .unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.throughput(Throughput::Elements(64 * 10));
    g.bench_function("64 concurrent appenders x 10 events", |b| {
        b.iter_batched(
            || (0..64).map(|_| new_run(&rt, &store)).collect::<Vec<_>>(),
            |runs| {
                rt.block_on(async {
                    let tasks: Vec<_> = runs
                        .into_iter()
                        .map(|run| {
                            let store = store.clone();
                            tokio::spawn(async move {
                                for i in 0..10u64 {
                                    store
                                        .append(completed_steps(run, 1 + i, i..i + 1))
                                        .await
                                        .unwrap()
                                        .unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                })
            },
            BatchSize::PerIteration,
        )
    });
    // The baseline: raw sled inserts of the same size, one flush per 100.
    let raw = sled::open(dir.path().join("raw")).unwrap();
    let value = serde_json::to_vec(&output(1)).unwrap();
    let mut n = 0u64;
    g.throughput(Throughput::Elements(100));
    g.bench_function("raw sled: 100 inserts + flush", |b| {
        b.iter(|| {
            for _ in 0..100 {
                n += 1;
                raw.insert(n.to_be_bytes(), value.as_slice()).unwrap();
            }
            raw.flush().unwrap();
        })
    });
    // The same, as the store configures sled (compressed, at the store's default level)
    // and with what it stores: 24-byte keys (a run and a seq) and records as encoded.
    let like = sled::Config::new()
        .path(dir.path().join("raw-like-the-store"))
        .use_compression(true)
        .compression_factor(holdpoint::journal::DEFAULT_COMPRESSION_LEVEL)
        .open()
        .unwrap();
    let record_run = RunId::new();
    let (record, _) = codec::encode(
        &event(
            record_run,
            1,
            EventKind::StepCompleted {
                position: Position(1),
                output: output(1),
            },
        ),
        &ChainHash::GENESIS,
        65_536,
    )
    .unwrap();
    let mut n = 0u64;
    g.bench_function(
        "raw sled as the store configures it: 100 record inserts + flush",
        |b| {
            b.iter(|| {
                for _ in 0..100 {
                    n += 1;
                    like.insert(codec::record_key(record_run, Seq(n)), record.as_slice())
                        .unwrap();
                }
                like.flush().unwrap();
            })
        },
    );
    // The write-ahead log a store of our own would make its commits durable in
    // (`journal::wal`, not yet used by the store): the same records, durable through
    // one pwrite + fdatasync per group, first as the raw baselines above, then as the
    // store's concurrent appenders.
    let (wal, _) = Wal::open(&dir.path().join("wal"), WalOptions::default(), Lsn(0), |_, _| {
        Ok(())
    })
    .unwrap();
    g.throughput(Throughput::Elements(100));
    g.bench_function("write-ahead log: 100 records + sync", |b| {
        b.iter(|| {
            let mut end = Lsn(0);
            for _ in 0..100 {
                end = wal.append(&record).unwrap().end;
            }
            rt.block_on(wal.wait(end)).unwrap();
        })
    });
    let wal = std::sync::Arc::new(wal);
    g.throughput(Throughput::Elements(64 * 10));
    g.bench_function("write-ahead log: 64 concurrent appenders x 10 records", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let wal = wal.clone();
                        let record = record.clone();
                        tokio::spawn(async move {
                            for _ in 0..10 {
                                let end = wal.append(&record).unwrap().end;
                                wal.wait(end).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            })
        })
    });
    g.finish();
}

/// Reading a stored journal through the store (checksums and chain verified): a short
/// one (read by key) and a long one (a range scan).
fn read(c: &mut Criterion) {
    let rt = two_workers();
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut g = c.benchmark_group("read (warm store)");
    for events in [10u64, 200] {
        let run = new_run(&rt, &store);
        for i in 1..events {
            let appended = rt.block_on(store.append(completed_steps(run, i, i..i + 1)));
            appended.unwrap().unwrap();
        }
        g.throughput(Throughput::Elements(events));
        g.bench_function(format!("a {events}-event journal"), |b| {
            b.iter(|| {
                let read = rt.block_on(store.read(run, Seq::ZERO)).unwrap();
                assert_eq!(read.len() as u64, events);
            })
        });
    }
    g.finish();
}

/// A decision to a run waiting at its gate, and the run resumed to its end, on a warm
/// engine with its workers running: the standard workload's phase 2 for one run at a
/// time (`holdpoint bench` measures it loaded). The runs are started and brought to
/// their gates before the clock starts.
fn decide_resume(c: &mut Criterion) {
    let rt = two_workers();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(
        SledStore::open(dir.path()).unwrap(),
        holdpoint::bench::register(Registry::new()),
    )
    .unwrap();
    let _workers = rt.block_on(async { engine.spawn_workers() });
    let mut order = 0u64;
    let mut g = c.benchmark_group("engine (warm)");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    g.bench_function("decide -> resumed to the end", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut runs = Vec::with_capacity(iters as usize);
                for _ in 0..iters {
                    order += 1;
                    let run = engine
                        .start(holdpoint::bench::WORKFLOW, &order, None)
                        .await
                        .unwrap();
                    runs.push(run);
                }
                for &run in &runs {
                    assert_eq!(engine.settled(run).await.unwrap().status, RunStatus::Waiting);
                }
                let mut took = Duration::ZERO;
                for run in runs {
                    let t = Instant::now();
                    engine
                        .decide(run, DecisionRequest::approve(GateId(1), Principal::new("bench")))
                        .await
                        .unwrap();
                    let done = engine.settled(run).await.unwrap();
                    took += t.elapsed();
                    assert_eq!(done.status, RunStatus::Completed);
                }
                took
            })
        })
    });
    g.finish();
}

criterion_group!(benches, codec_and_fold, append, read, decide_resume);
criterion_main!(benches);
