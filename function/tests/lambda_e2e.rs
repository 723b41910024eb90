//! The Lambda path end to end: messages received from moto's SQS are invoked through a
//! Lambda runtime API (`cargo lambda watch`; AWS's Runtime Interface Emulator where a real
//! deadline matters); what cannot get capacity now is reported in `batchItemFailures` with
//! its visibility set to the booked wait, comes back no earlier than the window frees (and
//! long before the receive's own visibility), and completes on a later invocation; the
//! simulator sees each request exactly once. The function's cold start is printed as a
//! benchmark figure, not asserted.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aws_sdk_sqs::types::Message;
use pacer_simulator::{LimitSpec, SimConfig, Simulator};
use pacer_tests::{Children, Rig, free_port, single_model_config};
use redis::AsyncCommands;

const MODEL: &str = "gemini-3.1-flash-image";

async fn wait_port(port: u16, what: &str) {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} did not listen on {port} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_defers_with_batch_item_failures_and_completes_later() {
    let rig = Rig::load();
    let mut redis = rig.redis().await;
    let s3 = rig.s3().await;
    let ns = Rig::unique("lambda");

    let mut limit = LimitSpec::new(MODEL);
    limit.rpm = Some(4);
    limit.window = Duration::from_secs(4);
    // The simulator takes only the pool's own key: a call under the function's default
    // key would be refused.
    let sim = Simulator::new(SimConfig {
        limits: vec![limit],
        keys: vec!["the-pool-s-key".parse().expect("key")],
        ..SimConfig::default()
    })
    .spawn()
    .await
    .expect("simulator");
    // Four per 4 s, no waiting in the step: a batch of 10 admits 4 and defers the rest. The
    // pool calls with its project's key (apiKeyEnv), from Secrets Manager.
    let config = single_model_config(&ns, MODEL, 4, 4, 0).replace(
        "  tier: Tier2\n",
        "  tier: Tier2\n  apiKeyEnv: PACER_TEST_POOL_KEY\n",
    );
    assert!(config.contains("apiKeyEnv"), "{config}");
    rig.apply_config(&config).await;
    let queue_url = rig.create_queue(&ns).await;
    s3.create_bucket().bucket(&ns).send().await.expect("bucket");

    // The Lambda runtime API, from cargo-lambda; the function binary is started by us so we
    // can time its start.
    let port = free_port();
    let watch = Command::new(rig.get("CARGO_LAMBDA"))
        .args([
            "lambda",
            "watch",
            "--only-lambda-apis",
            "-A",
            "127.0.0.1",
            "-P",
            &port.to_string(),
        ])
        .current_dir(Rig::repo_root().join("function"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cargo lambda watch (tests/rig/install puts it in the venv)");
    let mut children = Children(vec![watch]);
    wait_port(port, "cargo lambda watch").await;

    // The Redis URL and the API key live in Secrets Manager (moto's), as the template
    // deploys them: the function reads them at start.
    let secrets = aws_sdk_secretsmanager::Client::new(&rig.aws_config().await);
    let mut arns = Vec::new();
    for (name, value) in [
        (format!("{ns}-redis-url"), rig.get("REDIS_URL")),
        (format!("{ns}-gemini-key"), "test-key".to_owned()),
        (format!("{ns}-pool-key"), "the-pool-s-key".to_owned()),
    ] {
        let out = secrets
            .create_secret()
            .name(name)
            .secret_string(value)
            .send()
            .await
            .expect("create a secret on moto");
        arns.push(out.arn.expect("the secret's ARN"));
    }
    let mut function = Command::new(env!("CARGO_BIN_EXE_pacer-lambda"))
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{port}/.rt"),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", "_")
        .env("PACER_REDIS_URL_SECRET_ARN", &arns[0])
        .env("PACER_GEMINI_BASE_URL", sim.url())
        .env("PACER_GEMINI_API_KEY_SECRET_ARN", &arns[1])
        .env("PACER_TEST_POOL_KEY_SECRET_ARN", &arns[2])
        .env("PACER_SINK", format!("s3://{ns}/images"))
        .env("AWS_ENDPOINT_URL", rig.get("AWS_ENDPOINT_URL"))
        .env("AWS_ACCESS_KEY_ID", rig.get("AWS_ACCESS_KEY_ID"))
        .env("AWS_SECRET_ACCESS_KEY", rig.get("AWS_SECRET_ACCESS_KEY"))
        .env("AWS_REGION", rig.get("AWS_REGION"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pacer-lambda");
    let stderr = function.stderr.take().expect("stderr");
    children.0.push(function);
    let (init_tx, init_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(ms) = line.split("init_ms=").nth(1) {
                let ms: u64 = ms
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u64::MAX);
                let _ = init_tx.send(ms);
            }
            if line.contains("ERROR") {
                eprintln!("pacer-lambda: {line}");
            }
        }
    });
    let init_ms = init_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("pacer-lambda logged its init time");
    // A benchmark figure (debug build, shared machine), not a test.
    println!("benchmark: pacer-lambda cold start (init) {init_ms} ms");

    const N: usize = 10;
    rig.send_bodies(&queue_url, kites(&ns, N)).await;
    let mapping = Mapping::new(
        &rig,
        &queue_url,
        &ns,
        format!("http://127.0.0.1:{port}/2015-03-31/functions/_/invocations"),
    )
    .await;
    // The first batch holds all N messages (moto may hand them out over several receives),
    // so what it admits and defers is exact.
    let start = Instant::now();
    let mut batch = mapping.receive_all(N).await;
    let mut invocations = 0;
    let mut deferrals = Vec::new();
    let mut first_invoked: Option<Instant> = None;
    let mut returned_after: Option<Duration> = None;
    loop {
        if batch.is_empty() {
            let done = succeeded(&mut redis, &ns, N).await;
            if done == N {
                break;
            }
            // A bound on the test, well under the receive's visibility: deferred messages
            // that kept it would never come back in time.
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "only {done} of {N} done after 120 s: deferred messages did not come back"
            );
            batch = mapping.receive(10).await;
            if batch.is_empty() {
                continue;
            }
        }
        if let (Some(at), None) = (first_invoked, returned_after) {
            returned_after = Some(at.elapsed());
        }
        let invoked = Instant::now();
        let failed = mapping
            .invoke(std::mem::take(&mut batch))
            .await
            .unwrap_or_else(|e| panic!("the invocation failed: {e}"));
        first_invoked.get_or_insert(invoked);
        invocations += 1;
        deferrals.push(failed.len());
    }
    let deferred_total: usize = deferrals.iter().sum();
    println!(
        "lambda: {invocations} invocations, deferrals per invocation {deferrals:?}, first return after {returned_after:?}"
    );
    // Four per window, no waiting in the step: the first batch of ten admits exactly four.
    assert_eq!(
        deferrals.first(),
        Some(&6),
        "deferrals per invocation {deferrals:?}"
    );
    // Ten requests at four per window need three windows, so at least three invocations;
    // the six deferred once and the two that do not fit the second window deferred again.
    assert!(invocations >= 3, "{invocations} invocations: {deferrals:?}");
    assert!(
        deferred_total >= 8,
        "deferrals per invocation {deferrals:?}"
    );
    // A deferred message comes back no earlier than the window frees: the first four
    // calls started after the first invocation began, and the window is 4 s (visibility
    // rounds up to whole seconds, never early).
    let back = returned_after.expect("deferred messages came back");
    assert!(
        back >= Duration::from_secs(4),
        "a deferred message came back after {back:?}, before the window freed"
    );
    let m = &sim.stats()["models"][MODEL];
    assert_eq!(
        (m["accepted"].as_u64(), m["arrivals"].as_u64()),
        (Some(N as u64), Some(N as u64)),
        "each request reached the provider exactly once, nothing refused: {m}"
    );
    assert_eq!(
        (
            m["tickets"]["untagged"].as_u64(),
            m["tickets"]["duplicates"].as_u64()
        ),
        (Some(0), Some(0)),
        "provider calls without their own limiter entry: {m}"
    );
}

