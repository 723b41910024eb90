//! The operator, run in-process out of cluster against the rig's apiserver and Redis:
//! pools and chains compile into Redis, a `kubectl apply` changing a limit reaches Redis
//! within 2 s, status shows Ready and live usage read from the limiter, config Redis lost
//! comes back within a resync, bad chains report why (and do not stop the others), Events
//! and metrics appear, and deleting a pool removes its config.
use std::time::{Duration, Instant};

use k8s_openapi::api::{core::v1::Secret, events::v1::Event};
use kube::{Api, api::ListParams};
use pacer_core::{
    config::ConfigStore,
    limiter::{Asker, Blocker, Limiter, QuotaKey, redis::RedisLimiter},
    quota::Costs,
};
use pacer_crds::{ModelChain, QuotaPool};
use pacer_operator::{Operator, RunArgs, Shutdown};
use pacer_tests::{RedisKind, Rig, create_namespace, free_port, install_crds, kubectl};

fn pool_yaml(project: &str, rpm: u64) -> String {
    format!(
        r#"apiVersion: pacer.dev/v1alpha1
kind: QuotaPool
metadata:
  name: images
spec:
  project: {project}
  tier: Tier1
  headroomPercent: 0
  models:
    - name: gemini-3-pro-image
      rpm: {rpm}
      rpd: 250
    - name: gemini-3.1-flash-image
  apiKeySecret:
    name: gemini-api-key
"#
    )
}

const CHAIN: &str = r#"apiVersion: pacer.dev/v1alpha1
kind: ModelChain
metadata:
  name: thumbnails
spec:
  pool: images
  steps:
    - model: gemini-3.1-flash-image
      maxWaitSeconds: 10
    - model: gemini-3-pro-image
"#;

const CHAIN_BAD_MODEL: &str = r#"apiVersion: pacer.dev/v1alpha1
kind: ModelChain
metadata:
  name: imagen
spec:
  pool: images
  steps:
    - model: imagen-4.0-generate
"#;

const CHAIN_NO_POOL: &str = r#"apiVersion: pacer.dev/v1alpha1
kind: ModelChain
metadata:
  name: orphan
spec:
  pool: nowhere
  steps:
    - model: gemini-3-pro-image
"#;

