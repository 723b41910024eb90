//! The rig's Redis is real: a Lua script runs on it and reads its clock.
use pacer_tests::Rig;

#[tokio::test]
async fn eval_reads_redis_time() {
    let mut redis = Rig::load().redis().await;
    let (secs, micros): (i64, i64) =
        redis::Script::new("local t = redis.call('TIME') return {tonumber(t[1]), tonumber(t[2])}")
            .invoke_async(&mut redis)
            .await
            .expect("EVAL of a script calling TIME");
    let local = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    assert!(
        (secs - local).abs() < 5,
        "Redis time {secs} is far from local time {local}"
    );
    assert!((0..1_000_000).contains(&micros));
}

/// A configuration watcher asked to check now sees a version written a moment ago at once,
/// though its own poll is an hour away (a Lambda sandbox thawed after a freeze).
#[tokio::test]
async fn a_config_refresh_sees_a_new_version_at_once() {
    use pacer_core::config::ConfigStore;
    use std::time::Duration;
    let rig = Rig::load();
    let url = rig.get("REDIS_URL");
    let store = ConfigStore::connect(&url).await.expect("redis");
    let (config, refresh) = store.watch(Duration::from_secs(3600)).await.expect("watch");
    let before = config.borrow().version;
    let ns = Rig::unique("refresh");
    rig.apply_config(&pacer_tests::single_model_config(
        &ns,
        "gemini-3-pro-image",
        10,
        10,
        5,
    ))
    .await;
    assert_eq!(
        config.borrow().version,
        before,
        "the hourly poll has not run"
    );
    refresh.now(Duration::from_secs(5)).await;
    let after = config.borrow().clone();
    assert!(
        after.version > before,
        "version {} after {before}",
        after.version
    );
    assert!(after.chains.contains_key(&format!("{ns}/chain")));
}