/// `n` requests `<ns>-l<i>` on the chain `<ns>/chain`.
fn kites(ns: &str, n: usize) -> impl Iterator<Item = serde_json::Value> {
    let ns = ns.to_owned();
    (0..n).map(move |i| {
        serde_json::json!({"id": format!("{ns}-l{i}"), "chain": format!("{ns}/chain"), "prompt": format!("a kite {i}")})
    })
}

async fn succeeded(redis: &mut redis::aio::MultiplexedConnection, ns: &str, n: usize) -> usize {
    let mut done = 0;
    for i in 0..n {
        let r: Option<String> = redis
            .get(pacer_core::keys::result(&format!("{ns}-l{i}")))
            .await
            .expect("redis");
        if r.is_some_and(|r| r.contains("\"succeeded\"")) {
            done += 1;
        }
    }
    done
}

/// Received messages stay invisible this long unless the function changes it: a deferred
/// message that comes back at all had its visibility set to its booked wait.
const RECEIVE_VISIBILITY: i32 = 600;

/// What Lambda's SQS event source mapping does (with `ReportBatchItemFailures`): receive a
/// batch, invoke the function with it, delete what the function did not report.
struct Mapping {
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    arn: String,
    region: String,
    invoke_url: String,
    http: reqwest::Client,
}

