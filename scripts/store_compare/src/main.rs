//! Raw cost of a store commit shaped like Holdpoint's (a ~170-byte record under a
//! 24-byte key, a 110-byte summary, a status key inserted and the previous one removed:
//! four writes) with a durable group commit every G commits, then of reading back a
//! run's four records by point reads, for the vendored sled (compressed as the store
//! configures it), fjall and redb. Prints the process's CPU (user + system) per commit
//! and per journal read.
//!
//! `holdpoint-store-compare ENGINE COMMITS G DIR` (ENGINE: sled, fjall or redb).
use std::time::{Duration, Instant};

/// Commits per run: a run's four records, one per commit.
const PER_RUN: u64 = 4;

fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn record(i: u64) -> Vec<u8> {
    format!(
        "{{\"type\":\"step-completed\",\"position\":{},\"output\":{{\"order\":{},\"amount_cents\":25000,\"note\":\"a typical small step output\"}},\"prev\":\"{:064x}\"}}",
        i % 7, i, i.wrapping_mul(0x9E3779B97F4A7C15)
    )
    .into_bytes()
}

/// What commit `i` writes: its run's key, its record's key, the status key it inserts
/// and the one it removes (none for a run's first commit).
struct Keys {
    run: [u8; 8],
    record: [u8; 24],
    status: [u8; 9],
    old_status: Option<[u8; 9]>,
}

fn record_key(run: u64, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[8..16].copy_from_slice(&run.to_be_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn keys(i: u64) -> Keys {
    let (run, seq) = (i / PER_RUN, i % PER_RUN);
    let status = |s: u64| {
        let mut k = [0u8; 9];
        k[0] = s as u8;
        k[1..].copy_from_slice(&run.to_be_bytes());
        k
    };
    Keys {
        run: run.to_be_bytes(),
        record: record_key(run, seq),
        status: status(seq),
        old_status: (seq > 0).then(|| status(seq - 1)),
    }
}

/// Reads every run's records back, runs in a scattered order, through `found`; returns
/// the CPU per run's journal, in µs.
fn read_journals(n: u64, mut found: impl FnMut(&[u8; 24]) -> bool) -> f64 {
    let runs = n / PER_RUN;
    let c0 = cpu();
    for j in 0..runs {
        let run = j.wrapping_mul(7919) % runs;
        for seq in 0..PER_RUN {
            assert!(found(&record_key(run, seq)));
        }
    }
    (cpu() - c0) * 1e6 / runs as f64
}

/// What one engine's run measured.
struct Measured {
    syncs: u64,
    /// CPU and wall time of the writes.
    writes: (f64, Duration),
    /// CPU per journal read, in µs.
    reads: Option<f64>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: holdpoint-store-compare sled|fjall|redb COMMITS G DIR");
        std::process::exit(2);
    };
    if args.len() != 5 {
        usage();
    }
    let engine = args[1].as_str();
    let n: u64 = args[2].parse().unwrap();
    let g: u64 = args[3].parse().unwrap();
    let dir = std::path::PathBuf::from(&args[4]);
    let _ = std::fs::remove_dir_all(&dir);
    let summary = vec![7u8; 110];
    let (c0, t0) = (cpu(), Instant::now());
    let written = || (cpu() - c0, t0.elapsed());
    let m = match engine {
        "sled" => {
            let db = sled::Config::new()
                .path(&dir)
                .use_compression(true)
                .compression_factor(-3)
                .flush_every_ms(Some(20))
                .open()
                .unwrap();
            let (ev, runs, st) = (
                db.open_tree("events").unwrap(),
                db.open_tree("runs").unwrap(),
                db.open_tree("status").unwrap(),
            );
            let mut syncs = 0;
            for i in 0..n {
                let k = keys(i);
                ev.insert(k.record, record(i)).unwrap();
                runs.insert(k.run, summary.clone()).unwrap();
                st.insert(k.status, &[]).unwrap();
                if let Some(old) = k.old_status {
                    st.remove(old).unwrap();
                }
                if (i + 1) % g == 0 {
                    db.flush().unwrap();
                    syncs += 1;
                }
            }
            db.flush().unwrap();
            let writes = written();
            let reads = read_journals(n, |k| ev.get(k).unwrap().is_some());
            Measured {
                syncs,
                writes,
                reads: Some(reads),
            }
        }
        "fjall" => {
            let ks = fjall::Config::new(&dir).open().unwrap();
            let opts = || fjall::PartitionCreateOptions::default();
            let (ev, runs, st) = (
                ks.open_partition("events", opts()).unwrap(),
                ks.open_partition("runs", opts()).unwrap(),
                ks.open_partition("status", opts()).unwrap(),
            );
            let mut syncs = 0;
            for i in 0..n {
                let k = keys(i);
                let mut b = ks.batch();
                b.insert(&ev, k.record, record(i));
                b.insert(&runs, k.run, summary.clone());
                b.insert(&st, k.status, []);
                if let Some(old) = k.old_status {
                    b.remove(&st, old);
                }
                b.commit().unwrap();
                if (i + 1) % g == 0 {
                    ks.persist(fjall::PersistMode::SyncAll).unwrap();
                    syncs += 1;
                }
            }
            ks.persist(fjall::PersistMode::SyncAll).unwrap();
            let writes = written();
            let reads = read_journals(n, |k| ev.get(k).unwrap().is_some());
            Measured {
                syncs,
                writes,
                reads: Some(reads),
            }
        }
        "redb" => {
            use redb::{Durability, TableDefinition};
            const EV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("events");
            const RUNS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("runs");
            const ST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("status");
            std::fs::create_dir_all(&dir).unwrap();
            let db = redb::Database::create(dir.join("db")).unwrap();
            let mut syncs = 0;
            for i in 0..n {
                let k = keys(i);
                let mut tx = db.begin_write().unwrap();
                let durable = (i + 1) % g == 0;
                tx.set_durability(if durable {
                    Durability::Immediate
                } else {
                    Durability::None
                });
                {
                    let mut ev = tx.open_table(EV).unwrap();
                    ev.insert(&k.record[..], &record(i)[..]).unwrap();
                    let mut runs = tx.open_table(RUNS).unwrap();
                    runs.insert(&k.run[..], &summary[..]).unwrap();
                    let mut st = tx.open_table(ST).unwrap();
                    st.insert(&k.status[..], &[][..]).unwrap();
                    if let Some(old) = k.old_status {
                        st.remove(&old[..]).unwrap();
                    }
                }
                tx.commit().unwrap();
                if durable {
                    syncs += 1;
                }
            }
            Measured {
                syncs,
                writes: written(),
                reads: None,
            }
        }
        _ => usage(),
    };
    let (cpu_s, wall) = m.writes;
    println!(
        "{engine}: {n} commits (4 writes each), {} syncs: {:.2} us CPU per commit, {:.0} commits/s, {:.0} bytes on disk per commit",
        m.syncs,
        cpu_s * 1e6 / n as f64,
        n as f64 / wall.as_secs_f64(),
        walk(&dir) as f64 / n as f64
    );
    if let Some(us) = m.reads {
        println!("{engine}: {us:.2} us CPU to read one 4-record journal (point reads)");
    }
}

fn walk(p: &std::path::Path) -> u64 {
    let mut t = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            t += if m.is_dir() { walk(&e.path()) } else { m.len() };
        }
    }
    t
}
