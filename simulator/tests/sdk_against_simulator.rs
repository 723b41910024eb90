//! Google's own Python SDK (`google-genai`) against the simulator: if the reference client
//! cannot talk to it, the simulator is not faithful. The SDK lives in the rig's venv
//! (`tests/rig/install venv`); the checks are in `tests/python/test_sdk_against_simulator.py`.
use std::path::PathBuf;

use pacer_simulator::{SimConfig, Simulator};

fn venv_python() -> PathBuf {
    let cache = std::env::var_os("PACER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/pacer")
        });
    cache.join("venv/bin/python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_genai_sdk_talks_to_the_simulator() {
    let python = venv_python();
    assert!(
        python.exists(),
        "{} is missing: create the rig's Python venv (with google-genai) by running \
         `tests/rig/install venv`",
        python.display()
    );
    let script = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("../tests/python/test_sdk_against_simulator.py");
    let sim = Simulator::new(SimConfig {
        // The first project takes the SDK's key; the Vertex checks name the second.
        projects: vec!["sim-project".into(), "vertex-proj".into()],
        limits: vec!["gemini-3-pro-image:rpm=1".parse().expect("limit")],
        ..SimConfig::default()
    })
    .spawn()
    .await
    .expect("simulator binds");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(sim.url())
        // The SDK must reach the simulator on loopback, whatever proxy the machine sets.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .output()
        .await
        .expect("runs the venv's python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'google'") {
        panic!(
            "google-genai is not installed in {}: run `tests/rig/install venv`",
            python.display()
        );
    }
    assert!(
        out.status.success(),
        "the SDK check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
