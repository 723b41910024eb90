//! The rig's helm is real: the chart lints clean and renders the objects it promises.
use pacer_tests::Rig;

fn chart() -> String {
    Rig::repo_root().join("charts/pacer").display().to_string()
}

/// The documents `helm template pacer <chart> ARGS` renders.
fn template(args: &[&str]) -> Vec<serde_json::Value> {
    let chart = chart();
    let out = Rig::load()
        .tool("HELM")
        .args(["template", "pacer", chart.as_str()])
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_norway::Deserializer::from_slice(&out.stdout)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

#[test]
fn chart_lints_clean() {
    let out = Rig::load()
        .tool("HELM")
        .args(["lint", "--strict", &chart()])
        .output()
        .expect("run helm");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helm lint failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("0 chart(s) failed"),
        "unexpected helm lint output:\n{text}"
    );
}

#[test]
fn chart_templates_operator_with_least_privilege() {
    let docs = template(&["--namespace", "pacer-system", "--include-crds"]);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
    ] {
        assert!(
            kinds.contains(&kind),
            "helm template rendered no {kind}: {kinds:?}"
        );
    }
    let crds: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect();
    assert_eq!(crds, ["quotapools.pacer.dev", "modelchains.pacer.dev"]);
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("ClusterRole");
    let rules = role["rules"].as_array().expect("rules");
    for rule in rules {
        for verb in rule["verbs"].as_array().expect("verbs") {
            assert_ne!(
                verb, "*",
                "the operator's role grants a wildcard verb: {rule}"
            );
        }
    }
}

/// Issue 13: each project's key reaches the workers under the variable its QuotaPool's
/// `apiKeyEnv` names, from its own Secret.
#[test]
fn chart_gives_workers_each_pool_s_key_from_its_secret() {
    let docs = template(&[
        "--set",
        "worker.enabled=true",
        "--set",
        "worker.queueUrl=https://sqs.example/q",
        "--set",
        "worker.sink=s3://images/out",
        "--set",
        "worker.poolKeys[0].env=GEMINI_KEY_PROJECT_A",
        "--set",
        "worker.poolKeys[0].secret=gemini-project-a",
        "--set",
        "worker.poolKeys[1].env=GEMINI_KEY_PROJECT_B",
        "--set",
        "worker.poolKeys[1].secret=gemini-project-b",
        "--set",
        "worker.poolKeys[1].key=token",
    ]);
    let worker = docs
        .iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && d["spec"]["template"]["spec"]["containers"][0]["name"] == "worker"
        })
        .expect("the worker Deployment");
    let env = worker["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env");
    let from = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["secretKeyRef"].clone())
            .unwrap_or_else(|| panic!("{name} not in the worker's env: {env:?}"))
    };
    assert_eq!(
        from("GEMINI_KEY_PROJECT_A"),
        serde_json::json!({"name": "gemini-project-a", "key": "api-key"})
    );
    assert_eq!(
        from("GEMINI_KEY_PROJECT_B"),
        serde_json::json!({"name": "gemini-project-b", "key": "token"})
    );
}

/// Records and claims in a Redis of their own: the workers get PACER_RECORDS_REDIS_URL from
/// its Secret; without it set, no such variable (the records stay in the limiter's Redis).
#[test]
fn chart_gives_workers_a_records_redis_when_asked() {
    let worker_env = |extra: &[&str]| {
        let mut args = vec![
            "--set",
            "worker.enabled=true",
            "--set",
            "worker.queueUrl=https://sqs.example/q",
            "--set",
            "worker.sink=s3://images/out",
        ];
        args.extend_from_slice(extra);
        let docs = template(&args);
        let worker = docs
            .iter()
            .find(|d| {
                d["kind"] == "Deployment"
                    && d["spec"]["template"]["spec"]["containers"][0]["name"] == "worker"
            })
            .expect("the worker Deployment")
            .clone();
        worker["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env")
            .clone()
    };
    let records = |env: &[serde_json::Value]| {
        env.iter()
            .find(|e| e["name"] == "PACER_RECORDS_REDIS_URL")
            .cloned()
    };
    assert_eq!(records(&worker_env(&[])), None);
    let env = worker_env(&["--set", "redis.records.existingSecret.name=records-redis"]);
    assert_eq!(
        records(&env).map(|e| e["valueFrom"]["secretKeyRef"].clone()),
        Some(serde_json::json!({"name": "records-redis", "key": "url"}))
    );
}
