//! `pacer loadtest` against the rig: 8 replicas (each with its own Redis and SQS
//! connections) share the global limiter in Redis and a moto SQS queue, under demand at 3x
//! the limit on 5 s windows. Nothing is lost or generated twice, the provider never
//! answers 429, no window holds more than the limit, and the limit is nearly all used.
use pacer::cli::loadtest::{LoadtestArgs, execute};
use pacer_tests::Rig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_on_redis_and_sqs_stays_under_the_limit_and_loses_nothing() {
    let rig = Rig::load();
    let aws = rig.aws_config().await;
    let queue = rig
        .sqs()
        .await
        .create_queue()
        .queue_name(Rig::unique("loadtest"))
        .send()
        .await
        .expect("creating a moto queue (is the rig up? `tests/rig/up`)")
        .queue_url
        .expect("queue url");
    let out = std::env::temp_dir().join(Rig::unique("pacer-loadtest"));
    let args = LoadtestArgs {
        replicas: 8,
        requests: 240,
        demand: 3.0,
        redis_url: Some(rig.get("REDIS_URL")),
        queue_url: Some(queue),
        // A 5 s window: the limiter's margin is 1/60 of it (83 ms), so calls start well
        // inside it: little simulated latency jitter.
        limits: vec![
            "gemini-3.1-flash-image:rpm=60,ipm=60,window=5"
                .parse()
                .expect("limit"),
        ],
        latency_ms: 200,
        latency_jitter_ms: 200,
        concurrency: 32,
        out: Some(out.join("images").display().to_string()),
        plot: out.join("plot.png"),
        timeout_seconds: 50,
        ..LoadtestArgs::default()
    };
    let started = std::time::Instant::now();
    let r = execute(&args, Some(aws), None)
        .await
        .expect("the load test runs");
    let report = serde_json::to_string_pretty(&r).unwrap_or_default();
    assert_eq!(r.lost, 0, "{report}");
    assert_eq!(r.succeeded, 240, "{report}");
    assert_eq!(r.duplicates, 0, "{report}");
    assert_eq!(r.upstream_429, 0, "{report}");
    assert!(r.max_in_any_window <= 60, "{report}");
    assert!(r.utilization >= 0.85, "{report}");
    assert!(std::fs::metadata(&args.plot).is_ok(), "no plot: {report}");
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(out);
}
