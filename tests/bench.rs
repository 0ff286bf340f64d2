//! The standard workload tool runs end to end and reports sane figures (a smoke test;
//! the figures themselves come from `holdpoint bench` on a quiet machine).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_workload_runs_and_reports() {
    let opts = holdpoint::bench::BenchOptions {
        runs: 60,
        concurrency: 16,
        latency_samples: 5,
        http: false,
        pg: None,
        worker_processes: 0,
        ..Default::default()
    };
    let r = holdpoint::bench::run(&opts)
        .await
        .expect("every run waits at its gate, then completes");
    assert_eq!(r.runs, 60);
    assert_eq!(
        r.events,
        60 * 8,
        "run-started, plan, gate, decision, send, notify x2, completed"
    );
    assert!(r.phase1_runs_per_s > 0.0 && r.phase2_runs_per_s > 0.0);
    assert!(r.fsyncs_per_run.unwrap() > 0.0, "acknowledgements are durable");
    // Phase 1: the creation's mark and `run-started`; `plan`'s `step-started`; its
    // `step-completed` and the gate's `approval-requested` in one packed commit; the
    // pending entry; at the release the summary, the status key and the mark's removal.
    // Phase 2: the decision's mark and record, the pending entry's removal; `notify`'s
    // `step-started`; its `step-completed` and `run-completed` in one commit; at the end
    // the summary, the status key moved (a remove and an insert) and the mark's removal.
    assert_eq!(
        (r.phase1_sled_writes_per_run, r.phase2_sled_writes_per_run),
        (Some(8.0), Some(9.0)),
        "sled writes per run"
    );
    assert!(r.latency_p50_ms <= r.latency_p99_ms && r.latency_p99_ms <= r.latency_max_ms);
    assert!(r.bytes_on_disk_per_run > 0.0);
    // Read from /proc in ticks of 10 ms: a phase this short may round to none.
    let cpu = (r.phase1_cpu_us_per_run, r.phase2_cpu_us_per_run);
    assert!(
        matches!(cpu, (Some(a), Some(b)) if a >= 0.0 && b >= 0.0),
        "{cpu:?}"
    );
    let text = r.to_string();
    assert!(
        text.contains("phase 1")
            && text.contains("decision -> completed")
            && text.contains("process CPU per run")
            && text.contains("sled writes per run"),
        "{text}"
    );
}

/// `--sled-wal`: commits are durable in the store's log. Phase 1 writes nothing to
/// sled: the run's entry keeps its summary, status key, records and pending entry past
/// the release. Phase 2 writes, at the end, the journal as one value, the summary and
/// the status key; the gate's entry never reached sled, so its decision removes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_mode_writes_a_waiting_run_once_it_ends() {
    let opts = holdpoint::bench::BenchOptions {
        runs: 60,
        concurrency: 16,
        latency_samples: 5,
        sled_wal: true,
        ..Default::default()
    };
    let r = holdpoint::bench::run(&opts)
        .await
        .expect("every run waits at its gate, then completes");
    assert_eq!(r.events, 60 * 8);
    assert_eq!(
        (r.phase1_sled_writes_per_run, r.phase2_sled_writes_per_run),
        (Some(0.0), Some(3.0)),
        "sled writes per run"
    );
}

/// `--idempotent-steps` runs the same workflow with its steps' starts journaled with
/// their results: the same events, and the report says which variant ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotent_steps_variant_journals_the_same_events() {
    let opts = holdpoint::bench::BenchOptions {
        runs: 40,
        concurrency: 8,
        latency_samples: 3,
        idempotent_steps: true,
        ..Default::default()
    };
    let r = holdpoint::bench::run(&opts)
        .await
        .expect("every run waits at its gate, then completes");
    assert!(r.idempotent_steps);
    assert_eq!(r.events, 40 * 8);
    assert!(r.to_string().contains("idempotent steps"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_variant_decides_through_real_requests() {
    let opts = holdpoint::bench::BenchOptions {
        runs: 40,
        concurrency: 8,
        latency_samples: 3,
        http: true,
        pg: None,
        worker_processes: 0,
        ..Default::default()
    };
    let r = holdpoint::bench::run_median(&opts, 2)
        .await
        .expect("runs started and approved over HTTP all complete");
    assert_eq!((r.api, r.repeats), ("http", 2));
    assert_eq!(r.events, 40 * 8);
    // The medians of figures only some stores give are kept.
    assert_eq!(
        (r.phase1_sled_writes_per_run, r.phase2_sled_writes_per_run),
        (Some(8.0), Some(9.0)),
        "the same writes as through the engine API"
    );
    assert!(r.fsyncs_per_run.is_some() && r.live_bytes_per_run.is_some());
    assert!(r.to_string().contains("http API") && r.to_string().contains("median of 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_runs_survive_a_restart_and_page_from_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let filled = holdpoint::bench::fill_waiting(dir.path(), 120, 32, false)
        .await
        .unwrap();
    assert_eq!(filled, 120);
    // A second fill adds to the first.
    let filled = holdpoint::bench::fill_waiting(dir.path(), 30, 32, false)
        .await
        .unwrap();
    assert_eq!(filled, 150);
    let r = holdpoint::bench::restart(dir.path(), std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r.waiting_runs, 150);
    assert!(r.startup_ms > 0.0 && r.pending_first_ms > 0.0 && r.peak_rss_mib > 0.0);
    // Read from /proc: the peak is never below what is resident now.
    assert!(
        r.serving_rss_mib > 0.0 && r.serving_rss_mib <= r.peak_rss_mib,
        "{r:?}"
    );
}

/// `--fill-waiting --sled-wal`: the directory is made with its write-ahead log, and the
/// restart opens it that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_runs_filled_with_the_log_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let filled = holdpoint::bench::fill_waiting(dir.path(), 60, 32, true)
        .await
        .unwrap();
    assert_eq!(filled, 60);
    assert!(dir.path().join("wal").is_dir(), "made with its log");
    let r = holdpoint::bench::restart(dir.path(), std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r.waiting_runs, 60);
}
