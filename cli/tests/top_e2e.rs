//! `pacer top` on the rig during a load test: `--once` prints each model's usage as
//! text, and the live view, run in a real terminal (tmux), shows the same frame and quits
//! on `q`.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pacer_tests::{Children, Rig};

const MODEL: &str = "gemini-3.1-flash-image";

/// The used count of the first `requests` bar in a frame (`[###---] 7/10  70%`).
fn requests_used(frame: &str) -> Option<u64> {
    frame
        .lines()
        .find(|l| l.trim_start().starts_with("requests "))
        .and_then(|l| l.split("] ").nth(1))
        .and_then(|figure| figure.split('/').next())
        .and_then(|n| n.trim().parse().ok())
}

fn tmux(socket: &str, args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(["-L", socket])
        .args(args)
        .output()
        .expect("tmux runs (the rig installs it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_each_model_s_usage_once_and_live_in_a_terminal() {
    let rig = Rig::load();
    let redis = rig.get("REDIS_URL");
    let ns = Rig::unique("top");
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (pool, chain) = (dir.join("pool.yaml"), dir.join("chain.yaml"));
    std::fs::write(
        &pool,
        format!(
            "apiVersion: pacer.dev/v1alpha1\nkind: QuotaPool\nmetadata: {{name: images, namespace: {ns}}}\n\
             spec:\n  project: {ns}\n  tier: Tier2\n  models:\n  - {{name: {MODEL}, rpm: 10, windowSeconds: 5}}\n"
        ),
    )
    .expect("pool YAML");
    std::fs::write(
        &chain,
        format!(
            "apiVersion: pacer.dev/v1alpha1\nkind: ModelChain\nmetadata: {{name: posters, namespace: {ns}}}\n\
             spec:\n  pool: images\n  steps:\n  - {{model: {MODEL}, maxWaitSeconds: 60}}\n"
        ),
    )
    .expect("chain YAML");
    let pacer = env!("CARGO_BIN_EXE_pacer");
    let loadtest = Command::new(pacer)
        .args(["loadtest", "--replicas", "2", "--requests", "60"])
        .args(["--redis-url", &redis])
        .arg("--pool")
        .arg(&pool)
        .arg("--chain")
        .arg(&chain)
        .arg("--out")
        .arg(dir.join("images"))
        .arg("--plot")
        .arg(dir.join("plot.png"))
        .args(["--timeout-seconds", "120"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pacer loadtest");
    let _loadtest = Children(vec![loadtest]);
    let prefix = format!("{ns}/");

    // --once, polled until the load test's bookings show (its config is written first).
    let deadline = Instant::now() + Duration::from_secs(60);
    let frame = loop {
        let out = Command::new(pacer)
            .args(["top", "--once", "--redis-url", &redis, "--pool", &prefix])
            .output()
            .expect("pacer top --once runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let frame = String::from_utf8_lossy(&out.stdout).to_string();
        if requests_used(&frame).is_some_and(|n| n > 0) {
            break frame;
        }
        assert!(
            Instant::now() < deadline,
            "no usage shown in 60 s:\n{frame}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    println!("pacer top --once during a load test:\n{frame}");
    assert!(frame.contains(&format!("pool {ns}/images")), "{frame}");
    assert!(frame.contains(MODEL), "{frame}");
    let used = requests_used(&frame).unwrap_or(0);
    assert!(
        (1..=10).contains(&used),
        "{used} requests in the window, limit 10:\n{frame}"
    );
    assert!(frame.contains("/10"), "{frame}");
    assert!(
        !frame.contains("pool loadtest/"),
        "only the pools asked for:\n{frame}"
    );

    // Live, in a real terminal.
    let socket = format!("pacer-{ns}");
    let command = format!("{pacer} top --redis-url {redis} --pool {prefix} --interval-ms 300");
    let started = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "160",
            "-y",
            "40",
            &command,
        ],
    );
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let live = loop {
        let pane = tmux(&socket, &["capture-pane", "-p", "-t", "top"]);
        let text = String::from_utf8_lossy(&pane.stdout).to_string();
        let shown = text.contains("pacer top") && text.contains(MODEL);
        if shown && requests_used(&text.replace('│', " ")).is_some_and(|n| n > 0) {
            break text;
        }
        if Instant::now() > deadline {
            tmux(&socket, &["kill-server"]);
            panic!("the live frame never showed the model's usage:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    println!("pacer top, live in tmux:\n{live}");
    assert!(live.contains("q to quit"), "{live}");
    // q quits and gives the terminal back.
    tmux(&socket, &["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tmux(&socket, &["has-session", "-t", "top"])
        .status
        .success()
    {
        if Instant::now() > deadline {
            tmux(&socket, &["kill-server"]);
            panic!("pacer top did not quit on q");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
