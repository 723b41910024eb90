//! `pacer simulate`, the real binary, counts every arrival: 25 requests sent at once to a
//! model limited to 20 per window are 25 arrivals in one window, 20 accepted and 5 refused
//! for rpm. The figures come from the simulator's `/_sim/stats`, never from the sender.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use pacer_tests::Children;
use serde_json::Value;

const MODEL: &str = "gemini-3-pro-image";

/// Starts `pacer simulate` on a free port and returns its URL (the first line it prints).
fn start_simulator(children: &mut Children, limit: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .args(["simulate", "--listen", "127.0.0.1:0", "--limit", limit])
        // Flags only: no PACER_SIM_* from the caller's environment.
        .env_remove("PACER_SIM_LIMITS")
        .env_remove("PACER_SIM_KEYS")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("runs the pacer binary");
    let stdout = child.stdout.take().expect("piped stdout");
    children.0.push(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reads the simulator's URL");
    let url = line.trim().to_owned();
    assert!(url.starts_with("http://"), "unexpected first line {line:?}");
    url
}

async fn stats(http: &reqwest::Client, url: &str) -> reqwest::Result<Value> {
    http.get(format!("{url}/_sim/stats"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
}

/// Waits until the simulator answers its stats route (a condition, not a fixed sleep).
async fn wait_ready(http: &reqwest::Client, url: &str) {
    for _ in 0..600 {
        if stats(http, url).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("`pacer simulate` at {url} never answered /_sim/stats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_counts_every_arrival_of_a_burst() {
    let mut children = Children(Vec::new());
    let url = start_simulator(&mut children, &format!("{MODEL}:rpm=20,window=60"));
    let http = reqwest::Client::new();
    wait_ready(&http, &url).await;

    let body = r#"{"contents":[{"parts":[{"text":"a lighthouse"}]}],"generationConfig":{"responseModalities":["IMAGE"]}}"#;
    let calls: Vec<_> = (0..25)
        .map(|i| {
            let http = http.clone();
            let url = format!("{url}/v1beta/models/{MODEL}:generateContent");
            tokio::spawn(async move {
                http.post(url)
                    .header("x-goog-api-key", "any-key")
                    .header("content-type", "application/json")
                    .header("x-pacer-ticket", format!("burst-{i}"))
                    .body(body)
                    .send()
                    .await
                    .expect("the simulator answers")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.expect("request task"));
    }
    statuses.sort_unstable();
    let mut want = vec![200; 20];
    want.extend([429; 5]);
    assert_eq!(statuses, want);

    let s = stats(&http, &url).await.expect("stats");
    let m = &s["models"][MODEL];
    assert_eq!(m["arrivals"], 25, "{s}");
    assert_eq!(m["max_arrivals_in_any_window"]["rpm"], 25, "{s}");
    assert_eq!(m["accepted"], 20, "{s}");
    assert_eq!(m["rejected"]["rpm"], 5, "{s}");
    assert_eq!(m["max_in_any_window"]["rpm"], 20, "{s}");
    assert_eq!(
        m["tickets"],
        serde_json::json!({"tagged": 25, "untagged": 0, "duplicates": 0}),
        "{s}"
    );
    assert_eq!(
        m["accepted_at_ms"].as_array().map(Vec::len),
        Some(20),
        "{s}"
    );
    // The same figures per project (any key belongs to the default project).
    assert_eq!(
        s["projects"]["sim-project"][MODEL]["max_arrivals_in_any_window"]["rpm"], 25,
        "{s}"
    );

    // A reset gives the next test a fresh simulator on the same port.
    let reset = http
        .post(format!("{url}/_sim/reset"))
        .send()
        .await
        .expect("reset");
    assert!(reset.status().is_success());
    let s = stats(&http, &url).await.expect("stats");
    assert_eq!(s["models"], serde_json::json!({}), "{s}");
}