/// Polls `check` every 20 ms until it returns Some or `within` passes.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn condition(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<(String, String)> {
    conds
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// On both of the rig's Redis: the single server and the three-primary Cluster.
async fn operator_reconciles_pools_and_chains_into_redis(redis_kind: RedisKind) {
    let rig = Rig::load();
    let client = rig.kube().await;
    install_crds(&client).await;
    let ns = Rig::unique("op-e2e");
    create_namespace(&client, &ns).await;
    let redis_url = rig.redis_url(redis_kind);
    let store = ConfigStore::connect(&redis_url).await.expect("redis");
    let mut secret = Secret::default();
    secret.metadata.name = Some("gemini-api-key".into());
    secret.string_data = Some([("api-key".to_owned(), "not-a-real-key".to_owned())].into());
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &secret)
        .await
        .expect("create Secret");

    let mut args = RunArgs::new(&redis_url);
    args.watch_namespace = Some(ns.clone());
    args.resync_seconds = 2;
    args.usage_refresh_seconds = 1;
    let shutdown = Shutdown::new();
    let operator = Operator::start(client.clone(), args, shutdown.clone())
        .await
        .expect("start operator");
    let metrics_addr = operator.metrics_addr();
    let running = tokio::spawn(operator.run());

    // A pool and a chain compile into Redis.
    let project = Rig::unique("proj");
    let pool_key = format!("{ns}/images");
    let chain_key = format!("{ns}/thumbnails");
    let (ok, _, err) = kubectl(
        &rig,
        &["apply", "-n", &ns, "-f", "-"],
        Some(&pool_yaml(&project, 20)),
    );
    assert!(ok, "{err}");
    let (ok, _, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(CHAIN));
    assert!(ok, "{err}");
    eventually(
        Duration::from_secs(10),
        "pool and chain in Redis",
        || async {
            let cfg = store.load().await.ok()?;
            let pool = cfg.pools.get(&pool_key)?;
            cfg.chains.get(&chain_key)?;
            (pool.models.get("gemini-3-pro-image")?.rpm == Some(20)).then_some(())
        },
    )
    .await;
    let cfg = store.load().await.expect("load");
    let pool = &cfg.pools[&pool_key];
    assert_eq!(pool.project, project);
    assert_eq!(
        pool.api_key_ref.as_deref(),
        Some(format!("{ns}/gemini-api-key#api-key").as_str())
    );
    assert!(
        pool.models["gemini-3.1-flash-image"].rpm.is_some(),
        "the tier table filled the flash model's rpm"
    );
    let (chain, _) = cfg.chain(&chain_key).expect("chain resolves to its pool");
    assert_eq!(chain.steps.len(), 2);

    // Status: Ready, observedGeneration, printer column data.
    let pools: Api<QuotaPool> = Api::namespaced(client.clone(), &ns);
    let chains: Api<ModelChain> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(10), "pool Ready", || async {
        let p = pools.get("images").await.ok()?;
        let s = p.status?;
        (condition(&s.conditions, "Ready") == Some(("True".into(), "Compiled".into()))
            && s.observed_generation == p.metadata.generation
            && s.model_count == Some(2)
            && s.requests.is_some())
        .then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "chain Ready", || async {
        let s = chains.get("thumbnails").await.ok()?.status?;
        (condition(&s.conditions, "Ready")?.0 == "True"
            && s.resolved.as_deref() == Some("gemini-3.1-flash-image → gemini-3-pro-image"))
        .then_some(())
    })
    .await;

    // kubectl apply changing a limit reaches Redis within 2 s.
    let (ok, _, err) = kubectl(
        &rig,
        &["apply", "-n", &ns, "-f", "-"],
        Some(&pool_yaml(&project, 30)),
    );
    let applied = Instant::now();
    assert!(ok, "{err}");
    eventually(Duration::from_secs(2), "changed rpm in Redis", || async {
        let cfg = store.load().await.ok()?;
        (cfg.pools
            .get(&pool_key)?
            .models
            .get("gemini-3-pro-image")?
            .rpm
            == Some(30))
        .then_some(())
    })
    .await;
    println!("apply -> Redis latency: {:?}", applied.elapsed());

    // Live usage from the limiter shows in status while requests are booked.
    let limiter = RedisLimiter::connect(&redis_url, Default::default())
        .await
        .expect("limiter");
    let cfg = store.load().await.expect("load");
    let quota = cfg.pools[&pool_key]
        .model_quota("gemini-3-pro-image")
        .expect("quota");
    let key = QuotaKey::new(&project, "gemini-3-pro-image");
    for i in 0..24 {
        limiter
            .acquire(
                &key,
                &quota,
                &format!("req-{i}"),
                Costs::new(1, 0, 0, 0),
                Duration::from_secs(60),
            )
            .await
            .expect("acquire");
    }
    let usage_at = Instant::now();
    let status = eventually(Duration::from_secs(5), "usage in status", || async {
        let s = pools.get("images").await.ok()?.status?;
        let pro = s.models.iter().find(|m| m.name == "gemini-3-pro-image")?;
        let req = pro.dimensions.iter().find(|d| d.dimension == "requests")?;
        (req.used == 24 && req.limit == Some(30)).then_some(s)
    })
    .await;
    println!("usage -> status latency: {:?}", usage_at.elapsed());
    assert_eq!(status.requests.as_deref(), Some("24/30"));
    assert_eq!(
        condition(&status.conditions, "NearLimit"),
        Some(("True".into(), "AboveThreshold".into())),
        "24/30 is above the default 80% alert threshold"
    );

    // A replica's account alert (its provider answered 401/403/402) shows as the pool's
    // AccountProblem condition while it lasts, and clears when it expires.
    let mut raw = pacer_tests::redis_at(&redis_url).await;
    redis::cmd("SET")
        .arg(pacer_core::config::account_alert_key(&pool_key))
        .arg("credit_exhausted (gemini-3-pro-image): prepaid credit spent")
        .arg("EX")
        .arg(3)
        .query_async::<()>(&mut raw)
        .await
        .expect("raise the alert");
    let raised = eventually(Duration::from_secs(5), "AccountProblem raised", || async {
        let s = pools.get("images").await.ok()?.status?;
        (condition(&s.conditions, "AccountProblem")?.0 == "True").then_some(s)
    })
    .await;
    let message = raised
        .conditions
        .iter()
        .find(|c| c.type_ == "AccountProblem")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("prepaid credit spent"), "{message}");
    eventually(
        Duration::from_secs(10),
        "AccountProblem cleared",
        || async {
            let s = pools.get("images").await.ok()?.status?;
            (condition(&s.conditions, "AccountProblem")?.0 == "False").then_some(())
        },
    )
    .await;

    // Bad chains say why, and do not stop the others.
    for doc in [CHAIN_BAD_MODEL, CHAIN_NO_POOL] {
        let (ok, _, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(doc));
        assert!(ok, "{err}");
    }
    for (name, reason) in [("imagen", "ModelNotInPool"), ("orphan", "PoolNotFound")] {
        eventually(Duration::from_secs(10), reason, || async {
            let s = chains.get(name).await.ok()?.status?;
            (condition(&s.conditions, "Ready") == Some(("False".into(), reason.into())))
                .then_some(())
        })
        .await;
    }

    // Redis loses the config (flush, restart): it is back within a resync (2 s here).
    let mut conn = pacer_tests::redis_at(&redis_url).await;
    let _: () = redis::cmd("HDEL")
        .arg(pacer_core::config::POOLS_KEY)
        .arg(&pool_key)
        .query_async(&mut conn)
        .await
        .expect("HDEL");
    let lost = Instant::now();
    eventually(
        Duration::from_secs(5),
        "config rewritten after loss",
        || async { store.load().await.ok()?.pools.get(&pool_key).map(|_| ()) },
    )
    .await;
    println!("config lost -> rewritten: {:?}", lost.elapsed());

    // Events on transitions, and metrics.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for want in [
        "Compiled",
        "AboveThreshold",
        "ModelNotInPool",
        "PoolNotFound",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "no {want} Event: {reasons:?}"
        );
    }
    let text = http_get(metrics_addr, "/metrics").await;
    assert!(
        text.contains("pacer_operator_reconciles_total{kind=\"quotapool\"}"),
        "{text}"
    );
    assert!(text.contains("pacer_operator_usage_ratio{"), "{text}");
    // The replicas the quota can keep busy, for KEDA's metrics-api trigger (issue 16).
    let scale = http_get(metrics_addr, &format!("/scale/{pool_key}")).await;
    let body = scale.split("\r\n\r\n").nth(1).unwrap_or_default();
    let advice: serde_json::Value = serde_json::from_str(body).expect("scale advice is JSON");
    println!("scale advice for {pool_key}: {advice}");
    assert!(
        advice["callsPerSecond"].as_f64().is_some_and(|r| r > 0.0),
        "{advice}"
    );
    assert!(
        advice["replicas"]
            .as_u64()
            .is_some_and(|n| (1..=4).contains(&n)),
        "a few replicas at most: {advice}"
    );
    assert_eq!(
        advice["callSecondsObserved"], false,
        "no call seen yet: {advice}"
    );
    // Replicas report their calls' durations; the advice follows the latest ones.
    let reporter = RedisLimiter::connect(&redis_url, Default::default())
        .await
        .expect("limiter");
    for _ in 0..4 {
        reporter
            .note_call(&pool_key, Duration::from_millis(1500))
            .await
            .expect("note a call");
    }
    let scale = http_get(metrics_addr, &format!("/scale/{pool_key}")).await;
    let body = scale.split("\r\n\r\n").nth(1).unwrap_or_default();
    let observed: serde_json::Value = serde_json::from_str(body).expect("JSON");
    println!("after four 1.5 s calls: {observed}");
    assert_eq!(observed["callSecondsObserved"], true, "{observed}");
    assert_eq!(observed["callSeconds"], 1.5, "{observed}");
    assert_eq!(
        observed["replicas"], 1,
        "8.7 calls/s x 1.5 s / 64: {observed}"
    );
    assert!(
        http_get(metrics_addr, &format!("/scale/{ns}/no-such-pool"))
            .await
            .contains(" 404 "),
        "an unknown pool is 404"
    );
    assert!(
        http_get(metrics_addr, "/readyz")
            .await
            .starts_with("HTTP/1.0 200")
            || http_get(metrics_addr, "/readyz")
                .await
                .starts_with("HTTP/1.1 200")
    );

    // Deleting the pool removes its config (the finalizer runs first).
    let (ok, _, err) = kubectl(
        &rig,
        &[
            "delete",
            "quotapool",
            "images",
            "-n",
            &ns,
            "--wait=true",
            "--timeout=20s",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(
        !store
            .load()
            .await
            .expect("load")
            .pools
            .contains_key(&pool_key),
        "the pool's config outlived the pool"
    );
    // The chain that used it now reports the missing pool.
    eventually(
        Duration::from_secs(10),
        "chain notices its pool is gone",
        || async {
            let s = chains.get("thumbnails").await.ok()?.status?;
            (condition(&s.conditions, "Ready") == Some(("False".into(), "PoolNotFound".into())))
                .then_some(())
        },
    )
    .await;
    let (ok, _, err) = kubectl(
        &rig,
        &[
            "delete",
            "modelchains",
            "--all",
            "-n",
            &ns,
            "--wait=true",
            "--timeout=20s",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(
        !store
            .load()
            .await
            .expect("load")
            .chains
            .contains_key(&chain_key)
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("operator stops within 10 s of shutdown")
        .expect("join")
        .expect("operator ends cleanly");
}

/// A Redis of this test's own (the rig's is shared), so it can be stopped and restarted.
struct OwnRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package; `tests/rig/install`)");
        // Wait until it listens (a bound on the test, not a measurement).
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis {
            port,
            child: Some(child),
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Redis going away shows as Degraded (naming the failure mode in force) without
/// crashing the loop; when it comes back (empty, as after a restart) the config is
/// rewritten within a resync and Degraded clears. Two replicas with leader election:
/// only the Lease holder reconciles, and the standby takes over when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_degrades_and_recovers_and_a_standby_takes_over() {
    let rig = Rig::load();
    let client = rig.kube().await;
    install_crds(&client).await;
    let ns = Rig::unique("op-outage");
    create_namespace(&client, &ns).await;
    let mut redis = OwnRedis::start(free_port());

    let start_replica = |identity: &str| {
        let mut args = RunArgs::new(redis.url());
        args.watch_namespace = Some(ns.clone());
        args.resync_seconds = 1;
        args.leader_elect = true;
        args.lease_name = format!("pacer-{ns}");
        args.lease_namespace = Some(ns.clone());
        args.lease_duration_seconds = 6;
        args.identity = Some(identity.to_owned());
        args.removal_patience_seconds = 2;
        let client = client.clone();
        async move {
            let shutdown = Shutdown::new();
            let op = Operator::start(client, args, shutdown.clone())
                .await
                .expect("start");
            let metrics = op.metrics_addr();
            (shutdown, metrics, tokio::spawn(op.run()))
        }
    };
    let leader = |addr| async move {
        http_get(addr, "/metrics")
            .await
            .lines()
            .any(|l| l.trim() == "pacer_operator_leader 1")
    };
    let (stop_a, metrics_a, run_a) = start_replica("replica-a").await;
    // Replica a takes the Lease first, then the standby starts.
    eventually(Duration::from_secs(15), "replica a leads", || async {
        leader(metrics_a).await.then_some(())
    })
    .await;
    let (stop_b, metrics_b, run_b) = start_replica("replica-b").await;

    let yaml = pool_yaml(&Rig::unique("proj"), 20).replace(
        "  apiKeySecret:\n    name: gemini-api-key\n",
        "  failureMode: local\n  expectedReplicas: 4\n",
    );
    let (ok, _, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(&yaml));
    assert!(ok, "{err}");
    let pools: Api<QuotaPool> = Api::namespaced(client.clone(), &ns);
    let ready = |want: &'static str| {
        let pools = pools.clone();
        move || {
            let pools = pools.clone();
            async move {
                let s = pools.get("images").await.ok()?.status?;
                (condition(&s.conditions, "Ready")?.0 == want).then_some(s)
            }
        }
    };
    eventually(Duration::from_secs(15), "pool Ready", ready("True")).await;
    assert!(leader(metrics_a).await, "replica a leads");
    assert!(
        !leader(metrics_b).await,
        "replica b stands by: {}",
        http_get(metrics_b, "/metrics").await
    );

    // Redis goes away: Degraded, with the failure mode in force; the loop keeps running.
    redis.stop();
    let s = eventually(Duration::from_secs(15), "Degraded", || async {
        let s = pools.get("images").await.ok()?.status?;
        (condition(&s.conditions, "Degraded")?.0 == "True").then_some(s)
    })
    .await;
    let degraded = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(degraded.reason, "RedisUnavailable");
    assert!(
        degraded.message.contains("failureMode local"),
        "{}",
        degraded.message
    );
    assert!(!run_a.is_finished(), "the operator died with Redis");

    // A pool deleted while Redis is down: its finalizer waits the removal patience (2 s
    // here), then lets the deletion finish instead of hanging until Redis is back.
    let doomed = pool_yaml(&Rig::unique("proj"), 5)
        .replace("name: images", "name: doomed")
        .replace(
            "  apiKeySecret:\n    name: gemini-api-key\n",
            "  failureMode: local\n  expectedReplicas: 4\n",
        );
    let (ok, _, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(&doomed));
    assert!(ok, "{err}");
    eventually(
        Duration::from_secs(15),
        "the finalizer on the new pool",
        || async {
            let p = pools.get("doomed").await.ok()?;
            (!p.metadata.finalizers.unwrap_or_default().is_empty()).then_some(())
        },
    )
    .await;
    let (ok, _, err) = kubectl(
        &rig,
        &[
            "delete",
            "quotapool",
            "doomed",
            "-n",
            &ns,
            "--wait=true",
            "--timeout=30s",
        ],
        None,
    );
    assert!(ok, "deleting a pool while Redis is down hangs: {err}");

    // Redis is back, empty: the config is rewritten and Degraded clears.
    let redis = OwnRedis::start(redis.port);
    let store = ConfigStore::connect(&redis.url())
        .await
        .expect("redis back");
    eventually(
        Duration::from_secs(20),
        "config rewritten after restart",
        || async {
            store
                .load()
                .await
                .ok()?
                .pools
                .get(&format!("{ns}/images"))
                .map(|_| ())
        },
    )
    .await;
    eventually(Duration::from_secs(15), "Degraded cleared", || async {
        let s = pools.get("images").await.ok()?.status?;
        (condition(&s.conditions, "Degraded")?.0 == "False").then_some(())
    })
    .await;

    // The leader stops (and hands back the Lease): the standby takes over and reconciles.
    stop_a.cancel();
    tokio::time::timeout(Duration::from_secs(15), run_a)
        .await
        .expect("replica a stops")
        .expect("join")
        .expect("replica a ends cleanly");
    let handover = Instant::now();
    eventually(Duration::from_secs(15), "standby leads", || async {
        leader(metrics_b).await.then_some(())
    })
    .await;
    println!("leader handover: {:?}", handover.elapsed());
    let (ok, _, err) = kubectl(
        &rig,
        &["apply", "-n", &ns, "-f", "-"],
        Some(&yaml.replace("rpm: 20", "rpm: 25")),
    );
    assert!(ok, "{err}");
    eventually(
        Duration::from_secs(5),
        "standby writes the change",
        || async {
            let cfg = store.load().await.ok()?;
            (cfg.pools
                .get(&format!("{ns}/images"))?
                .models
                .get("gemini-3-pro-image")?
                .rpm
                == Some(25))
            .then_some(())
        },
    )
    .await;
    let (ok, _, err) = kubectl(
        &rig,
        &[
            "delete",
            "quotapool",
            "images",
            "-n",
            &ns,
            "--wait=true",
            "--timeout=20s",
        ],
        None,
    );
    assert!(ok, "{err}");

    stop_b.cancel();
    tokio::time::timeout(Duration::from_secs(15), run_b)
        .await
        .expect("replica b stops")
        .expect("join")
        .expect("replica b ends cleanly");
}

/// Issue 18: a running fleet of `pacer worker` processes obeys a limit lowered with
/// `kubectl apply` within 2 s, bookings made under the old limit included, judged by the
/// simulator at arrival: no window of the pool's length that starts 2 s after the apply
/// holds more calls than the new limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_workers_obey_a_lowered_limit_within_two_seconds() {
    limit_change_at_the_simulator(10, 5).await;
}

/// The same with the limit raised: no window ever holds more than the new limit, and the
/// fleet reaches it within one window of the change taking effect (bookings already queued
/// stay where they are; new ones take the room the raise opens at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_workers_never_exceed_a_raised_limit() {
    limit_change_at_the_simulator(5, 10).await;
}

