//! `pacer bench limiter` on the rig's Redis Cluster next to its single Redis: 32 (project,
//! model) pairs spread over the three primaries, no pair over its limit, and Redis's CPU per
//! decision reported for both. Checks the report's fields and exactness, not timings (the
//! figures are printed; the README gives them from a longer run).
use pacer_tests::{Rig, pacer_bin};

#[test]
fn bench_on_a_cluster_spreads_pairs_and_reports_cpu_per_decision() {
    let rig = Rig::load();
    let out = std::process::Command::new(pacer_bin())
        .args(["bench", "limiter", "--keys", "32", "--clients", "32"])
        .args(["--duration", "3", "--window", "1", "--rpm", "50", "--json"])
        .arg("--redis-url")
        .arg(rig.get("REDIS_CLUSTER_URL"))
        .arg("--compare-redis-url")
        .arg(rig.get("REDIS_URL"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pacer bench limiter");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pacer bench limiter failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON report");
    let c = &r["compared"];
    assert_eq!(r["limiter"], "redis-cluster", "{r}");
    assert_eq!(c["limiter"], "redis", "{r}");
    for (name, run) in [("cluster", &r), ("single", c)] {
        assert_eq!(run["keys"], 32, "{name}: {r}");
        assert_eq!(
            run["keys_over_limit"], 0,
            "{name}: a pair over its limit: {r}"
        );
        assert_eq!(run["errors"], 0, "{name}: {r}");
        assert!(
            run["decisions"].as_u64().is_some_and(|d| d > 0),
            "{name}: {r}"
        );
        assert!(
            run["redis"]["cpu_us_per_decision"]
                .as_f64()
                .is_some_and(|us| us > 0.0),
            "{name}: no CPU per decision: {r}"
        );
    }
    assert_eq!(r["redis"]["cluster"], true, "{r}");
    assert_eq!(c["redis"]["cluster"], false, "{r}");
    let primaries = r["redis"]["primaries"].as_array().expect("primaries");
    assert_eq!(primaries.len(), 3, "three primaries: {r}");
    let placed: Vec<u64> = primaries
        .iter()
        .map(|p| p["keys"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(placed.iter().sum::<u64>(), 32, "every pair placed: {r}");
    assert!(
        placed.iter().all(|n| *n > 0),
        "pairs on every primary: {placed:?}"
    );
    assert!(
        r["cpu_ratio"].as_f64().is_some_and(|x| x > 0.0),
        "no CPU ratio: {r}"
    );
}