impl Mapping {
    async fn new(rig: &Rig, queue_url: &str, queue_name: &str, invoke_url: String) -> Mapping {
        let region = rig.get("AWS_REGION");
        Mapping {
            sqs: rig.sqs().await,
            queue_url: queue_url.to_owned(),
            arn: format!("arn:aws:sqs:{region}:123456789012:{queue_name}"),
            region,
            invoke_url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
        }
    }

    /// Up to `max` messages (waits up to 1 s for the first).
    async fn receive(&self, max: usize) -> Vec<Message> {
        self.sqs
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max as i32)
            .visibility_timeout(RECEIVE_VISIBILITY)
            .wait_time_seconds(1)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive")
            .messages
            .unwrap_or_default()
    }

    /// Exactly `n` messages, however moto hands them out over several receives.
    async fn receive_all(&self, n: usize) -> Vec<Message> {
        let start = Instant::now();
        let mut batch = Vec::new();
        while batch.len() < n {
            batch.extend(self.receive(n - batch.len()).await);
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "only {} of {n} messages received (bound on the test)",
                batch.len()
            );
        }
        batch
    }

    /// Invokes the function with `messages` as one SQS event and deletes those it did not
    /// report; returns the reported ids, or the invocation's error (a timeout included).
    async fn invoke(&self, messages: Vec<Message>) -> Result<Vec<String>, String> {
        let records: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                let count = m
                    .attributes
                    .as_ref()
                    .and_then(|a| {
                        a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount)
                    })
                    .cloned()
                    .unwrap_or_else(|| "1".into());
                serde_json::json!({
                    "messageId": m.message_id, "receiptHandle": m.receipt_handle, "body": m.body,
                    "attributes": {"ApproximateReceiveCount": count},
                    "messageAttributes": {}, "md5OfBody": m.md5_of_body,
                    "eventSource": "aws:sqs", "eventSourceARN": self.arn, "awsRegion": self.region,
                })
            })
            .collect();
        let answer = self
            .http
            .post(&self.invoke_url)
            .json(&serde_json::json!({ "Records": records }))
            .send()
            .await
            .map_err(|e| format!("invoke: {e}"))?
            .text()
            .await
            .map_err(|e| format!("invoke: {e}"))?;
        let response: serde_json::Value =
            serde_json::from_str(&answer).map_err(|_| format!("not JSON: {answer}"))?;
        let failed: Vec<String> = response["batchItemFailures"]
            .as_array()
            .ok_or_else(|| format!("not an SqsBatchResponse: {answer}"))?
            .iter()
            .filter_map(|f| f["itemIdentifier"].as_str().map(str::to_owned))
            .collect();
        // What Lambda does: delete what was not reported.
        for m in &messages {
            if !failed
                .iter()
                .any(|f| Some(f.as_str()) == m.message_id.as_deref())
            {
                self.sqs
                    .delete_message()
                    .queue_url(&self.queue_url)
                    .receipt_handle(m.receipt_handle.clone().expect("receipt"))
                    .send()
                    .await
                    .expect("delete");
            }
        }
        Ok(failed)
    }
}

/// Lambda's function timeout in the test below, in seconds.
const FUNCTION_TIMEOUT_SECONDS: u64 = 10;

