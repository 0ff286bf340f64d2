//! The standard workload tool runs end to end and reports sane figures (a smoke test;
//! the figures themselves come from `holdpoint bench` on a quiet machine).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_workload_runs_and_reports() {
    let opts = holdpoint::bench::BenchOptions {
        runs: 60,
        concurrency: 16,
        latency_samples: 5,
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
    assert!(r.fsyncs_per_run > 0.0, "acknowledgements are durable");
    assert!(r.latency_p50_ms <= r.latency_p99_ms && r.latency_p99_ms <= r.latency_max_ms);
    assert!(r.bytes_on_disk_per_run > 0.0);
    let text = r.to_string();
    assert!(
        text.contains("phase 1") && text.contains("decision -> completed"),
        "{text}"
    );
}
