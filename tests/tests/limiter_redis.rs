//! The Redis limiter on a real Redis: the rig's for most tests, each run twice, on the
//! single server and on the three-primary Cluster (`name::single`, `name::cluster`); a
//! private `redis-server` for the restart tests (so it can be killed without disturbing
//! the rig; a cluster primary lost is the failover test's, in `cluster_failover.rs`).
use pacer_core::measure::max_in_window;
use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use pacer_core::connection::RedisConnection;
use pacer_core::{
    limiter::{
        Asker, Blocker, Check, Decision, FixedDays, Limiter, ListedDays, PenaltyScope, QuotaKey,
        redis::{RedisLimiter, RedisOptions},
    },
    quota::{Costs, Dim, DimensionQuota, ModelQuota, TenantShare},
};
use pacer_tests::{RedisKind, Rig, free_port};

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A key no other test (or earlier run) uses.
fn fresh_key(name: &str) -> QuotaKey {
    QuotaKey::new(format!("test-{name}-{}", now_us()), "gemini-3-pro-image")
}

async fn connect(url: &str) -> RedisLimiter {
    RedisLimiter::connect(url, RedisOptions::default())
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to Redis at {url} ({e}); start the rig with `tests/rig/up`")
        })
}

async fn rig_limiter(kind: RedisKind) -> (String, RedisLimiter) {
    let url = Rig::load().redis_url(kind);
    assert_eq!(
        raw(&url).await.is_cluster(),
        kind == RedisKind::Cluster,
        "{url} is not the kind of Redis the rig says ({kind:?})"
    );
    let l = connect(&url).await;
    (url, l)
}

fn quota(
    rpm: Option<u64>,
    tpm: Option<u64>,
    window: Duration,
    margin: Option<Duration>,
) -> ModelQuota {
    ModelQuota {
        margin,
        ..ModelQuota::requests_and_tokens(rpm, tpm, window)
    }
}

fn req(tokens: u64) -> Costs {
    Costs::new(1, tokens, 1, 0)
}

/// One admitted request: its booked start (Redis clock), when it actually started (local
/// clock, after sleeping the wait), and its costs.
#[derive(Debug, Clone, Copy)]
struct Started {
    booked_us: i64,
    arrived_us: i64,
    costs: Costs,
}