/// A function timeout shorter than the chain's budget (a 30 s wait per step): under AWS's
/// Runtime Interface Emulator, which gives every invocation a real deadline and stops the
/// function at it, no invocation is cut off. What cannot finish before the deadline is
/// deferred and completes on a later invocation; each request reaches the provider once
/// and nothing is dead-lettered. (`cargo lambda watch` sends a fixed deadline in 1970 and
/// enforces none, so it cannot show this.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_shorter_than_the_chain_budget_cuts_no_invocation_off() {
    let rig = Rig::load();
    let mut redis = rig.redis().await;
    let s3 = rig.s3().await;
    let ns = Rig::unique("lambdadl");

    // Two per 4 s and a second per call: a batch of ten waiting inline for its turn would
    // run 17 s, past the 10 s timeout.
    let mut limit = LimitSpec::new(MODEL);
    limit.rpm = Some(2);
    limit.window = Duration::from_secs(4);
    let sim = Simulator::new(SimConfig {
        limits: vec![limit],
        latency: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .spawn()
    .await
    .expect("simulator");
    let config = single_model_config(&ns, MODEL, 2, 4, 30).replace(
        "  pool: pool\n",
        "  pool: pool\n  requestTimeoutSeconds: 3\n",
    );
    assert!(config.contains("requestTimeoutSeconds"), "{config}");
    rig.apply_config(&config).await;
    let (queue_url, dlq_url) = rig.create_queue_with_dlq(&ns, 5).await;
    s3.create_bucket().bucket(&ns).send().await.expect("bucket");

    let (port, runtime_port) = (free_port(), free_port());
    let mut emulator = Command::new(rig.get("AWS_LAMBDA_RIE"));
    emulator
        .args([
            "--runtime-interface-emulator-address",
            &format!("127.0.0.1:{port}"),
            "--runtime-api-address",
            &format!("127.0.0.1:{runtime_port}"),
            env!("CARGO_BIN_EXE_pacer-lambda"),
        ])
        .env(
            "AWS_LAMBDA_FUNCTION_TIMEOUT",
            FUNCTION_TIMEOUT_SECONDS.to_string(),
        )
        .env("PACER_REDIS_URL", rig.get("REDIS_URL"))
        .env("PACER_GEMINI_BASE_URL", sim.url())
        .env("PACER_GEMINI_API_KEY", "test-key")
        .env("PACER_SINK", format!("s3://{ns}/images"))
        .env("AWS_ENDPOINT_URL", rig.get("AWS_ENDPOINT_URL"))
        .env("AWS_ACCESS_KEY_ID", rig.get("AWS_ACCESS_KEY_ID"))
        .env("AWS_SECRET_ACCESS_KEY", rig.get("AWS_SECRET_ACCESS_KEY"))
        .env("AWS_REGION", rig.get("AWS_REGION"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The emulator starts the function as its child, which dies with it.
    let mut emulator = emulator
        .spawn()
        .expect("start aws-lambda-rie (tests/rig/install builds it)");
    let stderr = emulator.stderr.take().expect("stderr");
    let _emulator = Children(vec![emulator]);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ERROR") || line.contains("imed out") {
                eprintln!("aws-lambda-rie: {line}");
            }
        }
    });
    wait_port(port, "aws-lambda-rie").await;

    const N: usize = 10;
    rig.send_bodies(&queue_url, kites(&ns, N)).await;
    let mapping = Mapping::new(
        &rig,
        &queue_url,
        &ns,
        format!("http://127.0.0.1:{port}/2015-03-31/functions/function/invocations"),
    )
    .await;
    let start = Instant::now();
    let mut batch = mapping.receive_all(N).await;
    let mut durations = Vec::new();
    let mut deferrals = Vec::new();
    loop {
        if batch.is_empty() {
            let done = succeeded(&mut redis, &ns, N).await;
            if done == N {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "only {done} of {N} done after 120 s: deferred messages did not come back"
            );
            batch = mapping.receive(10).await;
            continue;
        }
        let invoked = Instant::now();
        let failed = mapping.invoke(std::mem::take(&mut batch)).await;
        let took = invoked.elapsed();
        let failed = failed.unwrap_or_else(|e| {
            panic!(
                "an invocation was cut off after {took:?} (timeout {FUNCTION_TIMEOUT_SECONDS} s): {e}"
            )
        });
        durations.push(took.as_millis() as u64);
        deferrals.push(failed.len());
    }
    println!(
        "lambda under a {FUNCTION_TIMEOUT_SECONDS} s timeout: {} invocations, ms each {durations:?}, deferrals each {deferrals:?}",
        durations.len()
    );
    let longest = durations.iter().max().copied().unwrap_or_default();
    assert!(
        longest < FUNCTION_TIMEOUT_SECONDS * 1000,
        "an invocation ran {longest} ms, not under its {FUNCTION_TIMEOUT_SECONDS} s timeout"
    );
    // The first batch runs the two that fit now; the others' turns leave no room for a
    // call before the deadline, so they are deferred, not waited for.
    assert_eq!(
        deferrals.first(),
        Some(&(N - 2)),
        "deferrals per invocation {deferrals:?}"
    );
    let m = &sim.stats()["models"][MODEL];
    assert_eq!(
        (m["accepted"].as_u64(), m["arrivals"].as_u64()),
        (Some(N as u64), Some(N as u64)),
        "each request reached the provider exactly once, nothing refused: {m}"
    );
    rig.assert_none_dead_lettered(&dlq_url).await;
}
