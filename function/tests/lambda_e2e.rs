//! The Lambda path end to end: messages received from moto's SQS are invoked through the
//! Lambda runtime API of `cargo lambda watch`; what cannot get capacity now is reported in
//! `batchItemFailures` with its visibility set to the booked wait, comes back after it,
//! and completes on a later invocation. Also measures the function's cold start.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pacer_simulator::{LimitSpec, SimConfig, Simulator};
use pacer_tests::{Children, Rig, single_model_config};
use redis::AsyncCommands;

const MODEL: &str = "gemini-3.1-flash-image";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

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
    let sqs = rig.sqs().await;
    let s3 = rig.s3().await;
    let ns = Rig::unique("lambda");

    let mut limit = LimitSpec::new(MODEL);
    limit.rpm = Some(4);
    limit.window = Duration::from_secs(4);
    let sim = Simulator::new(SimConfig {
        limits: vec![limit],
        ..SimConfig::default()
    })
    .spawn()
    .await
    .expect("simulator");
    // Four per 4 s, no waiting in the step: a batch of 10 admits 4 and defers the rest.
    rig.apply_config(&single_model_config(&ns, MODEL, 4, 4, 0))
        .await;
    let queue_url = sqs
        .create_queue()
        .queue_name(&ns)
        .send()
        .await
        .expect("queue")
        .queue_url
        .expect("url");
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

    let mut function = Command::new(env!("CARGO_BIN_EXE_pacer-lambda"))
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{port}/.rt"),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", "_")
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
    eprintln!("pacer-lambda cold start (init): {init_ms} ms");
    assert!(init_ms < 100, "cold start init took {init_ms} ms");

    const N: usize = 10;
    for i in 0..N {
        let body = serde_json::json!({"id": format!("{ns}-l{i}"), "chain": format!("{ns}/chain"), "prompt": format!("a kite {i}")});
        sqs.send_message()
            .queue_url(&queue_url)
            .message_body(body.to_string())
            .send()
            .await
            .expect("send");
    }
    let arn = format!("arn:aws:sqs:{}:123456789012:{ns}", rig.get("AWS_REGION"));
    let http = reqwest_client();
    let invoke_url = format!("http://127.0.0.1:{port}/2015-03-31/functions/_/invocations");
    let start = Instant::now();
    let mut invocations = 0;
    let mut deferred_total = 0;
    let mut first_failures: Option<(Instant, usize)> = None;
    let mut returned_after: Option<Duration> = None;
    loop {
        let got = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .wait_time_seconds(1)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive");
        let messages = got.messages.unwrap_or_default();
        if messages.is_empty() {
            let done = succeeded(&mut redis, &ns, N).await;
            if done == N {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "only {done} of {N} done after 60 s"
            );
            continue;
        }
        if let (Some((at, _)), None) = (first_failures, returned_after) {
            returned_after = Some(at.elapsed());
        }
        let records: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                let count = m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount))
                    .cloned()
                    .unwrap_or_else(|| "1".into());
                serde_json::json!({
                    "messageId": m.message_id, "receiptHandle": m.receipt_handle, "body": m.body,
                    "attributes": {"ApproximateReceiveCount": count},
                    "messageAttributes": {}, "md5OfBody": m.md5_of_body,
                    "eventSource": "aws:sqs", "eventSourceARN": arn, "awsRegion": rig.get("AWS_REGION"),
                })
            })
            .collect();
        let response: serde_json::Value = http
            .post(&invoke_url)
            .json(&serde_json::json!({ "Records": records }))
            .send()
            .await
            .expect("invoke")
            .json()
            .await
            .expect("SqsBatchResponse JSON");
        invocations += 1;
        let failed: Vec<String> = response["batchItemFailures"]
            .as_array()
            .expect("batchItemFailures")
            .iter()
            .filter_map(|f| f["itemIdentifier"].as_str().map(str::to_owned))
            .collect();
        deferred_total += failed.len();
        if first_failures.is_none() && !failed.is_empty() {
            first_failures = Some((Instant::now(), failed.len()));
        }
        // What Lambda does: delete what was not reported.
        for m in &messages {
            if !failed
                .iter()
                .any(|f| Some(f.as_str()) == m.message_id.as_deref())
            {
                sqs.delete_message()
                    .queue_url(&queue_url)
                    .receipt_handle(m.receipt_handle.clone().expect("receipt"))
                    .send()
                    .await
                    .expect("delete");
            }
        }
    }
    let (_, first) = first_failures.expect("the first batch deferred some messages");
    assert!(
        first >= 5,
        "expected most of the batch deferred, got {first}"
    );
    assert!(invocations >= 2);
    // Deferred messages came back after their booked wait (a few seconds), not after the
    // 60 s visibility the receive gave them.
    let back = returned_after.expect("deferred messages came back");
    assert!(
        back < Duration::from_secs(15),
        "deferred messages took {back:?} to return"
    );
    eprintln!(
        "lambda: {invocations} invocations, {deferred_total} deferrals, first return after {back:?}"
    );
    let accepted = sim.stats()["models"][MODEL]["accepted"]
        .as_u64()
        .expect("accepted");
    assert_eq!(
        accepted, N as u64,
        "each request reached the provider exactly once"
    );
}

async fn succeeded(redis: &mut redis::aio::MultiplexedConnection, ns: &str, n: usize) -> usize {
    let mut done = 0;
    for i in 0..n {
        let r: Option<String> = redis
            .get(format!("pacer:result:{ns}-l{i}"))
            .await
            .expect("redis");
        if r.is_some_and(|r| r.contains("\"succeeded\"")) {
            done += 1;
        }
    }
    done
}

fn reqwest_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}
