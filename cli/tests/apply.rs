//! `pacer apply` on the rig's Redis: an unchanged document writes no new version, and a
//! lowered limit is applied to the limiter at once (bookings it no longer holds are
//! released before their holders call).
use std::{process::Command, time::Duration};

use pacer_core::{
    config::ConfigStore,
    limiter::{Check, Limiter, QuotaKey, redis::RedisLimiter},
    quota::Costs,
};
use pacer_tests::{Rig, single_model_config};

const MODEL: &str = "gemini-3-pro-image";

fn apply(redis_url: &str, yaml: &str) -> String {
    let file = std::env::temp_dir()
        .join(Rig::unique("pacer-apply"))
        .with_extension("yaml");
    std::fs::write(&file, yaml).expect("write the YAML");
    let out = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .args(["apply", "-f"])
        .arg(&file)
        .args(["--redis-url", redis_url])
        .output()
        .expect("run pacer apply");
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pacer apply failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn apply_skips_unchanged_documents_and_applies_a_lowered_limit_at_once() {
    let rig = Rig::load();
    let url = rig.get("REDIS_URL");
    let ns = Rig::unique("apply");
    let out = apply(&url, &single_model_config(&ns, MODEL, 4, 60, 60));
    assert!(out.contains("configured"), "{out}");
    let store = ConfigStore::connect(&url).await.expect("redis");
    let version = store.load().await.expect("load").version;
    let out = apply(&url, &single_model_config(&ns, MODEL, 4, 60, 60));
    assert!(
        out.contains(&format!("quotapool/{ns}/pool unchanged")),
        "{out}"
    );
    assert_eq!(store.load().await.expect("load").version, version);

    // Eight bookings under 4 per minute: four now, four a window ahead; then the limit
    // goes to 2.
    let config = store.load().await.expect("load");
    let quota = config.pools[&format!("{ns}/pool")]
        .model_quota(MODEL)
        .expect("quota");
    let limiter = RedisLimiter::connect(&url, Default::default())
        .await
        .expect("limiter");
    let key = QuotaKey::new(&ns, MODEL);
    let mut tickets = Vec::new();
    for i in 0..8 {
        let d = limiter
            .acquire(
                &key,
                &quota,
                &format!("b{i}"),
                Costs::new(1, 0, 1, 0),
                Duration::from_secs(300),
            )
            .await
            .expect("acquire");
        tickets.push(d.ticket().expect("booked").clone());
    }
    apply(&url, &single_model_config(&ns, MODEL, 2, 60, 60));
    // Nobody acquired since: the apply itself released what 2 per minute does not hold.
    let mut lost = 0;
    for t in &tickets {
        if matches!(
            limiter.check(t).await.expect("check"),
            Check::Cancelled { .. }
        ) {
            lost += 1;
        }
    }
    assert_eq!(
        lost, 2,
        "two of the four bookings ahead released by the apply"
    );
}
