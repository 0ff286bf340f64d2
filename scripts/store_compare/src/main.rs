//! Raw cost of a store commit shaped like Holdpoint's (a ~170-byte record under a
//! 24-byte key, a 110-byte summary, a status key inserted and the previous one removed:
//! four writes) with a durable group commit every G commits, then of reading back a
//! run's four records by point reads, for the vendored sled (compressed as the store
//! configures it), fjall and redb. Prints the process's CPU (user + system) per commit
//! and per journal read.
//!
//! `holdpoint-store-compare ENGINE COMMITS G DIR` (ENGINE: sled, fjall or redb).
use std::time::Instant;

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: holdpoint-store-compare sled|fjall|redb COMMITS G DIR");
        std::process::exit(2);
    }
    let engine = args[1].as_str();
    let n: u64 = args[2].parse().unwrap();
    let g: u64 = args[3].parse().unwrap();
    let dir = std::path::PathBuf::from(&args[4]);
    let _ = std::fs::remove_dir_all(&dir);
    let summary = vec![7u8; 110];
    let (c0, t0) = (cpu(), Instant::now());
    let mut syncs = 0;
    let mut reads: Option<(f64, std::time::Duration)> = None;
    match engine {
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
            for i in 0..n {
                let run = (i / 4).to_be_bytes();
                let mut k = [0u8; 24];
                k[8..16].copy_from_slice(&run);
                k[16..].copy_from_slice(&(i % 4).to_be_bytes());
                ev.insert(k, record(i)).unwrap();
                runs.insert(run, summary.clone()).unwrap();
                let mut sk = [0u8; 9];
                sk[0] = (i % 4) as u8;
                sk[1..].copy_from_slice(&run);
                st.insert(sk, &[]).unwrap();
                if i % 4 > 0 {
                    sk[0] -= 1;
                    st.remove(sk).unwrap();
                }
                if (i + 1) % g == 0 {
                    db.flush().unwrap();
                    syncs += 1;
                }
            }
            db.flush().unwrap();
            let (r0, rt) = (cpu(), Instant::now());
            for j in 0..n / 4 {
                let run = ((j.wrapping_mul(7919)) % (n / 4)).to_be_bytes();
                for s in 0..4u64 {
                    let mut k = [0u8; 24];
                    k[8..16].copy_from_slice(&run);
                    k[16..].copy_from_slice(&s.to_be_bytes());
                    assert!(ev.get(k).unwrap().is_some());
                }
            }
            reads = Some(((cpu() - r0) * 1e6 / (n / 4) as f64, rt.elapsed()));
        }
        "fjall" => {
            let ks = fjall::Config::new(&dir).open().unwrap();
            let opts = || fjall::PartitionCreateOptions::default();
            let (ev, runs, st) = (
                ks.open_partition("events", opts()).unwrap(),
                ks.open_partition("runs", opts()).unwrap(),
                ks.open_partition("status", opts()).unwrap(),
            );
            for i in 0..n {
                let run = (i / 4).to_be_bytes();
                let mut k = [0u8; 24];
                k[8..16].copy_from_slice(&run);
                k[16..].copy_from_slice(&(i % 4).to_be_bytes());
                let mut b = ks.batch();
                b.insert(&ev, k, record(i));
                b.insert(&runs, run, summary.clone());
                let mut sk = [0u8; 9];
                sk[0] = (i % 4) as u8;
                sk[1..].copy_from_slice(&run);
                b.insert(&st, sk, []);
                if i % 4 > 0 {
                    sk[0] -= 1;
                    b.remove(&st, sk);
                }
                b.commit().unwrap();
                if (i + 1) % g == 0 {
                    ks.persist(fjall::PersistMode::SyncAll).unwrap();
                    syncs += 1;
                }
            }
            ks.persist(fjall::PersistMode::SyncAll).unwrap();
            let (r0, rt) = (cpu(), Instant::now());
            for j in 0..n / 4 {
                let run = ((j.wrapping_mul(7919)) % (n / 4)).to_be_bytes();
                for s in 0..4u64 {
                    let mut k = [0u8; 24];
                    k[8..16].copy_from_slice(&run);
                    k[16..].copy_from_slice(&s.to_be_bytes());
                    assert!(ev.get(k).unwrap().is_some());
                }
            }
            reads = Some(((cpu() - r0) * 1e6 / (n / 4) as f64, rt.elapsed()));
        }
        "redb" => {
            use redb::{Durability, TableDefinition};
            const EV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("events");
            const RUNS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("runs");
            const ST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("status");
            std::fs::create_dir_all(&dir).unwrap();
            let db = redb::Database::create(dir.join("db")).unwrap();
            for i in 0..n {
                let run = (i / 4).to_be_bytes();
                let mut k = [0u8; 24];
                k[8..16].copy_from_slice(&run);
                k[16..].copy_from_slice(&(i % 4).to_be_bytes());
                let mut tx = db.begin_write().unwrap();
                let durable = (i + 1) % g == 0;
                tx.set_durability(if durable {
                    Durability::Immediate
                } else {
                    Durability::None
                });
                {
                    let mut ev = tx.open_table(EV).unwrap();
                    ev.insert(&k[..], &record(i)[..]).unwrap();
                    let mut runs = tx.open_table(RUNS).unwrap();
                    runs.insert(&run[..], &summary[..]).unwrap();
                    let mut st = tx.open_table(ST).unwrap();
                    let mut sk = [0u8; 9];
                    sk[0] = (i % 4) as u8;
                    sk[1..].copy_from_slice(&run);
                    st.insert(&sk[..], &[][..]).unwrap();
                    if i % 4 > 0 {
                        sk[0] -= 1;
                        st.remove(&sk[..]).unwrap();
                    }
                }
                tx.commit().unwrap();
                if durable {
                    syncs += 1;
                }
            }
        }
        _ => panic!("engine"),
    }
    let (mut c1, mut t1) = (cpu(), t0.elapsed());
    if let Some((_, rt)) = reads {
        // The write figures exclude the read phase.
        c1 -= reads.unwrap().0 * (n / 4) as f64 / 1e6;
        t1 -= rt;
    }
    let size: u64 = walk(&dir);
    println!(
        "{engine}: {n} commits (4 writes each), {syncs} syncs: {:.2} us CPU per commit, {:.0} commits/s, {:.0} bytes on disk per commit",
        (c1 - c0) * 1e6 / n as f64,
        n as f64 / t1.as_secs_f64(),
        size as f64 / n as f64
    );
    if let Some((us, _)) = reads {
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
