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