/// `clients` callers, each with its own connection, hammering one key until `until`. With
/// `give_back`, every 4th booking is released instead of called and every 3rd call is
/// reconciled to a third of its tokens: the room they give back is taken at once by
/// other callers (the limiter's exception to its queue), under the same limits.
async fn hammer(
    urls: Vec<String>,
    key: QuotaKey,
    q: ModelQuota,
    until: Instant,
    max_wait: Duration,
    give_back: bool,
) -> (Vec<Started>, u64) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (c, url) in urls.into_iter().enumerate() {
        let (key, q, out, errors) = (key.clone(), q.clone(), out.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let l = connect(&url).await;
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let tokens = 200 + (n * 7919 + c as u64 * 104_729) % 1_600; // lumpy
                match l
                    .acquire(&key, &q, &format!("c{c}-{n}"), req(tokens), max_wait)
                    .await
                {
                    Ok(d @ (Decision::Admitted { .. } | Decision::Booked { .. })) => {
                        let wait = d.wait().unwrap_or_default();
                        tokio::time::sleep(wait).await;
                        let t = d.ticket().expect("ticket");
                        let mut costs = t.costs;
                        if give_back && n.is_multiple_of(4) {
                            l.release(t).await.expect("release");
                            continue;
                        }
                        if give_back && n.is_multiple_of(3) {
                            costs.input_tokens /= 3;
                            l.reconcile(t, costs).await.expect("reconcile");
                        }
                        out.lock().expect("lock").push(Started {
                            booked_us: t.start_us,
                            arrived_us: now_us(),
                            costs,
                        });
                    }
                    Ok(Decision::Rejected { retry_after, .. }) => {
                        let pause = retry_after.unwrap_or(Duration::from_millis(50));
                        tokio::time::sleep(pause.min(Duration::from_millis(50))).await;
                    }
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let started = out.lock().expect("lock").clone();
    (started, errors.load(std::sync::atomic::Ordering::Relaxed))
}

fn check_limits(started: &[Started], q: &ModelQuota, what: &str) {
    for dim in [Dim::Requests, Dim::InputTokens] {
        let Some(limit) = q.dim(dim).limit else {
            continue;
        };
        let booked: Vec<_> = started
            .iter()
            .map(|s| (s.booked_us, s.costs.get(dim) as i64))
            .collect();
        let max = max_in_window(&booked, q.effective_window_us(dim));
        assert!(
            max <= limit as i64,
            "{what}: {dim:?} booked {max} > {limit} in one window"
        );
        // The provider counts at arrival, in windows without our margin.
        let arrived: Vec<_> = started
            .iter()
            .map(|s| (s.arrived_us, s.costs.get(dim) as i64))
            .collect();
        let w = q.dim(dim).window.as_micros() as i64;
        let max = max_in_window(&arrived, w);
        assert!(
            max <= limit as i64,
            "{what}: {dim:?} arrived {max} > {limit} in one window"
        );
    }
}

/// 48 clients on one fresh key for 7 s, 40 requests and 30 000 tokens per 2 s: what they
/// started, every window checked against every limit, booked and at arrival.
async fn hammer_48(kind: RedisKind, name: &str, give_back: bool) -> (Vec<Started>, Duration) {
    let (url, _) = rig_limiter(kind).await;
    let key = fresh_key(name);
    let window = Duration::from_secs(2);
    let q = quota(
        Some(40),
        Some(30_000),
        window,
        Some(Duration::from_millis(150)),
    );
    let until = Instant::now() + Duration::from_secs(7);
    let (started, errors) = hammer(vec![url; 48], key, q.clone(), until, window, give_back).await;
    assert_eq!(errors, 0, "no Redis errors expected");
    check_limits(&started, &q, name);
    (started, window)
}

async fn many_concurrent_connections_stay_under_every_limit(kind: RedisKind) {
    let (started, window) = hammer_48(kind, "concurrent", false).await;
    // Used nearly all of the binding limit (tokens or requests) over the full windows.
    let t0 = started
        .iter()
        .map(|s| s.booked_us)
        .min()
        .expect("some admitted");
    let w = window.as_micros() as i64;
    let full: Vec<_> = started
        .iter()
        .filter(|s| s.booked_us >= t0 + w && s.booked_us < t0 + 3 * w)
        .collect();
    let reqs = full.len() as f64 / 80.0;
    let toks = full.iter().map(|s| s.costs.input_tokens).sum::<u64>() as f64 / 60_000.0;
    assert!(
        reqs.max(toks) >= 0.9,
        "utilization: requests {reqs:.3}, tokens {toks:.3}"
    );
}

/// The same with bookings given back (released, reconciled lower) all along: the room is
/// taken at once, every window still within every limit, by booked start and at arrival.
async fn room_given_back_under_concurrency_stays_under_every_limit(kind: RedisKind) {
    let (started, _) = hammer_48(kind, "given-back-concurrent", true).await;
    assert!(started.len() > 80, "{} calls", started.len());
}

async fn same_request_id_returns_same_ticket(kind: RedisKind) {
    let (_, l) = rig_limiter(kind).await;
    let key = fresh_key("idem");
    let q = quota(Some(1), None, Duration::from_secs(30), None);
    let a = l
        .acquire(&key, &q, "a", req(1), Duration::from_secs(60))
        .await
        .expect("a");
    let b = l
        .acquire(&key, &q, "b", req(1), Duration::from_secs(60))
        .await
        .expect("b");
    let b2 = l
        .acquire(&key, &q, "b", req(1), Duration::from_secs(60))
        .await
        .expect("b again");
    assert!(matches!(a, Decision::Admitted { .. }), "{a:?}");
    assert!(matches!(b, Decision::Booked { .. }), "{b:?}");
    assert_eq!(b.ticket(), b2.ticket());
}

async fn script_flush_reloads_and_keeps_state(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let key = fresh_key("flush");
    let q = quota(Some(1), None, Duration::from_secs(30), None);
    assert!(matches!(
        l.acquire(&key, &q, "a", req(1), Duration::ZERO)
            .await
            .expect("a"),
        Decision::Admitted { .. }
    ));
    // On a cluster SCRIPT FLUSH reaches every node.
    let mut raw = raw(&url).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .expect("SCRIPT FLUSH");
    let d = l
        .acquire(&key, &q, "b", req(1), Duration::ZERO)
        .await
        .expect("reloaded after NOSCRIPT");
    assert_eq!(
        d.blocker(),
        Some(Blocker::Dimension(Dim::Requests)),
        "state survives a script flush: {d:?}"
    );
}

async fn cooldown_is_shared_between_two_clients(kind: RedisKind) {
    let (url, a) = rig_limiter(kind).await;
    let b = connect(&url).await;
    let key = fresh_key("cooldown");
    let q = quota(Some(100), None, Duration::from_secs(60), None);
    a.penalize(&key, Duration::from_secs(2), PenaltyScope::PerMinute)
        .await
        .expect("penalize");
    let d = b
        .acquire(&key, &q, "x", req(1), Duration::ZERO)
        .await
        .expect("acquire");
    match d {
        Decision::Rejected {
            retry_after: Some(r),
            blocking: Blocker::Cooldown,
        } => {
            assert!(
                r > Duration::from_millis(1500) && r <= Duration::from_secs(2),
                "{r:?}"
            )
        }
        other => panic!("expected a cooldown: {other:?}"),
    }
    let d = b
        .acquire(&key, &q, "x", req(1), Duration::from_secs(3))
        .await
        .expect("acquire");
    assert!(
        matches!(d, Decision::Booked { .. }),
        "booked after the cooldown: {d:?}"
    );
    // A per-day 429 blocks every client until the (test) midnight.
    let key = fresh_key("perday");
    let days = Arc::new(FixedDays {
        origin_us: now_us(),
        day_us: 3_000_000,
    });
    let a = a.with_calendar(days.clone());
    let b = b.with_calendar(days);
    a.penalize(&key, Duration::from_secs(1), PenaltyScope::PerDay)
        .await
        .expect("penalize");
    let d = b
        .acquire(&key, &q, "y", req(1), Duration::ZERO)
        .await
        .expect("acquire");
    assert_eq!(d.blocker(), Some(Blocker::Daily), "{d:?}");
}

async fn reconcile_and_release_free_capacity(kind: RedisKind) {
    let (_, l) = rig_limiter(kind).await;
    let key = fresh_key("reconcile");
    let q = quota(Some(2), Some(100), Duration::from_secs(60), None);
    let a = l
        .acquire(&key, &q, "a", req(100), Duration::ZERO)
        .await
        .expect("a");
    let ta = a.ticket().expect("admitted").clone();
    let b = l
        .acquire(&key, &q, "b", req(50), Duration::ZERO)
        .await
        .expect("b");
    assert_eq!(
        b.blocker(),
        Some(Blocker::Dimension(Dim::InputTokens)),
        "{b:?}"
    );
    l.reconcile(&ta, req(40)).await.expect("reconcile");
    let b = l
        .acquire(&key, &q, "b", req(50), Duration::ZERO)
        .await
        .expect("b");
    let tb = b.ticket().expect("admitted after reconcile").clone();
    let c = l
        .acquire(&key, &q, "c", req(1), Duration::ZERO)
        .await
        .expect("c");
    assert_eq!(
        c.blocker(),
        Some(Blocker::Dimension(Dim::Requests)),
        "{c:?}"
    );
    l.release(&tb).await.expect("release");
    let c = l
        .acquire(&key, &q, "c", req(1), Duration::ZERO)
        .await
        .expect("c");
    assert!(matches!(c, Decision::Admitted { .. }), "{c:?}");
    let u = l.usage(&key, &q).await.expect("usage");
    assert_eq!((u.dimensions[0].used, u.dimensions[1].used), (2, 41));
}

async fn daily_quota_rolls_over_on_short_days(kind: RedisKind) {
    let (_, l) = rig_limiter(kind).await;
    let key = fresh_key("day");
    let day = 1_500_000;
    let l = l.with_calendar(Arc::new(FixedDays {
        origin_us: now_us() + 300_000,
        day_us: day,
    }));
    let mut q = quota(None, None, Duration::from_secs(1), Some(Duration::ZERO));
    q.requests_per_day = Some(2);
    tokio::time::sleep(Duration::from_millis(350)).await; // a day has just begun
    for id in ["a", "b"] {
        let d = l
            .acquire(&key, &q, id, req(1), Duration::ZERO)
            .await
            .expect("acquire");
        assert!(matches!(d, Decision::Admitted { .. }), "{d:?}");
    }
    let d = l
        .acquire(&key, &q, "c", req(1), Duration::ZERO)
        .await
        .expect("acquire");
    let Decision::Rejected {
        retry_after: Some(r),
        blocking: Blocker::Daily,
    } = d
    else {
        panic!("expected the day spent: {d:?}")
    };
    assert!(r <= Duration::from_micros(day as u64), "{r:?}");
    tokio::time::sleep(r + Duration::from_millis(20)).await;
    let d = l
        .acquire(&key, &q, "c", req(1), Duration::ZERO)
        .await
        .expect("acquire");
    assert!(matches!(d, Decision::Admitted { .. }), "a new day: {d:?}");
}

async fn daily_quota_follows_compressed_pacific_dst_days(kind: RedisKind) {
    // Real Pacific day starts around the November 2026 DST change (24 h, 25 h, 24 h days),
    // replayed with one hour lasting 40 ms so the script picks days by Redis time.
    use pacer_core::limiter::{Calendar, PacificCalendar};
    let at: i64 = 1_793_430_000_000_000; // 2026-10-31T06:20Z, in Oct 30 (PDT)
    let real = PacificCalendar.boundaries(at);
    let hour = 3_600_000_000i64;
    let origin = now_us() + 200_000;
    let scaled: Vec<i64> = real
        .iter()
        .map(|b| origin + (b - real[0]) / hour * 40_000)
        .collect();
    assert_eq!(
        scaled[2] - scaled[1],
        25 * 40_000,
        "1 November is 25 hours long"
    );
    let (_, l) = rig_limiter(kind).await;
    let l = l.with_calendar(Arc::new(ListedDays(scaled.clone())));
    let key = fresh_key("dst");
    let mut q = quota(None, None, Duration::from_secs(1), Some(Duration::ZERO));
    q.requests_per_day = Some(1);
    // Wait until the 25-hour day has begun.
    tokio::time::sleep(Duration::from_micros(
        (scaled[1] - now_us() + 10_000).max(0) as u64,
    ))
    .await;
    assert!(matches!(
        l.acquire(&key, &q, "a", req(1), Duration::ZERO)
            .await
            .expect("a"),
        Decision::Admitted { .. }
    ));
    let d = l
        .acquire(&key, &q, "b", req(1), Duration::ZERO)
        .await
        .expect("b");
    let Decision::Rejected {
        retry_after: Some(r),
        blocking: Blocker::Daily,
    } = d
    else {
        panic!("{d:?}")
    };
    let expected = scaled[2] - now_us();
    assert!(
        (r.as_micros() as i64 - expected).abs() < 30_000,
        "day ends after 25 h: {r:?} vs {expected} µs"
    );
}

/// A private redis-server this test may kill and restart.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): install it with tests/rig/install")
            });
        let r = PrivateRedis {
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "private redis-server on {port} did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_mid_run_never_exceeds_the_limit() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let url = redis.url();
    let key = fresh_key("restart");
    let window = Duration::from_secs(2);
    let q = quota(Some(30), None, window, Some(Duration::from_millis(100)));
    let until = Instant::now() + Duration::from_secs(8);
    let run = tokio::spawn(hammer(
        vec![url; 16],
        key,
        q.clone(),
        until,
        Duration::from_millis(100),
        false,
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.kill(); // state lost: nothing persisted
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _redis = PrivateRedis::start(port);
    let (started, errors) = run.await.expect("hammer");
    assert!(errors > 0, "the restart was noticed");
    check_limits(&started, &q, "across a restart");
    let after = started
        .iter()
        .filter(|s| s.arrived_us > now_us() - 2_000_000)
        .count();
    assert!(after > 0, "requests were admitted again after the restart");
}

/// Raw commands by key, on either Redis (routed to the key's primary on a cluster).
async fn raw(url: &str) -> RedisConnection {
    pacer_tests::redis_at(url).await
}

fn ticket_of(d: &Decision) -> pacer_core::limiter::Ticket {
    d.ticket()
        .unwrap_or_else(|| panic!("expected a ticket: {d:?}"))
        .clone()
}

/// A fence starts from when the loss was found (what had started by then may have been
/// called), a few ms after the last booking here: `start` lies within a second after
/// `earliest`, never before it and nowhere near the longest window.
fn assert_within_a_second_after(start: i64, earliest: i64, what: &str) {
    assert!(
        start >= earliest && start < earliest + 1_000_000,
        "{what}: starts {} µs after the earliest allowed {earliest}",
        start - earliest
    );
}

/// A booking belongs to one delivery: once its start has passed, the same id books afresh
/// and both entries count; reconcile and release reach the entry they name.
async fn same_request_id_books_afresh_once_its_start_has_passed(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let key = fresh_key("redeliver");
    let window = Duration::from_secs(30);
    let q = quota(Some(1), None, window, None);
    let w = q.effective_window_us(Dim::Requests);
    let a1 = l
        .acquire(&key, &q, "a", req(1), Duration::from_secs(120))
        .await
        .expect("a");
    assert!(matches!(a1, Decision::Admitted { .. }), "{a1:?}");
    let t1 = ticket_of(&a1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let a2 = l
        .acquire(&key, &q, "a", req(1), Duration::from_secs(120))
        .await
        .expect("a again");
    let t2 = ticket_of(&a2);
    assert_eq!(t2.start_us, t1.start_us + w, "a new entry: {a2:?}");
    let mut conn = raw(&url).await;
    let n: u64 = redis::cmd("ZCARD")
        .arg(key.log_key())
        .query_async(&mut conn)
        .await
        .expect("ZCARD");
    assert_eq!(n, 2, "one log entry per booking");
    // Releasing the first booking leaves the second in place.
    l.release(&t1).await.expect("release");
    let b = l
        .acquire(&key, &q, "b", req(1), Duration::from_secs(120))
        .await
        .expect("b");
    assert_eq!(ticket_of(&b).start_us, t2.start_us + w, "{b:?}");
    let again = l
        .acquire(&key, &q, "a", req(1), Duration::from_secs(120))
        .await
        .expect("a replayed");
    assert_eq!(
        again.ticket(),
        Some(&t2),
        "replayed while its start is ahead"
    );
}

async fn dump(conn: &mut RedisConnection, key: &str) -> Vec<u8> {
    redis::cmd("DUMP")
        .arg(key)
        .query_async(conn)
        .await
        .expect("DUMP")
}

async fn restore(conn: &mut RedisConnection, key: &str, data: &[u8]) {
    let _: () = redis::cmd("RESTORE")
        .arg(key)
        .arg(0)
        .arg(data)
        .arg("REPLACE")
        .query_async(conn)
        .await
        .expect("RESTORE");
}

async fn del(conn: &mut RedisConnection, keys: &[String]) {
    let _: () = redis::cmd("DEL")
        .arg(keys)
        .query_async(conn)
        .await
        .expect("DEL");
}

/// Limit 2 per minute; book A, snapshot, book B, restore the snapshot (same generation,
/// B lost), book C: C must not start inside A and B's window.
async fn rollback_to_an_older_snapshot_is_fenced(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let key = fresh_key("rollback");
    let q = quota(Some(2), None, Duration::from_secs(60), None);
    let w = q.effective_window_us(Dim::Requests);
    let mut conn = raw(&url).await;
    let a = l
        .acquire(&key, &q, "A", req(1), Duration::ZERO)
        .await
        .expect("A");
    let ta = ticket_of(&a);
    let (log, st) = (
        dump(&mut conn, &key.log_key()).await,
        dump(&mut conn, &key.state_key()).await,
    );
    let b = l
        .acquire(&key, &q, "B", req(1), Duration::ZERO)
        .await
        .expect("B");
    let tb = ticket_of(&b);
    restore(&mut conn, &key.log_key(), &log).await;
    restore(&mut conn, &key.state_key(), &st).await;
    let c = l
        .acquire(&key, &q, "C", req(1), Duration::from_secs(120))
        .await
        .expect("C");
    let tc = ticket_of(&c);
    assert!(
        tc.start_us >= ta.start_us.max(tb.start_us) + w,
        "C starts inside A and B's window: {c:?} (A {}, B {})",
        ta.start_us,
        tb.start_us
    );
}

/// Both keys lost (FLUSHALL, or a restart without persistence): a caller that saw the old
/// state waits each limited dimension's own window from the latest start it saw, not the
/// longest window of all.
#[tokio::test]
async fn flushall_fences_each_dimension_with_its_own_window() {
    let port = free_port();
    let redis = PrivateRedis::start(port);
    let l = connect(&redis.url()).await;
    let key = fresh_key("flushall");
    let mut q = quota(Some(3), None, Duration::from_secs(10), None);
    // A long, unlimited dimension must not hold anything back.
    q.spend_micros = DimensionQuota {
        limit: None,
        window: Duration::from_secs(600),
    };
    let w = q.effective_window_us(Dim::Requests);
    let a = l
        .acquire(&key, &q, "a", req(1), Duration::ZERO)
        .await
        .expect("a");
    let ta = ticket_of(&a);
    let mut conn = raw(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
    let b = l
        .acquire(&key, &q, "b", req(1), Duration::from_secs(30))
        .await
        .expect("b");
    let tb = ticket_of(&b);
    assert_within_a_second_after(
        tb.start_us,
        ta.start_us + w,
        "fenced for the requests window only",
    );
}

/// Two callers that saw the old state: the second, whose latest start is not later, does
/// not push the fence out again.
async fn stale_callers_do_not_extend_the_fence(kind: RedisKind) {
    let (url, first) = rig_limiter(kind).await;
    let second = connect(&url).await;
    let key = fresh_key("stale");
    let q = quota(Some(2), None, Duration::from_secs(3), None);
    let w = q.effective_window_us(Dim::Requests);
    let b1 = second
        .acquire(&key, &q, "b1", req(1), Duration::ZERO)
        .await
        .expect("b1");
    let a1 = first
        .acquire(&key, &q, "a1", req(1), Duration::ZERO)
        .await
        .expect("a1");
    let ta1 = ticket_of(&a1);
    assert!(ticket_of(&b1).start_us <= ta1.start_us);
    let mut conn = raw(&url).await;
    del(&mut conn, &[key.log_key(), key.state_key()]).await;
    let a2 = first
        .acquire(&key, &q, "a2", req(1), Duration::from_secs(10))
        .await
        .expect("a2");
    let ta2 = ticket_of(&a2);
    assert_within_a_second_after(ta2.start_us, ta1.start_us + w, "fenced");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b2 = second
        .acquire(&key, &q, "b2", req(1), Duration::from_secs(10))
        .await
        .expect("b2");
    assert_eq!(
        ticket_of(&b2).start_us,
        ta2.start_us,
        "the fence was not extended: {b2:?}"
    );
}

/// Only the log lost (the hash still counts its bookings): detected, fenced once, and the
/// limit is usable again right after the fence.
async fn losing_only_the_log_is_detected(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let key = fresh_key("logloss");
    let q = quota(Some(2), None, Duration::from_secs(2), None);
    let w = q.effective_window_us(Dim::Requests);
    let a = l
        .acquire(&key, &q, "a", req(1), Duration::ZERO)
        .await
        .expect("a");
    let ta = ticket_of(&a);
    let mut conn = raw(&url).await;
    del(&mut conn, &[key.log_key()]).await;
    // A new process (no hints) sees it too: the hash says bookings exist, the log is empty.
    let other = connect(&url).await;
    let b = other
        .acquire(&key, &q, "b", req(1), Duration::from_secs(10))
        .await
        .expect("b");
    let tb = ticket_of(&b);
    assert_within_a_second_after(tb.start_us, ta.start_us + w, "fenced");
    let c = l
        .acquire(&key, &q, "c", req(1), Duration::from_secs(10))
        .await
        .expect("c");
    assert_eq!(
        ticket_of(&c).start_us,
        tb.start_us,
        "the limit is whole again after the fence: {c:?}"
    );
}

/// Only the state hash lost: a caller that saw it waits the dimension's own window from the
/// latest start, not the longest window.
async fn losing_only_the_state_is_detected(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let key = fresh_key("stateloss");
    let mut q = quota(Some(1), None, Duration::from_secs(2), None);
    q.spend_micros = DimensionQuota {
        limit: None,
        window: Duration::from_secs(600),
    };
    let w = q.effective_window_us(Dim::Requests);
    let a = l
        .acquire(&key, &q, "a", req(1), Duration::ZERO)
        .await
        .expect("a");
    let ta = ticket_of(&a);
    let mut conn = raw(&url).await;
    del(&mut conn, &[key.state_key()]).await;
    let b = l
        .acquire(&key, &q, "b", req(1), Duration::from_secs(10))
        .await
        .expect("b");
    assert_within_a_second_after(ticket_of(&b).start_us, ta.start_us + w, "fenced");
}

/// A check that finds the state lost fences it, so a process that never saw the old state
/// cannot book into the lost window either.
async fn check_on_lost_state_reports_lost_and_fences(kind: RedisKind) {
    use pacer_core::limiter::Check;
    let (url, l) = rig_limiter(kind).await;
    let key = fresh_key("checklost");
    let q = quota(Some(1), None, Duration::from_secs(2), None);
    let w = q.effective_window_us(Dim::Requests);
    let a = l
        .acquire(&key, &q, "a", req(1), Duration::ZERO)
        .await
        .expect("a");
    let ta = ticket_of(&a);
    let b = l
        .acquire(&key, &q, "b", req(1), Duration::from_secs(10))
        .await
        .expect("b");
    let tb = ticket_of(&b);
    let mut conn = raw(&url).await;
    del(&mut conn, &[key.log_key(), key.state_key()]).await;
    let checked = l.check(&tb).await.expect("check");
    assert!(
        matches!(
            checked,
            Check::Cancelled {
                blocking: Blocker::Lost,
                ..
            }
        ),
        "{checked:?}"
    );
    let newcomer = connect(&url).await;
    let c = newcomer
        .acquire(&key, &q, "c", req(1), Duration::from_secs(10))
        .await
        .expect("c");
    // Fenced from when the check found the loss (a had started by then and may have been
    // called), not from b's later start: b was never called, its check found it gone.
    let tc = ticket_of(&c);
    assert_within_a_second_after(tc.start_us, ta.start_us + w, "fenced from the loss");
    assert!(
        tc.start_us < tb.start_us + w,
        "not fenced from b's start, which was never called: {c:?} (b {})",
        tb.start_us
    );
}

/// Limiter keys carry no TTL: a `volatile-*` eviction policy can never take one of them
/// alone.
async fn limiter_keys_carry_no_ttl(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let key = fresh_key("ttl");
    let q = quota(Some(5), None, Duration::from_secs(2), None);
    l.acquire(&key, &q, "a", req(1), Duration::ZERO)
        .await
        .expect("a");
    l.penalize(&key, Duration::from_millis(1), PenaltyScope::PerMinute)
        .await
        .expect("penalize");
    let mut conn = raw(&url).await;
    for k in [key.log_key(), key.state_key()] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert_eq!(ttl, -1, "{k} has a TTL");
    }
}

/// A queue longer than a window: a booking far ahead stays in the log until its start, so
/// its check passes.
async fn bookings_behind_a_long_queue_survive_until_their_start(kind: RedisKind) {
    use pacer_core::limiter::Check;
    let (_, l) = rig_limiter(kind).await;
    let key = fresh_key("longqueue");
    let q = quota(
        Some(1),
        None,
        Duration::from_millis(500),
        Some(Duration::ZERO),
    );
    let mut tickets = Vec::new();
    for id in ["a", "b", "c", "d"] {
        let d = l
            .acquire(&key, &q, id, req(1), Duration::from_secs(10))
            .await
            .expect("acquire");
        tickets.push(ticket_of(&d));
    }
    assert_eq!(tickets[3].start_us, tickets[0].start_us + 1_500_000);
    let c = &tickets[2];
    tokio::time::sleep(Duration::from_micros((c.start_us - now_us()).max(0) as u64)).await;
    assert_eq!(l.check(c).await.expect("check"), Check::Go);
}

/// The rig's Redis runs with the default policy, which keeps limiter state whole.
async fn eviction_policy_is_read_and_judged(kind: RedisKind) {
    use pacer_core::limiter::redis::eviction_policy_is_safe;
    let (_, l) = rig_limiter(kind).await;
    let policy = l.eviction_policy().await.expect("CONFIG GET");
    assert_eq!(policy.as_deref(), Some("noeviction"));
    assert!(eviction_policy_is_safe("noeviction"));
    assert!(eviction_policy_is_safe("volatile-lru"));
    assert!(!eviction_policy_is_safe("allkeys-lru"));
}

/// After a loss, what only the callers still know of the day comes back with them: the
/// day's count and a per-day block.
async fn lost_state_keeps_the_day_count_and_block_the_callers_saw(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let l = l.with_calendar(Arc::new(FixedDays {
        origin_us: now_us() - 1_000_000,
        day_us: 3_600_000_000,
    }));
    let mut conn = raw(&url).await;
    let mut q = quota(Some(100), None, Duration::from_secs(1), None);
    q.requests_per_day = Some(3);
    let key = fresh_key("daycount");
    for id in ["a", "b", "c"] {
        l.acquire(&key, &q, id, req(1), Duration::ZERO)
            .await
            .expect("acquire");
    }
    del(&mut conn, &[key.log_key(), key.state_key()]).await;
    let d = l
        .acquire(&key, &q, "d", req(1), Duration::from_secs(10))
        .await
        .expect("d");
    assert_eq!(d.blocker(), Some(Blocker::Daily), "the day is spent: {d:?}");
    let key = fresh_key("dayblock");
    l.acquire(&key, &q, "a", req(1), Duration::ZERO)
        .await
        .expect("a");
    l.penalize(&key, Duration::ZERO, PenaltyScope::PerDay)
        .await
        .expect("penalize");
    let _ = l
        .acquire(&key, &q, "b", req(1), Duration::ZERO)
        .await
        .expect("b");
    del(&mut conn, &[key.log_key(), key.state_key()]).await;
    let c = l
        .acquire(&key, &q, "c", req(1), Duration::from_secs(10))
        .await
        .expect("c");
    assert_eq!(
        c.blocker(),
        Some(Blocker::Daily),
        "still blocked for the day: {c:?}"
    );
}

/// Keys that carry a TTL (written by an earlier version, or by one still running during a
/// rollout) lose it at the next decision, and that is no evidence of a loss: nothing is
/// fenced.
async fn keys_with_a_ttl_are_persisted_without_a_fence(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let key = fresh_key("persist");
    let q = quota(Some(1), None, Duration::from_secs(2), None);
    let w = q.effective_window_us(Dim::Requests);
    let a = l
        .acquire(&key, &q, "a", req(1), Duration::ZERO)
        .await
        .expect("a");
    let ta = ticket_of(&a);
    let mut conn = raw(&url).await;
    for k in [key.log_key(), key.state_key()] {
        let _: () = redis::cmd("PEXPIRE")
            .arg(&k)
            .arg(93_600_000)
            .query_async(&mut conn)
            .await
            .expect("PEXPIRE");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = l
        .acquire(&key, &q, "b", req(1), Duration::from_secs(10))
        .await
        .expect("b");
    assert_eq!(ticket_of(&b).start_us, ta.start_us + w, "not fenced: {b:?}");
    for k in [key.log_key(), key.state_key()] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert_eq!(ttl, -1, "{k} still has a TTL");
    }
}

/// `rpm` requests per 10 s window, no margin: the limit-change tests' quota.
fn rpm_per_10s(rpm: u64) -> ModelQuota {
    quota(
        Some(rpm),
        None,
        Duration::from_secs(10),
        Some(Duration::ZERO),
    )
}

/// Books `n` requests of one request each, ids `<prefix><i>`, now.
async fn book_many(
    l: &RedisLimiter,
    key: &QuotaKey,
    q: &ModelQuota,
    prefix: &str,
    n: usize,
) -> Vec<pacer_core::limiter::Ticket> {
    let mut out = Vec::new();
    for i in 0..n {
        let d = l
            .acquire(
                key,
                q,
                &format!("{prefix}{i}"),
                req(1),
                Duration::from_secs(120),
            )
            .await
            .expect("acquire");
        out.extend(d.ticket().cloned());
    }
    out
}

/// Checks every ticket (the check before the call; a booking still held passes whether or
/// not its start has come) and returns the starts of those that may go ahead and the ids
/// of those lost.
async fn check_all(
    l: &RedisLimiter,
    tickets: &[pacer_core::limiter::Ticket],
) -> (Vec<(i64, i64)>, Vec<String>) {
    use pacer_core::limiter::Check;
    let (mut called, mut lost) = (Vec::new(), Vec::new());
    for t in tickets {
        match l.check(t).await.expect("check") {
            Check::Go => called.push((t.start_us, 1)),
            Check::Cancelled {
                blocking: Blocker::Lost,
                ..
            } => lost.push(t.request_id.clone()),
            other => panic!("unexpected check answer for {}: {other:?}", t.request_id),
        }
    }
    (called, lost)
}

/// Issue 18: limit 20 per 10 s, 60 bookings queued over 3 windows, the limit lowered to 10
/// (by another replica, which has the new config first). The bookings beyond the new limit
/// that have not started are released at once, latest first; their holders see Lost at
/// check, and no window from the change on holds more than 10.
async fn lowering_a_limit_releases_the_bookings_beyond_it(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let other = connect(&url).await;
    let key = fresh_key("lowered");
    let w = 10_000_000;
    let q20 = rpm_per_10s(20);
    let old = book_many(&l, &key, &q20, "old", 60).await;
    assert_eq!(old.len(), 60);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let change = now_us();
    let q10 = rpm_per_10s(10);
    let new = book_many(&other, &key, &q10, "new", 20).await;
    assert_eq!(new.len(), 20);
    let mut all = old.clone();
    all.extend(new);
    let (mut called, lost) = check_all(&l, &all).await;
    // Bookings made one after another start a few µs apart, so each window of the new
    // limit still holds some of those that had started: 10 of each later window go.
    assert_eq!(lost.len(), 20, "released: {lost:?}");
    assert!(lost.iter().all(|id| id.starts_with("old")), "{lost:?}");
    // A retried acquire of a released booking books afresh, under the new limit.
    let again = l
        .acquire(&key, &q10, &lost[0], req(1), Duration::from_secs(120))
        .await
        .expect("acquire again");
    let first = old.iter().find(|t| t.request_id == lost[0]).expect("old");
    assert!(
        again.ticket().is_some_and(|t| t.start_us > first.start_us),
        "booked afresh: {again:?}"
    );
    let (more, none) = check_all(&l, &[ticket_of(&again)]).await;
    assert!(none.is_empty());
    called.extend(more);
    called.retain(|(s, _)| *s >= change);
    assert_eq!(max_in_window(&called, w), 10);
}

/// Raised from 10 to 20: the bookings already made stay; new bookings take the room the
/// raise opens at once (every window holding now had 10), then fill the queued windows up
/// to the new limit, never past it.
async fn raising_a_limit_fills_windows_up_to_it(kind: RedisKind) {
    let (_, l) = rig_limiter(kind).await;
    let key = fresh_key("raised");
    let w = 10_000_000;
    let q10 = rpm_per_10s(10);
    let old = book_many(&l, &key, &q10, "old", 30).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let q20 = rpm_per_10s(20);
    let change = now_us();
    let new = book_many(&l, &key, &q20, "new", 30).await;
    // Booked one after another, each at its own now.
    for t in &new[..10] {
        assert!(
            t.start_us >= change && t.start_us < old[10].start_us,
            "at once: {t:?}"
        );
    }
    assert!(new[10].start_us >= old[29].start_us, "{:?}", new[10]);
    assert!(new[29].start_us > old[29].start_us, "{:?}", new[29]);
    let mut all = old.clone();
    all.extend(new);
    let (called, lost) = check_all(&l, &all).await;
    assert!(lost.is_empty(), "nothing released: {lost:?}");
    assert_eq!(max_in_window(&called, w), 20);
}

/// Room given back inside a queue (released bookings) is taken by the next request at once,
/// and only as much as every window holding now allows: the others still queue.
async fn room_given_back_inside_a_queue_is_taken_at_once(kind: RedisKind) {
    let (_, l) = rig_limiter(kind).await;
    let key = fresh_key("given-back");
    let w = 10_000_000;
    let q10 = rpm_per_10s(10);
    let old = book_many(&l, &key, &q10, "old", 30).await;
    // One given back in the window holding now and one in the next: a booking now lies in
    // windows reaching into both.
    l.release(&old[13]).await.expect("release");
    let blocked = book_many(&l, &key, &q10, "blocked", 1).await;
    assert!(
        blocked[0].start_us > old[29].start_us,
        "no room now yet: {blocked:?}"
    );
    l.release(&old[3]).await.expect("release");
    let before = now_us();
    let next = book_many(&l, &key, &q10, "next", 2).await;
    assert!(
        next[0].start_us >= before && next[0].start_us < old[10].start_us,
        "the room now: {:?}",
        next[0]
    );
    assert!(
        next[1].start_us > old[29].start_us,
        "behind the queue: {:?}",
        next[1]
    );
    let mut all: Vec<_> = old
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 13)
        .map(|(_, t)| t.clone())
        .collect();
    all.extend(blocked);
    all.extend(next);
    let (called, lost) = check_all(&l, &all).await;
    assert!(lost.is_empty(), "{lost:?}");
    assert_eq!(max_in_window(&called, w), 10, "{called:?}");
}

/// A longer window is a lower limit too: bookings that no longer fit are released.
async fn a_longer_window_releases_the_bookings_beyond_the_limit(kind: RedisKind) {
    let (_, l) = rig_limiter(kind).await;
    let key = fresh_key("longer");
    let q10 = rpm_per_10s(10);
    let old = book_many(&l, &key, &q10, "old", 30).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let change = now_us();
    let q20s = quota(
        Some(10),
        None,
        Duration::from_secs(20),
        Some(Duration::ZERO),
    );
    let new = book_many(&l, &key, &q20s, "new", 10).await;
    let mut all = old.clone();
    all.extend(new);
    let (mut called, lost) = check_all(&l, &all).await;
    assert_eq!(lost.len(), 10, "{lost:?}");
    called.retain(|(s, _)| *s >= change);
    assert!(max_in_window(&called, 20_000_000) <= 10, "{called:?}");
}

/// A replica still on the old config books under the old, higher limit after the change;
/// the next acquire on the new config releases that booking too.
async fn a_booking_made_on_the_old_config_is_released_by_the_next_one_on_the_new(kind: RedisKind) {
    let (url, stale) = rig_limiter(kind).await;
    let current = connect(&url).await;
    let key = fresh_key("staleconfig");
    let w = 10_000_000;
    let q20 = rpm_per_10s(20);
    let q10 = rpm_per_10s(10);
    let old = book_many(&stale, &key, &q20, "old", 20).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let change = now_us();
    let fresh = book_many(&current, &key, &q10, "new", 10).await;
    let late = book_many(&stale, &key, &q20, "stale", 5).await;
    assert_eq!(late.len(), 5);
    let next = book_many(&current, &key, &q10, "next", 1).await;
    let mut all = old;
    all.extend(fresh);
    all.extend(late);
    all.extend(next);
    let (mut called, lost) = check_all(&current, &all).await;
    assert_eq!(lost.len(), 5, "{lost:?}");
    assert!(lost.iter().all(|id| id.starts_with("stale")), "{lost:?}");
    called.retain(|(s, _)| *s >= change);
    assert_eq!(max_in_window(&called, w), 10);
}

/// A window that grows past entries already pruned from the log cannot recount them: they
/// are taken as full, so nothing starts inside a new window with them.
async fn a_window_grown_past_pruned_bookings_waits_for_them(kind: RedisKind) {
    let (_, l) = rig_limiter(kind).await;
    let key = fresh_key("grown");
    let short = quota(
        Some(2),
        None,
        Duration::from_millis(300),
        Some(Duration::ZERO),
    );
    let long = quota(Some(2), None, Duration::from_secs(2), Some(Duration::ZERO));
    let mut starts = Vec::new();
    for id in ["a", "b"] {
        let d = l
            .acquire(&key, &short, id, req(1), Duration::ZERO)
            .await
            .expect("acquire");
        starts.push(ticket_of(&d).start_us);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Prunes a and b (outside every window).
    let c = l
        .acquire(&key, &short, "c", req(1), Duration::ZERO)
        .await
        .expect("c");
    starts.push(ticket_of(&c).start_us);
    let d = l
        .acquire(&key, &long, "d", req(1), Duration::from_secs(10))
        .await
        .expect("d");
    let td = ticket_of(&d);
    assert!(
        td.start_us >= starts[1] + 2_000_000,
        "d starts inside a 2 s window with a, b and c: {d:?} ({starts:?})"
    );
    // The window of the new length ending at d holds c and d only.
    let held = starts
        .iter()
        .filter(|s| **s > td.start_us - 2_000_000)
        .count();
    assert_eq!(held, 1, "{starts:?}");
}

/// The operator reads usage with the config it has just compiled: that read applies a
/// lowered limit at once, while every replica sleeps on its booking and none acquires.
async fn a_usage_read_with_the_new_limits_applies_them_at_once(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let operator = connect(&url).await;
    let key = fresh_key("usagerefit");
    let q20 = rpm_per_10s(20);
    let q10 = rpm_per_10s(10);
    let old = book_many(&l, &key, &q20, "old", 60).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let change = now_us();
    operator.usage(&key, &q10).await.expect("usage");
    let (mut called, lost) = check_all(&l, &old).await;
    assert_eq!(lost.len(), 20, "{lost:?}");
    called.retain(|(s, _)| *s >= change);
    assert_eq!(max_in_window(&called, 10_000_000), 10);
}

/// A Redis restarted empty: a process that connected before the restart but never used the
/// key still knows the old server, so the key's empty state on the new one is a loss and is
/// fenced for a window; without that, its first booking went into the window the lost
/// bookings had filled (faults: 18 arrivals against a limit of 10 in redis-restart-empty).
#[tokio::test]
async fn a_key_empty_after_a_restart_is_fenced_for_a_process_that_never_used_it() {
    let rig = Rig::load();
    let dir = std::env::temp_dir().join(Rig::unique("pacer-restart-fence"));
    let mut server = pacer_tests::RedisServer::start(&rig, &dir, &[]);
    let idle = connect(&server.url()).await;
    let busy = connect(&server.url()).await;
    let key = fresh_key("restart-fence");
    let q = quota(Some(2), None, Duration::from_secs(4), None);
    for id in ["a", "b"] {
        let d = busy
            .acquire(&key, &q, id, req(1), Duration::ZERO)
            .await
            .expect("acquire");
        assert!(matches!(d, Decision::Admitted { .. }), "{d:?}");
    }
    server.kill();
    server.start_again();
    // The first command on a connection the restart broke fails; the manager reconnects.
    let mut d = idle.acquire(&key, &q, "c", req(1), Duration::ZERO).await;
    for _ in 0..50 {
        if d.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        d = idle.acquire(&key, &q, "c", req(1), Duration::ZERO).await;
    }
    let d = d.expect("acquire after the restart");
    let Decision::Rejected {
        retry_after: Some(after),
        ..
    } = d
    else {
        panic!("the window the lost bookings filled is fenced: {d:?}")
    };
    assert!(
        after > Duration::from_secs(3) && after <= Duration::from_secs(5),
        "fenced for about one window: {after:?}"
    );
    // A process that first connects after the restart knows nothing of the old server: it
    // is fenced by the state the first one left.
    let late = connect(&server.url()).await;
    let d = late
        .acquire(&key, &q, "d", req(1), Duration::ZERO)
        .await
        .expect("acquire");
    assert!(d.ticket().is_none(), "{d:?}");
}

/// Issue 13 (Vertex AI's shared quota): an unexplained 429 seen by one client cuts the
/// rate every client books, once per window of 429s; a clean window gives a tenth back.
/// The twin of the in-memory limiter's test, on Redis's clock.
async fn unexplained_429s_cut_the_rate_for_every_client(kind: RedisKind) {
    let (url, a) = rig_limiter(kind).await;
    let b = connect(&url).await;
    let key = fresh_key("learned");
    let q = quota(Some(10), None, Duration::from_secs(4), Some(Duration::ZERO));
    let admitted = |l: &RedisLimiter, prefix: &'static str| {
        let (l, key, q) = (l.clone(), key.clone(), q.clone());
        async move {
            let mut n = 0;
            for i in 0..12 {
                let d = l
                    .acquire(&key, &q, &format!("{prefix}{i}"), req(1), Duration::ZERO)
                    .await
                    .expect("acquire");
                if !matches!(d, Decision::Admitted { .. }) {
                    break;
                }
                n += 1;
            }
            n
        }
    };
    assert_eq!(admitted(&a, "a").await, 10);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for l in [&a, &b] {
        l.penalize(&key, Duration::from_millis(100), PenaltyScope::Unexplained)
            .await
            .expect("penalize");
    }
    let u = b.usage(&key, &q).await.expect("usage");
    assert_eq!(
        u.rate_cut_permille, 300,
        "the two 429s of one window cut once"
    );
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(admitted(&b, "b").await, 7, "70 % of 10 in the next window");
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(
        admitted(&a, "c").await,
        1,
        "a clean window gives back one of 10"
    );
    assert_eq!(
        a.usage(&key, &q).await.expect("usage").rate_cut_permille,
        200
    );
}

/// A project's spend limit with both models of a chain at 10 µ$ per 2 s window (no margin).
fn spend_quota(limit: u64) -> ModelQuota {
    let mut q = ModelQuota::unlimited().with_windows(Duration::from_secs(2));
    q.spend_micros.limit = Some(limit);
    q.margin = Some(Duration::ZERO);
    q
}

fn spend(micros: u64) -> Costs {
    Costs::new(1, 0, 0, micros)
}

/// Issue 13: Google's spend limit is the project's, shared by its models. One model may use
/// all of it (not half, as when it was split per model); the other then waits for the same
/// window; giving spend back (a release, a reconcile) frees it for either model; a lower
/// limit releases the project's bookings beyond it; losing the project's state is fenced.
async fn spend_is_one_bucket_per_project_shared_by_its_models(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let project = format!("test-spend-{}", now_us());
    let a = QuotaKey::new(&project, "gemini-3-pro-image");
    let b = QuotaKey::new(&project, "gemini-3.1-flash-image");
    let q = spend_quota(10);
    let zero = Duration::ZERO;
    let a1 = l.acquire(&a, &q, "a1", spend(5), zero).await.expect("a1");
    let a2 = l.acquire(&a, &q, "a2", spend(5), zero).await.expect("a2");
    assert!(
        matches!(a1, Decision::Admitted { .. }) && matches!(a2, Decision::Admitted { .. }),
        "one model may use the project's whole spend: {a1:?} {a2:?}"
    );
    let b1 = l.acquire(&b, &q, "b1", spend(1), zero).await.expect("b1");
    assert_eq!(
        b1.blocker(),
        Some(Blocker::Dimension(Dim::SpendMicros)),
        "the other model waits for the project's spend: {b1:?}"
    );
    let b2 = l
        .acquire(&b, &q, "b2", spend(1), Duration::from_secs(5))
        .await
        .expect("b2");
    let wait = b2.wait().expect("booked");
    assert!(
        wait > Duration::from_millis(1_500) && wait <= Duration::from_secs(2),
        "booked once the first model's spend leaves the window: {wait:?}"
    );
    // A release and a reconcile give spend back to the project: the other model takes it now.
    l.release(a2.ticket().expect("a2")).await.expect("release");
    let b3 = l.acquire(&b, &q, "b3", spend(4), zero).await.expect("b3");
    assert!(matches!(b3, Decision::Admitted { .. }), "released: {b3:?}");
    let mut a1_actual = a1.ticket().expect("a1").costs;
    a1_actual.spend_micros = 1;
    l.reconcile(a1.ticket().expect("a1"), a1_actual)
        .await
        .expect("reconcile");
    let b4 = l.acquire(&b, &q, "b4", spend(4), zero).await.expect("b4");
    assert!(
        matches!(b4, Decision::Admitted { .. }),
        "reconciled: {b4:?}"
    );
    let full = l.acquire(&a, &q, "a3", spend(1), zero).await.expect("a3");
    assert!(full.blocker().is_some(), "1 + 4 + 4 + the booked 1: full");
    // Both models report the project's spend.
    for k in [&a, &b] {
        let u = l.usage(k, &q).await.expect("usage");
        assert_eq!(u.dimensions[Dim::SpendMicros.index()].used, 10, "{k}");
    }
    // A lower limit, brought by either model, releases the project's booking beyond it.
    let b2t = b2.ticket().expect("b2").clone();
    let lower = spend_quota(5);
    let _ = l
        .acquire(&a, &lower, "a4", Costs::new(1, 0, 0, 0), zero)
        .await
        .expect("a4");
    let other = connect(&url).await;
    assert_eq!(
        other.check(&b2t).await.expect("check"),
        pacer_core::limiter::Check::Cancelled {
            retry_after: None,
            blocking: Blocker::Lost
        },
        "the booking beyond the lowered limit is gone"
    );
    // The project's state lost (its hash deleted, the log kept): fenced for a window.
    let mut conn = raw(&url).await;
    let _: () = redis::cmd("DEL")
        .arg(a.spend_state_key())
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let after = l
        .acquire(&b, &q, "b5", spend(1), Duration::from_secs(5))
        .await
        .expect("b5");
    let wait = after.wait().expect("booked after the fence");
    assert!(
        wait > Duration::from_millis(1_500),
        "a lost project state waits a spend window: {wait:?}"
    );
}

fn tenant(name: &str, weight: u32, floor_percent: u32, ceiling_percent: u32) -> TenantShare {
    TenantShare {
        name: name.into(),
        weight,
        floor_permille: floor_percent * 10,
        ceiling_permille: ceiling_percent * 10,
        daily_budget_micros: None,
        monthly_budget_micros: None,
    }
}

/// Requests of the given tenants (positions in `q.tenants`), booked in that order, each
/// then called at its start by its own task: a slot taken over by another tenant answers
/// `Lost` at its check and books afresh, as the handler does. Returns each call's booked
/// start (Redis clock) and tenant, in start order; every request is called once.
async fn fleet_of_tenants(
    l: Arc<RedisLimiter>,
    key: &QuotaKey,
    q: &ModelQuota,
    who: &[usize],
) -> Vec<(i64, usize)> {
    let who: Vec<(usize, i32)> = who.iter().map(|&t| (t, 0)).collect();
    let mut calls: Vec<(i64, usize)> = fleet_of_classes(l, key, q, &who)
        .await
        .into_iter()
        .map(|(start, t, _)| (start, t))
        .collect();
    calls.sort();
    calls
}

/// [`fleet_of_tenants`] with a priority class per request, in request order; each call
/// also gives how long its request's first booking said to wait.
async fn fleet_of_classes(
    l: Arc<RedisLimiter>,
    key: &QuotaKey,
    q: &ModelQuota,
    who: &[(usize, i32)],
) -> Vec<(i64, usize, Duration)> {
    let mut tasks = Vec::new();
    for (i, &(t, class)) in who.iter().enumerate() {
        let name = q
            .tenants
            .get(t)
            .map_or("default".to_owned(), |t| t.name.clone());
        let first = l
            .acquire_for(
                key,
                q,
                Asker {
                    tenant: &name,
                    priority: class,
                },
                &format!("r{i}-0"),
                req(1),
                Duration::from_secs(60),
            )
            .await
            .expect("acquire");
        let (l, key, q) = (l.clone(), key.clone(), q.clone());
        tasks.push(tokio::spawn(async move {
            let first_wait = first.wait().unwrap_or(Duration::MAX);
            let mut d = first;
            for attempt in 1.. {
                match d {
                    Decision::Admitted { ticket } => return (ticket.start_us, t, first_wait),
                    Decision::Booked { ticket, wait } => {
                        tokio::time::sleep(wait).await;
                        if l.check(&ticket).await.expect("check") == Check::Go {
                            return (ticket.start_us, t, first_wait);
                        }
                    }
                    Decision::Rejected { retry_after, .. } => {
                        tokio::time::sleep(retry_after.unwrap_or(Duration::from_millis(100))).await;
                    }
                }
                d = l
                    .acquire_for(
                        &key,
                        &q,
                        Asker {
                            tenant: &name,
                            priority: class,
                        },
                        &format!("r{i}-{attempt}"),
                        req(1),
                        Duration::from_secs(60),
                    )
                    .await
                    .expect("acquire");
            }
            unreachable!()
        }));
    }
    let mut calls = Vec::new();
    for t in tasks {
        calls.push(t.await.expect("request task"));
    }
    calls
}

/// Issue 15 (the twin of the in-memory `backlogged_tenants_share_each_window_by_weight`):
/// weights 3:1, both backlogged at three times the limit, the heavy tenant's requests
/// first. From the first window after both arrived until one runs out, the light tenant
/// gets its quarter by taking over slots the heavy one had booked; no window is over the
/// limit; a ceiling caps a tenant alone; an undeclared tenant is refused.
async fn tenants_share_each_window_by_weight(kind: RedisKind) {
    let (url, l) = rig_limiter(kind).await;
    let l = Arc::new(l);
    let key = fresh_key("tenants");
    let w = Duration::from_secs(1);
    let mut q = quota(Some(20), None, w, Some(Duration::ZERO));
    q.tenants = vec![tenant("a", 3, 0, 100), tenant("b", 1, 0, 100)];
    let mut who = vec![0; 60];
    who.extend([1; 60]);
    let calls = fleet_of_tenants(l.clone(), &key, &q, &who).await;
    let starts: Vec<(i64, i64)> = calls.iter().map(|(s, _)| (*s, 1)).collect();
    assert!(
        max_in_window(&starts, w.as_micros() as i64) <= 20,
        "never over the limit"
    );
    // Windows from the first call: the first is a's alone (booked before b arrived).
    let t0 = calls[0].0;
    let mut windows = vec![[0u64; 2]; 8];
    for &(s, t) in &calls {
        windows[((s - t0) / w.as_micros() as i64) as usize][t] += 1;
    }
    let a_done = calls
        .iter()
        .filter(|c| c.1 == 0)
        .map(|c| c.0)
        .max()
        .expect("a");
    let both = ((a_done - t0) / w.as_micros() as i64) as usize; // the window a ends in
    let (a, b): (u64, u64) = windows[1..both]
        .iter()
        .fold((0, 0), |(a, b), w| (a + w[0], b + w[1]));
    let share = b as f64 / (a + b) as f64;
    eprintln!("tenants {kind:?}: windows {windows:?}; b's share while both wait {share:.3}");
    assert!(
        (share - 0.25).abs() <= 0.25 * 0.05,
        "b's share {share:.3} is not within 5 % of 0.25: {windows:?}"
    );
    // A ceiling of 25 % caps a tenant alone in the pool.
    let key = fresh_key("ceiling");
    q.tenants = vec![tenant("capped", 1, 0, 25), tenant("other", 1, 0, 100)];
    let calls = fleet_of_tenants(l.clone(), &key, &q, &[0; 10]).await;
    let starts: Vec<(i64, i64)> = calls.iter().map(|(s, _)| (*s, 1)).collect();
    assert_eq!(
        max_in_window(&starts, w.as_micros() as i64),
        5,
        "capped at 5"
    );
    let e = connect(&url)
        .await
        .acquire_for(
            &key,
            &q,
            Asker {
                tenant: "nobody",
                priority: 0,
            },
            "x",
            req(1),
            w,
        )
        .await
        .expect_err("undeclared");
    assert!(e.to_string().contains("spec.tenants"), "{e}");
}

/// Issue 15 (the twin of the in-memory `a_higher_class_books_ahead_of_a_deep_lower_backlog`):
/// 100 requests of class 0 booked five windows deep, then 10 of class 5: each of those
/// books within a window, taking slots of class-0 bookings that had not started; every
/// class-0 request is still called once; no window is over the limit.
async fn a_higher_class_books_ahead_of_a_deep_lower_backlog(kind: RedisKind) {
    let (_, l) = rig_limiter(kind).await;
    let key = fresh_key("classes");
    let w = Duration::from_secs(1);
    let q = quota(Some(20), None, w, Some(Duration::ZERO));
    let mut who = vec![(0, 0); 100];
    who.extend([(0, 5); 10]);
    let calls = fleet_of_classes(Arc::new(l), &key, &q, &who).await;
    assert_eq!(calls.len(), 110, "every request called once");
    let starts: Vec<(i64, i64)> = calls.iter().map(|(s, _, _)| (*s, 1)).collect();
    assert!(
        max_in_window(&starts, w.as_micros() as i64) <= 20,
        "never over the limit"
    );
    let urgent: Vec<Duration> = calls[100..].iter().map(|(_, _, wait)| *wait).collect();
    eprintln!("classes {kind:?}: urgent waits {urgent:?}");
    assert!(
        urgent.iter().all(|wait| *wait <= w),
        "class 5 within a window, ahead of five windows of class 0: {urgent:?}"
    );
}

/// Issue 15 (the twin of the in-memory `a_spent_budget_waits_for_its_reset_and_others_go_on`),
/// on days of 4 s: a tenant's $2 a day is spent by two $1 calls; the third waits for the
/// next day (Budget) while another tenant books; a call charged less than its estimate
/// gives the difference back; the next day books again.
async fn a_spent_budget_waits_for_its_reset_and_others_go_on(kind: RedisKind) {
    let (url, _) = rig_limiter(kind).await;
    let day_us = 4_000_000;
    let l = connect(&url).await.with_calendar(Arc::new(FixedDays {
        origin_us: 0,
        day_us,
    }));
    let key = fresh_key("budget");
    let mut q = quota(
        Some(100),
        None,
        Duration::from_secs(1),
        Some(Duration::ZERO),
    );
    q.tenants = vec![
        TenantShare {
            daily_budget_micros: Some(2_000_000),
            ..tenant("a", 1, 0, 100)
        },
        tenant("b", 1, 0, 100),
    ];
    let dollar = Costs::new(1, 0, 1, 1_000_000);
    // Start just after a day begins, so the day does not end mid-test.
    let now = now_us();
    let next = (now / day_us + 1) * day_us;
    tokio::time::sleep(Duration::from_micros((next - now + 50_000) as u64)).await;
    let ask = |tenant: &'static str, id: &'static str, costs: Costs| {
        let (l, key, q) = (&l, &key, &q);
        async move {
            l.acquire_for(
                key,
                q,
                Asker {
                    tenant,
                    priority: 0,
                },
                id,
                costs,
                Duration::from_secs(60),
            )
            .await
            .expect("acquire")
        }
    };
    let a1 = ask("a", "a1", dollar).await;
    assert!(matches!(a1, Decision::Admitted { .. }), "{a1:?}");
    assert!(matches!(
        ask("a", "a2", dollar).await,
        Decision::Admitted { .. }
    ));
    let a3 = ask("a", "a3", dollar).await;
    let Decision::Rejected {
        retry_after: Some(retry),
        blocking: Blocker::Budget,
    } = a3
    else {
        panic!("the day's budget is spent: {a3:?}");
    };
    assert!(
        retry > Duration::from_millis(3_000) && retry <= Duration::from_secs(4),
        "until the next day: {retry:?}"
    );
    assert!(
        matches!(ask("b", "b1", dollar).await, Decision::Admitted { .. }),
        "another tenant goes on"
    );
    let mut cheaper = dollar;
    cheaper.spend_micros = 400_000;
    l.reconcile(a1.ticket().expect("a1"), cheaper)
        .await
        .expect("reconcile");
    let mut half = dollar;
    half.spend_micros = 500_000;
    assert!(
        matches!(ask("a", "a4", half).await, Decision::Admitted { .. }),
        "$0.60 given back"
    );
    tokio::time::sleep(retry).await;
    assert!(
        matches!(ask("a", "a5", dollar).await, Decision::Admitted { .. }),
        "the next day"
    );
}

/// Issue 15: a tenant's budgets' hash lost (deleted here; evicted, or a restart without
/// persistence): the day's and month's spend come back from what the caller saw, so a spent
/// budget stays spent (days of 3 s from the test's start; months of 30 such days): $2 a
/// day and $3 a month, two $1 calls, the hash deleted, the third still waits for the next
/// day, where one more $1 spends the month.
async fn a_lost_budget_keeps_what_its_callers_saw_spent(kind: RedisKind) {
    let (url, _) = rig_limiter(kind).await;
    let day_us = 3_000_000;
    let l = connect(&url).await.with_calendar(Arc::new(FixedDays {
        origin_us: now_us() - 100_000,
        day_us,
    }));
    let key = fresh_key("lost-budget");
    let mut q = quota(
        Some(100),
        None,
        Duration::from_secs(1),
        Some(Duration::ZERO),
    );
    q.tenants = vec![TenantShare {
        daily_budget_micros: Some(2_000_000),
        monthly_budget_micros: Some(3_000_000),
        ..tenant("a", 1, 0, 100)
    }];
    let dollar = Costs::new(1, 0, 1, 1_000_000);
    let ask = |id: &'static str| {
        let (l, key, q) = (&l, &key, &q);
        async move {
            l.acquire_for(
                key,
                q,
                Asker {
                    tenant: "a",
                    priority: 0,
                },
                id,
                dollar,
                Duration::from_secs(60),
            )
            .await
            .expect("acquire")
        }
    };
    assert!(matches!(ask("a1").await, Decision::Admitted { .. }));
    assert!(matches!(ask("a2").await, Decision::Admitted { .. }));
    let mut conn = raw(&url).await;
    del(&mut conn, &[key.tenant_budget_key("a")]).await;
    let a3 = ask("a3").await;
    let Decision::Rejected {
        retry_after: Some(retry),
        blocking: Blocker::Budget,
    } = a3
    else {
        panic!("the day's $2 still spent after the loss: {a3:?}");
    };
    tokio::time::sleep(retry).await;
    assert!(
        matches!(ask("a4").await, Decision::Admitted { .. }),
        "the next day"
    );
    let a5 = ask("a5").await;
    assert!(
        matches!(
            a5,
            Decision::Rejected {
                retry_after: Some(r),
                blocking: Blocker::Budget,
            } if r > Duration::from_secs(60)
        ),
        "the month's $3 spent ($2 of it from before the loss): {a5:?}"
    );
}

pacer_tests::on_both_redis!(
    a_lost_budget_keeps_what_its_callers_saw_spent,
    a_spent_budget_waits_for_its_reset_and_others_go_on,
    a_higher_class_books_ahead_of_a_deep_lower_backlog,
    tenants_share_each_window_by_weight,
    spend_is_one_bucket_per_project_shared_by_its_models,
    many_concurrent_connections_stay_under_every_limit,
    room_given_back_under_concurrency_stays_under_every_limit,
    same_request_id_returns_same_ticket,
    script_flush_reloads_and_keeps_state,
    cooldown_is_shared_between_two_clients,
    reconcile_and_release_free_capacity,
    daily_quota_rolls_over_on_short_days,
    daily_quota_follows_compressed_pacific_dst_days,
    same_request_id_books_afresh_once_its_start_has_passed,
    rollback_to_an_older_snapshot_is_fenced,
    stale_callers_do_not_extend_the_fence,
    losing_only_the_log_is_detected,
    losing_only_the_state_is_detected,
    check_on_lost_state_reports_lost_and_fences,
    limiter_keys_carry_no_ttl,
    bookings_behind_a_long_queue_survive_until_their_start,
    eviction_policy_is_read_and_judged,
    lost_state_keeps_the_day_count_and_block_the_callers_saw,
    keys_with_a_ttl_are_persisted_without_a_fence,
    lowering_a_limit_releases_the_bookings_beyond_it,
    raising_a_limit_fills_windows_up_to_it,
    room_given_back_inside_a_queue_is_taken_at_once,
    a_longer_window_releases_the_bookings_beyond_the_limit,
    a_booking_made_on_the_old_config_is_released_by_the_next_one_on_the_new,
    a_window_grown_past_pruned_bookings_waits_for_them,
    a_usage_read_with_the_new_limits_applies_them_at_once,
    unexplained_429s_cut_the_rate_for_every_client,
);

/// A cluster behind an ACL user, as managed services give it: the user and password in
/// the URL reach every node the cluster client learns of (one decision on each primary),
/// and a wrong password is refused at connect, not at the first decision.
#[tokio::test]
async fn a_cluster_behind_an_acl_user_takes_the_user_from_the_url() {
    let rig = Rig::load();
    let user = format!("pacer-acl-{}", now_us());
    // ACL users are per node on a cluster: create it on every node, replicas too.
    for port in rig.get("REDIS_CLUSTER_PORTS").split(',') {
        let mut c = raw(&format!("redis://127.0.0.1:{port}")).await;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("on")
            .arg(">s3cret")
            .arg("resetkeys")
            .arg("~{pacer:*")
            .arg("~pacer:*")
            .arg("+@all")
            .query_async(&mut c)
            .await
            .expect("ACL SETUSER");
    }
    let url = rig.get("REDIS_CLUSTER_URL");
    let with = |password: &str| url.replacen("redis://", &format!("redis://{user}:{password}@"), 1);
    let l = connect(&with("s3cret")).await;
    let q = quota(Some(10), None, Duration::from_secs(30), None);
    // Enough pairs that every primary answers at least one.
    for i in 0..24 {
        let key = fresh_key(&format!("acl-{i}"));
        let d = l
            .acquire(&key, &q, "a", req(1), Duration::ZERO)
            .await
            .expect("a decision as the ACL user");
        assert!(matches!(d, Decision::Admitted { .. }), "{d:?}");
    }
    let refused = RedisLimiter::connect(&with("wrong"), RedisOptions::default()).await;
    assert!(refused.is_err(), "a wrong password was accepted");
}

/// One process decides for pairs on every primary of a cluster. The server a pair's state
/// was written on is tracked per pair: a pair new to this process, on another primary than
/// its previous decision's, is not taken for state lost in a failover (a process-wide "last
/// server" would fence every such pair for a window).
#[tokio::test]
async fn pairs_on_every_primary_are_not_fenced_for_each_other() {
    let (_, l) = rig_limiter(RedisKind::Cluster).await;
    let q = quota(Some(10), None, Duration::from_secs(30), None);
    let mut admitted = 0;
    // 24 pairs: every primary holds some of them, and consecutive pairs change primary.
    for i in 0..24 {
        let key = fresh_key(&format!("spread-{i}"));
        for id in ["a", "b"] {
            let d = l
                .acquire(&key, &q, id, req(1), Duration::ZERO)
                .await
                .expect("a decision");
            assert!(
                matches!(d, Decision::Admitted { .. }),
                "pair {i} request {id}: {d:?}"
            );
            admitted += 1;
        }
    }
    assert_eq!(admitted, 48);
}

/// A server that refuses `INFO` (renamed away, as some managed services do) is still
/// found standalone (its `CLUSTER INFO` refuses too) and decides; the script then knows no
/// server id, and the callers' hints alone tell a lost state.
#[tokio::test]
async fn a_server_that_refuses_info_is_found_standalone_and_decides() {
    let rig = Rig::load();
    let dir = std::env::temp_dir().join(format!("pacer-noinfo-{}", now_us()));
    let server = pacer_tests::RedisServer::start(&rig, &dir, &["--rename-command", "INFO", ""]);
    let conn = raw(&server.url()).await;
    assert!(
        !conn.is_cluster(),
        "a standalone server taken for a cluster"
    );
    let l = connect(&server.url()).await;
    let q = quota(Some(1), None, Duration::from_secs(30), None);
    let key = fresh_key("noinfo");
    let a = l
        .acquire(&key, &q, "a", req(1), Duration::from_secs(60))
        .await
        .expect("a");
    let b = l
        .acquire(&key, &q, "b", req(1), Duration::from_secs(60))
        .await
        .expect("b");
    assert!(matches!(a, Decision::Admitted { .. }), "{a:?}");
    assert!(matches!(b, Decision::Booked { .. }), "{b:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `rediss://`: the detection probe and the limiter speak TLS to a server that only takes
/// TLS on that port (a self-signed certificate, so the URL says `#insecure`: Pacer verifies
/// servers against Mozilla's roots, as managed services' certificates chain to them).
#[tokio::test]
async fn a_tls_only_port_is_reached_with_rediss() {
    let rig = Rig::load();
    let dir = std::env::temp_dir().join(format!("pacer-tls-{}", now_us()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("redis.crt"), dir.join("redis.key"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl (tests/rig/install)");
    assert!(made.success(), "openssl could not make a certificate");
    let tls_port = free_port().to_string();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let server = pacer_tests::RedisServer::start(
        &rig,
        &dir,
        &[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-auth-clients",
            "no",
        ],
    );
    let url = format!("rediss://127.0.0.1:{tls_port}/#insecure");
    let l = connect(&url).await;
    let q = quota(Some(1), None, Duration::from_secs(30), None);
    let key = fresh_key("tls");
    let a = l
        .acquire(&key, &q, "a", req(1), Duration::from_secs(60))
        .await
        .expect("a decision over TLS");
    assert!(matches!(a, Decision::Admitted { .. }), "{a:?}");
    // The TLS port does not speak plain Redis: the URL's scheme matters.
    let plain = RedisLimiter::connect(
        &format!("redis://127.0.0.1:{tls_port}"),
        RedisOptions {
            connect_timeout: Duration::from_secs(1),
            ..RedisOptions::default()
        },
    )
    .await;
    assert!(plain.is_err(), "plain Redis spoken to a TLS port");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