/// Runs a fleet at `before` calls per 5 s, applies `after`, and judges the arrivals at the
/// simulator from 2 s after the apply by the new limit.
async fn limit_change_at_the_simulator(before: u64, after: u64) {
    use pacer_simulator::{LimitSpec, SimConfig, Simulator};
    const MODEL: &str = "gemini-3.1-flash-image";
    let window_s = 5u64;
    let rig = Rig::load();
    let client = rig.kube().await;
    install_crds(&client).await;
    let ns = Rig::unique("op-lower").to_lowercase();
    create_namespace(&client, &ns).await;
    let redis_url = rig.get("REDIS_URL");
    let store = ConfigStore::connect(&redis_url).await.expect("redis");
    let mut args = RunArgs::new(&redis_url);
    args.watch_namespace = Some(ns.clone());
    args.resync_seconds = 2;
    let shutdown = Shutdown::new();
    let operator = Operator::start(client.clone(), args, shutdown.clone())
        .await
        .expect("start operator");
    let running = tokio::spawn(operator.run());

    // A pool and a chain with a long max wait, so bookings queue windows ahead.
    let project = Rig::unique("proj");
    let pool = |rpm: u64| {
        format!(
            "apiVersion: pacer.dev/v1alpha1\nkind: QuotaPool\nmetadata: {{name: pool}}\n\
             spec:\n  project: {project}\n  tier: Tier2\n  headroomPercent: 0\n  windowMarginMs: 500\n  models:\n  - {{name: {MODEL}, rpm: {rpm}, windowSeconds: {window_s}}}\n"
        )
    };
    let chain = format!(
        "apiVersion: pacer.dev/v1alpha1\nkind: ModelChain\nmetadata: {{name: chain}}\n\
         spec:\n  pool: pool\n  requestTimeoutSeconds: 30\n  steps:\n  - {{model: {MODEL}, maxWaitSeconds: 20}}\n"
    );
    for doc in [pool(before), chain] {
        let (ok, _, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(&doc));
        assert!(ok, "{err}");
    }
    let pool_key = format!("{ns}/pool");
    let has_rpm = |rpm: u64| {
        let (store, pool_key) = (&store, &pool_key);
        move || async move {
            let cfg = store.load().await.ok()?;
            (cfg.pools.get(pool_key)?.models.get(MODEL)?.rpm == Some(rpm)).then_some(())
        }
    };
    eventually(Duration::from_secs(10), "pool in Redis", has_rpm(before)).await;

    // The simulator counts at arrival; its own limit is far above the pool's.
    let mut limit = LimitSpec::new(MODEL);
    limit.rpm = Some(1_000);
    limit.window = Duration::from_secs(window_s);
    let sim = Simulator::new(SimConfig {
        limits: vec![limit],
        latency: Duration::from_millis(200),
        ..SimConfig::default()
    });
    let listener = Simulator::bind(([127, 0, 0, 1], 0).into()).expect("bind the simulator");
    let sim_url = format!("http://{}", listener.local_addr().expect("address"));
    let app = sim.router();
    let sim_task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // Demand at twice the higher limit, arriving all along (a backlog sent at once is told
    // when to come back, and a hidden message cannot be recalled: only demand still
    // arriving can use room a raise opens), and three workers eager for it.
    let sqs = rig.sqs().await;
    let s3 = rig.s3().await;
    let mut queues = Vec::new();
    for name in [ns.clone(), format!("{ns}-results")] {
        queues.push(rig.create_queue(&name).await);
    }
    s3.create_bucket().bucket(&ns).send().await.expect("bucket");
    let pace = Duration::from_millis(1_000 * window_s / (2 * before.max(after)));
    let sender = {
        let (sqs, queue, ns) = (sqs.clone(), queues[0].clone(), ns.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(pace);
            for i in 0.. {
                tick.tick().await;
                let body = serde_json::json!({
                    "id": format!("{ns}-r{i}"), "chain": format!("{ns}/chain"), "prompt": format!("a lighthouse, take {i}")
                });
                sqs.send_message()
                    .queue_url(&queue)
                    .message_body(body.to_string())
                    .send()
                    .await
                    .expect("send a request");
            }
        })
    };
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir).expect("log folder");
    let mut workers = pacer_tests::Children::default();
    for w in 0..3 {
        let log = std::fs::File::create(dir.join(format!("w{w}.log"))).expect("log file");
        let child = std::process::Command::new(pacer_tests::pacer_bin())
            .arg("worker")
            .env("PACER_QUEUE_URL", &queues[0])
            .env("PACER_RESULT_QUEUE_URL", &queues[1])
            .env("PACER_REDIS_URL", &redis_url)
            .env("PACER_GEMINI_BASE_URL", &sim_url)
            .env("PACER_GEMINI_API_KEY", "test-key")
            .env("PACER_SINK", format!("s3://{ns}/images"))
            .env("PACER_CONCURRENCY", "8")
            .env("PACER_VISIBILITY_SECONDS", "4")
            .env("PACER_WAIT_SECONDS", "1")
            .env("PACER_CLAIM_LEASE_SECONDS", "3")
            .env("PACER_METRICS_ADDR", "127.0.0.1:0")
            .env("PACER_REPLICA_ID", format!("w{w}"))
            .env("AWS_ENDPOINT_URL", rig.get("AWS_ENDPOINT_URL"))
            .env("AWS_ACCESS_KEY_ID", rig.get("AWS_ACCESS_KEY_ID"))
            .env("AWS_SECRET_ACCESS_KEY", rig.get("AWS_SECRET_ACCESS_KEY"))
            .env("AWS_REGION", rig.get("AWS_REGION"))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pacer worker");
        workers.0.push(child);
    }
    let accepted = |sim: &Simulator| -> Vec<i64> {
        sim.stats()["models"][MODEL]["accepted_at_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
            .unwrap_or_default()
    };
    // Running at the old limit, with bookings queued windows ahead.
    eventually(Duration::from_secs(60), "the fleet at work", || async {
        (accepted(&sim).len() >= 2 * before as usize).then_some(())
    })
    .await;

    let (ok, _, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(&pool(after)));
    let changed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    assert!(ok, "{err}");
    eventually(
        Duration::from_secs(2),
        "lowered rpm in Redis",
        has_rpm(after),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4 * window_s)).await;

    let times = accepted(&sim);
    let w_ms = 1_000 * window_s as i64;
    // The most arrivals in a window [t, t + w) over the windows starting at an arrival at or
    // after `from`.
    let most = |from: i64| {
        let after: Vec<i64> = times.iter().copied().filter(|t| *t >= from).collect();
        (0..after.len())
            .map(|i| {
                after[i..]
                    .iter()
                    .take_while(|t| **t < after[i] + w_ms)
                    .count()
            })
            .max()
            .unwrap_or(0)
    };
    let before_change = times.iter().filter(|t| **t < changed_ms).count();
    let obeyed_from = (0..=20)
        .map(|k| k * 500)
        .find(|d| most(changed_ms + d) <= after as usize);
    // The first arrival after the apply that closes a window holding the new limit. The
    // window may begin before the apply: on a raise, no window held that many under the old
    // limit. (Counting only arrivals after the apply made this depend on the phase of the
    // old bookings' clusters: a run whose first ten calls after the apply spanned 5.011 s
    // read 10.6 s, while the window ending at its fifth call held ten.)
    let reached = times
        .iter()
        .filter(|t| **t >= changed_ms)
        .find(|&&t| times.iter().filter(|u| **u > t - w_ms && **u <= t).count() >= after as usize)
        .map(|t| t - changed_ms);
    println!(
        "{} calls before the change, {} after; most in a {window_s} s window from the change: {}, \
         from 2 s after: {}; the first window start (in 500 ms steps) from which none holds \
         more than {after}: {obeyed_from:?} ms after the apply; {after} calls within one window \
         first {reached:?} ms after it",
        before_change,
        times.len() - before_change,
        most(changed_ms),
        most(changed_ms + 2_000),
    );
    assert!(
        times.len() - before_change >= 2 * after as usize,
        "the fleet kept working after the change"
    );
    if after > before {
        assert!(
            reached.is_some_and(|ms| ms <= 2_000 + w_ms),
            "{after} calls within one {window_s} s window first {reached:?} ms after the apply"
        );
    }
    assert!(
        most(changed_ms + 2_000) <= after as usize,
        "a {window_s} s window starting 2 s after the apply holds {} calls, limit {after}",
        most(changed_ms + 2_000)
    );
    sender.abort();
    drop(workers);
    sim_task.abort();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
}

pacer_tests::on_both_redis!(operator_reconciles_pools_and_chains_into_redis);

/// Issue 15: a pool's tenants in its status. Two tenants book on the global limiter; the
/// operator reports each one's requests in the window, its share, its daily budget left,
/// the busiest tenant as a `kubectl get` column, and `BudgetSpent` once a budget is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_show_their_use_share_and_budget_in_the_pools_status() {
    let rig = Rig::load();
    let client = rig.kube().await;
    install_crds(&client).await;
    let ns = Rig::unique("op-tenants");
    create_namespace(&client, &ns).await;
    let redis_url = rig.redis_url(RedisKind::Single);
    let store = ConfigStore::connect(&redis_url).await.expect("redis");
    let mut args = RunArgs::new(&redis_url);
    args.watch_namespace = Some(ns.clone());
    args.resync_seconds = 2;
    args.usage_refresh_seconds = 1;
    let shutdown = Shutdown::new();
    let operator = Operator::start(client.clone(), args, shutdown.clone())
        .await
        .expect("start operator");
    let running = tokio::spawn(operator.run());
    let project = Rig::unique("proj");
    let pool_yaml = format!(
        r#"apiVersion: pacer.dev/v1alpha1
kind: QuotaPool
metadata:
  name: teams
spec:
  project: {project}
  tier: Tier1
  models:
    - name: gemini-3-pro-image
      rpm: 20
      priceUsdPerImage: 0.10
  tenants:
    - name: web
      weight: 3
      dailyBudgetUsd: 0.20
    - name: batch
      weight: 1
"#
    );
    let (ok, _, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(&pool_yaml));
    assert!(ok, "{err}");
    let pool_key = format!("{ns}/teams");
    let quota = eventually(Duration::from_secs(10), "pool in Redis", || async {
        let cfg = store.load().await.ok()?;
        let pool = cfg.pools.get(&pool_key)?;
        (pool.tenants.len() == 2).then(|| pool.model_quota("gemini-3-pro-image"))?
    })
    .await;
    let limiter = RedisLimiter::connect(&redis_url, Default::default())
        .await
        .expect("limiter");
    let key = QuotaKey::new(&project, "gemini-3-pro-image");
    let book = |tenant: &'static str, id: String| {
        let (limiter, key, quota) = (&limiter, &key, &quota);
        async move {
            limiter
                .acquire_for(
                    key,
                    quota,
                    Asker {
                        tenant,
                        priority: 0,
                    },
                    &id,
                    Costs::new(1, 0, 1, 100_000),
                    Duration::from_secs(60),
                )
                .await
                .expect("acquire")
        }
    };
    for i in 0..2 {
        assert!(book("web", format!("web-{i}")).await.ticket().is_some());
    }
    assert_eq!(
        book("web", "web-2".into()).await.blocker(),
        Some(Blocker::Budget),
        "$0.20 spent by two $0.10 images"
    );
    for i in 0..6 {
        assert!(book("batch", format!("batch-{i}")).await.ticket().is_some());
    }
    let pools: Api<QuotaPool> = Api::namespaced(client.clone(), &ns);
    let status = eventually(Duration::from_secs(10), "tenants in status", || async {
        let s = pools.get("teams").await.ok()?.status?;
        (s.tenants.iter().map(|t| t.requests).sum::<u64>() == 8).then_some(s)
    })
    .await;
    let web = status
        .tenants
        .iter()
        .find(|t| t.name == "web")
        .expect("web");
    let batch = status
        .tenants
        .iter()
        .find(|t| t.name == "batch")
        .expect("batch");
    assert_eq!((web.requests, web.share_percent), (2, 25), "{web:?}");
    assert_eq!((batch.requests, batch.share_percent), (6, 75), "{batch:?}");
    assert_eq!(web.expected_share_percent, 75, "weights 3:1");
    assert!((web.spent_today_usd - 0.2).abs() < 1e-9, "{web:?}");
    assert_eq!(web.budget_left_today_usd, Some(0.0), "{web:?}");
    assert_eq!(web.budget_spent.as_deref(), Some("day"), "{web:?}");
    assert_eq!(batch.budget_left_today_usd, None, "batch has no budget");
    assert_eq!(status.busiest_tenant.as_deref(), Some("batch 75%"));
    assert_eq!(
        condition(&status.conditions, "BudgetSpent"),
        Some(("True".into(), "TenantBudgetSpent".into()))
    );
    let (ok, out, err) = kubectl(&rig, &["get", "qp", "-n", &ns, "teams"], None);
    assert!(ok, "{err}");
    assert!(
        out.contains("BUSIEST TENANT") && out.contains("batch 75%"),
        "{out}"
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
}
