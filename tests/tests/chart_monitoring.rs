//! The chart's monitoring (issue 16), with the rig's real tools:
//!
//! - the alert rules (`charts/pacer/files/alerts.yaml`), rendered by `helm template` into
//!   the PrometheusRule the chart ships, pass `promtool check rules`, and every alert fires
//!   and stays quiet where `tests/promtool/alerts_test.yaml` says (`promtool test rules`);
//!   a changed threshold in the values reaches the rules (the same tests then fail);
//! - the Grafana dashboard (`charts/pacer/files/dashboard.json`) is valid JSON shipped
//!   verbatim in a ConfigMap for Grafana's sidecar, every panel has a query, and every
//!   metric a panel (or an alert) names has series on `/metrics` of a real worker or the
//!   operator after a short run (an operator reconciling pools on the rig's apiserver, a
//!   worker generating requests from moto's SQS against the simulator, Redis slowed and
//!   then cut off behind toxiproxy), and every family they serve has a panel;
//! - both are off by default, the chart lints clean with both on, and the rig's apiserver
//!   accepts the PrometheusRule, the ServiceMonitor and the workers' PodMonitor against the
//!   Prometheus Operator's CRDs.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use pacer_function::{
    handler::HandlerOptions,
    queue::SqsQueue,
    runtime::{self, RuntimeArgs},
    worker::{self, WorkerOptions},
};
use pacer_operator::{Operator, RunArgs, Shutdown};
use pacer_simulator::{
    LimitSpec, SimConfig, Simulator,
    config::{BlockRule, KeySpec},
};
use pacer_tests::{Rig, Toxiproxy, create_namespace, install_crds, kubectl, single_model_config};
use serde_json::Value;

const RELEASE: &str = "pacer";
const NAMESPACE: &str = "pacer-system";
const MODEL: &str = "gemini-3.1-flash-image";

fn chart() -> PathBuf {
    Rig::repo_root().join("charts/pacer")
}

fn stdout_and_err(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The documents `helm template` renders for release `pacer` in `pacer-system`.
fn template(args: &[&str]) -> Vec<Value> {
    let chart = chart();
    let out = Rig::load()
        .tool("HELM")
        .args(["template", RELEASE])
        .arg(&chart)
        .args(["--namespace", NAMESPACE])
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template {args:?} failed:\n{}",
        stdout_and_err(&out)
    );
    serde_norway::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).expect("helm renders valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn only<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The PrometheusRule the chart renders with `args` added to enabling it.
fn prometheus_rule(args: &[&str]) -> Value {
    let mut all = vec!["--set", "prometheusRule.enabled=true"];
    all.extend_from_slice(args);
    let docs = template(&all);
    let rules = only(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule: {docs:?}");
    rules[0].clone()
}

/// The alerts of a PrometheusRule: name → rule.
fn alerts(rule: &Value) -> BTreeMap<String, Value> {
    rule["spec"]["groups"]
        .as_array()
        .expect("spec.groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("a group's rules").iter())
        .map(|r| {
            let name = r["alert"].as_str().expect("an alerting rule").to_owned();
            (name, r.clone())
        })
        .collect()
}

fn promtool(rig: &Rig) -> std::process::Command {
    let path = rig.get("PROMTOOL");
    assert!(
        Path::new(&path).is_file(),
        "promtool is missing at {path}: run tests/rig/install (it builds it with Go)"
    );
    std::process::Command::new(path)
}

/// A folder holding the rendered rules as `alerts.rules.yaml` beside a copy of the unit
/// tests (whose `rule_files` name it).
fn rules_folder(rule: &Value) -> PathBuf {
    let dir = std::env::temp_dir().join(Rig::unique("pacer-alerts"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let rules = serde_norway::to_string(&rule["spec"]).expect("rules as YAML");
    std::fs::write(dir.join("alerts.rules.yaml"), rules).expect("write rules");
    std::fs::copy(
        Rig::repo_root().join("tests/promtool/alerts_test.yaml"),
        dir.join("alerts_test.yaml"),
    )
    .expect("copy the promtool unit tests");
    dir
}

fn promtool_test_rules(rig: &Rig, dir: &Path) -> Output {
    promtool(rig)
        .current_dir(dir)
        .args(["test", "rules", "alerts_test.yaml"])
        .output()
        .expect("run promtool test rules")
}

const ALERTS: [&str; 10] = [
    "PacerModelNearLimit",
    "PacerModelSaturated",
    "PacerUpstreamRateLimited",
    "PacerAccountProblem",
    "PacerDeferralsGrowing",
    "PacerRequestsFailed",
    "PacerLimiterUnavailable",
    "PacerOperatorNotLeading",
    "PacerOperatorDown",
    "PacerOperatorReconcileErrors",
];

#[test]
fn alert_rules_pass_promtool_and_every_alert_is_tested_both_ways() {
    let rig = Rig::load();
    let rule = prometheus_rule(&[]);
    let by_name = alerts(&rule);
    assert_eq!(
        by_name.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        ALERTS.into_iter().collect(),
        "the chart's alerts"
    );
    for (name, r) in &by_name {
        let severity = r["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name} has severity {severity:?}"
        );
        assert!(
            r["annotations"]["summary"].is_string() && r["annotations"]["description"].is_string(),
            "{name} lacks a summary or description: {r}"
        );
    }
    let dir = rules_folder(&rule);

    let out = promtool(&rig)
        .current_dir(&dir)
        .args(["check", "rules", "alerts.rules.yaml"])
        .output()
        .expect("run promtool check rules");
    let text = stdout_and_err(&out);
    assert!(out.status.success(), "promtool check rules:\n{text}");
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", ALERTS.len())),
        "{text}"
    );

    let out = promtool_test_rules(&rig, &dir);
    let text = stdout_and_err(&out);
    assert!(out.status.success(), "promtool test rules:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");

    // Each alert has a case where it fires and one where it must not.
    let tests: Value = serde_norway::from_str(
        &std::fs::read_to_string(dir.join("alerts_test.yaml")).expect("read unit tests"),
    )
    .expect("unit tests are YAML");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in tests["tests"].as_array().expect("tests") {
        for check in case["alert_rule_test"].as_array().expect("alert_rule_test") {
            let name = check["alertname"].as_str().expect("alertname").to_owned();
            assert!(by_name.contains_key(&name), "a test of no alert: {name}");
            let expected = check["exp_alerts"].as_array().map_or(0, Vec::len);
            if expected > 0 {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    for name in ALERTS {
        assert!(fires.contains(name), "no test where {name} fires");
        assert!(quiet.contains(name), "no test where {name} must stay quiet");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The values reach the rules: with another threshold, another release namespace or extra
/// alert labels, the rendered rules differ where they should, and the unit tests (written
/// for the defaults) fail.
#[test]
fn alert_values_reach_the_rules() {
    let rig = Rig::load();
    let rule = prometheus_rule(&[
        "--set-json",
        "prometheusRule.alerts.modelNearLimit.ratio=0.9",
        "--set",
        "prometheusRule.alertLabels.team=images",
        "--set",
        "prometheusRule.labels.release=kube-prometheus-stack",
    ]);
    assert_eq!(
        rule["metadata"]["labels"]["release"], "kube-prometheus-stack",
        "the PrometheusRule's own labels (a Prometheus's ruleSelector)"
    );
    let by_name = alerts(&rule);
    for (name, r) in &by_name {
        assert_eq!(r["labels"]["team"], "images", "{name}: {r}");
    }
    let near = by_name["PacerModelNearLimit"]["expr"]
        .as_str()
        .expect("expr");
    assert!(near.contains("> 0.9"), "{near}");
    let dir = rules_folder(&rule);
    let out = promtool_test_rules(&rig, &dir);
    let text = stdout_and_err(&out);
    assert!(
        !out.status.success() && text.contains("PacerModelNearLimit"),
        "the unit tests pass with the warning at 90 %: they do not test the threshold\n{text}"
    );
    let _ = std::fs::remove_dir_all(dir);

    let out = Rig::load()
        .tool("HELM")
        .args(["template", RELEASE])
        .arg(chart())
        .args([
            "--namespace",
            "elsewhere",
            "--set",
            "prometheusRule.enabled=true",
        ])
        .output()
        .expect("run helm");
    assert!(out.status.success(), "{}", stdout_and_err(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(r#"up{job="pacer-operator", namespace="elsewhere"}"#),
        "the operator alerts select this release's operator:\n{text}"
    );
}

#[test]
fn monitoring_is_off_by_default_and_lints_clean_when_on() {
    let docs = template(&[]);
    assert!(only(&docs, "PrometheusRule").is_empty(), "{docs:?}");
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["labels"]["grafana_dashboard"].is_string()),
        "a dashboard ConfigMap by default"
    );

    let on = [
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.annotations.grafana_folder=Pacer",
    ];
    let docs = template(&on);
    assert_eq!(only(&docs, "PrometheusRule").len(), 1);
    let maps: Vec<&Value> = only(&docs, "ConfigMap")
        .into_iter()
        .filter(|d| d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(maps.len(), 1, "one ConfigMap for Grafana's sidecar");
    assert_eq!(maps[0]["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        maps[0]["metadata"]["annotations"]["grafana_folder"],
        "Pacer"
    );
    let shipped = maps[0]["data"]["pacer.json"].as_str().expect("pacer.json");
    let file = std::fs::read_to_string(chart().join("files/dashboard.json")).expect("dashboard");
    assert_eq!(shipped.trim_end(), file.trim_end(), "shipped verbatim");

    let chart = chart().display().to_string();
    let mut args = vec!["lint", "--strict", chart.as_str()];
    args.extend_from_slice(&on);
    let out = Rig::load()
        .tool("HELM")
        .args(&args)
        .output()
        .expect("run helm");
    let text = stdout_and_err(&out);
    assert!(out.status.success(), "helm lint:\n{text}");
    assert!(text.contains("0 chart(s) failed"), "{text}");
}

/// The rig's apiserver, with the Prometheus Operator's own CRDs (from its Go module)
/// applied, accepts the chart's PrometheusRule, ServiceMonitor, the workers' PodMonitor and
/// the dashboard ConfigMap
/// (server-side dry run: the CRDs' schemas check every rule's fields and durations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_objects_pass_the_apiservers_validation() {
    let rig = Rig::load();
    let client = rig.kube().await;
    let crds = PathBuf::from(rig.get("PROMETHEUS_OPERATOR_CRDS"));
    for kind in ["prometheusrules", "servicemonitors", "podmonitors"] {
        let file = crds.join(format!("monitoring.coreos.com_{kind}.yaml"));
        let file = file.display().to_string();
        let (ok, out, err) = kubectl(
            &rig,
            &["apply", "--server-side", "--force-conflicts", "-f", &file],
            None,
        );
        assert!(ok, "apply the {kind} CRD ({file}): {out}{err}");
        let name = format!("{kind}.monitoring.coreos.com");
        let established = kube::runtime::wait::await_condition(
            kube::Api::<CustomResourceDefinition>::all(client.clone()),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not established within 30 s"))
            .unwrap_or_else(|e| panic!("watch CRD {name}: {e}"));
    }
    let ns = Rig::unique("pacer-mon");
    create_namespace(&client, &ns).await;
    let out = rig
        .tool("HELM")
        .args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", &ns])
        .args(["--set", "prometheusRule.enabled=true"])
        .args(["--set", "prometheusRule.labels.release=monitoring"])
        .args(["--set", "prometheusRule.alertLabels.team=images"])
        .args(["--set", "grafanaDashboard.enabled=true"])
        .args(["--set", "serviceMonitor.enabled=true"])
        .args(["--set", "worker.enabled=true"])
        .args([
            "--set",
            "worker.queueUrl=https://sqs.us-east-1.amazonaws.com/123/pacer",
        ])
        .args(["--set", "worker.sink=s3://images/pacer"])
        .output()
        .expect("run helm");
    assert!(out.status.success(), "{}", stdout_and_err(&out));
    let rendered = String::from_utf8_lossy(&out.stdout);
    let docs: Vec<&str> = rendered
        .split("\n---")
        .filter(|d| {
            [
                "kind: PrometheusRule",
                "kind: ServiceMonitor",
                "kind: PodMonitor",
                "kind: ConfigMap",
            ]
            .iter()
            .any(|k| d.contains(k))
        })
        .collect();
    assert_eq!(docs.len(), 4, "rendered:\n{rendered}");
    let (ok, stdout, err) = kubectl(
        &rig,
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        Some(&docs.join("\n---\n")),
    );
    assert!(
        ok,
        "the apiserver rejected the monitoring objects:\n{stdout}{err}"
    );
    for object in [
        "prometheusrule.monitoring.coreos.com/pacer",
        "servicemonitor.monitoring.coreos.com/pacer-operator",
        "podmonitor.monitoring.coreos.com/pacer-worker",
        "configmap/pacer-dashboard",
    ] {
        assert!(
            stdout.contains(&format!("{object} created (server dry run)")),
            "{object} not accepted: {stdout}"
        );
    }
}

/// The metric names a PromQL expression reads. Label matchers, ranges and strings are
/// dropped; an identifier followed by `(` (or by `by`/`without`) is a function or
/// aggregation; the label lists of
/// `by`, `without`, `on`, `ignoring` and `group_*` are dropped; Grafana's `$variables` and
/// numbers are skipped. What is left are metric names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut bare = String::new();
    let (mut brace, mut bracket, mut quote) = (0, 0, None::<char>);
    for c in expr.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' if brace == 0 => quote = Some(c),
            '{' => brace += 1,
            '}' => brace -= 1,
            '[' => bracket += 1,
            ']' => bracket -= 1,
            _ if brace > 0 || bracket > 0 => {}
            _ => bare.push(c),
        }
    }
    const KEYWORDS: [&str; 11] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
    ];
    let chars: Vec<char> = bare.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let word = |i: &mut usize| {
            let start = *i;
            while *i < chars.len()
                && (chars[*i].is_ascii_alphanumeric() || chars[*i] == '_' || chars[*i] == ':')
            {
                *i += 1;
            }
            chars[start..*i].iter().collect::<String>()
        };
        if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '$' {
            i += 1;
            word(&mut i);
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let w = word(&mut i);
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            // `sum by (le) (…)`: an aggregation whose grouping comes first.
            let rest: String = chars[j..].iter().collect();
            let grouped = ["by", "without"].iter().any(|k| {
                rest.strip_prefix(k)
                    .is_some_and(|r| r.starts_with(|c: char| c == '(' || c.is_whitespace()))
            });
            let call = grouped || (j < chars.len() && chars[j] == '(');
            if call && KEYWORDS.contains(&w.as_str()) {
                // A label list: skip to its closing parenthesis.
                while j < chars.len() && chars[j] != ')' {
                    j += 1;
                }
                i = j + 1;
            } else if !call && !KEYWORDS.contains(&w.as_str()) {
                names.insert(w);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_reads_promql() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (le, kind) (rate(a_bucket{x=~"y|z", m="$m"}[$__rate_interval]))) / on () group_left b offset 5m"#
        ),
        ["a_bucket", "b"]
    );
    assert_eq!(
        names("count(max by (pool) (c) > 0.8) or vector(0) and d unless e_total * 1e3"),
        ["c", "d", "e_total"]
    );
    assert!(names("sum(rate(x[5m])) by (le)").contains(&"x".to_owned()));
}

/// Series names a `/metrics` page serves, and the names its families may serve (a
/// prometheus-client family prints its `# TYPE` from the start, its series once a label
/// set was touched): counters as `_total`, histograms as `_bucket`, `_sum`, `_count`.
fn exported(page: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut sampled = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    families.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        families.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    families.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            sampled.insert(line[..end].to_owned());
        }
    }
    families.extend(sampled.iter().cloned());
    (sampled, families)
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let url = format!("http://{addr}{path}");
    let response = reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(response.status().is_success(), "GET {url}: {response:?}");
    response.text().await.expect("body")
}

/// Polls `check` every 100 ms until it returns Some, or panics after `within` (a bound on
/// the test, not a measurement) with `what`.
async fn eventually<T, F, Fut>(within: Duration, what: impl Fn() -> String, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "not within {within:?}: {}",
            what()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sample(page: &str, prefix: &str) -> bool {
    page.lines().any(|l| l.starts_with(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_panels_query_metrics_a_worker_and_the_operator_serve() {
    // The dashboard: valid JSON, every panel with a query.
    let text = std::fs::read_to_string(chart().join("files/dashboard.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let mut queries: Vec<(String, String)> = Vec::new();
    let mut titles = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("a panel's title").to_owned();
        if panel["type"] == "row" {
            continue;
        }
        assert!(titles.insert(title.clone()), "two panels titled {title}");
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title} has no target");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "panel {title} has an empty query");
            assert!(
                !metric_names(expr).is_empty(),
                "panel {title} names no metric: {expr}"
            );
            queries.push((title.clone(), expr.to_owned()));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if var["type"] == "query" {
            let q = var["query"]["query"].as_str().expect("a variable's query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(metric, _label)| metric)
                .unwrap_or_else(|| panic!("variable query {q} is not label_values(metric, label)"));
            queries.push((format!("variable {}", var["name"]), inner.to_owned()));
        }
    }
    // What the issue asks to see.
    for wanted in [
        "pacer_operator_usage_ratio",
        "pacer_function_limiter_wait_seconds_bucket",
        "pacer_function_provider_calls_total",
        "pacer_function_deferred_total",
        "pacer_function_account_errors_total",
        "pacer_function_in_flight",
        "pacer_function_limiter_unavailable_total",
        "pacer_operator_leader",
    ] {
        assert!(
            queries
                .iter()
                .any(|(_, q)| metric_names(q).contains(wanted)),
            "no panel shows {wanted}"
        );
    }
    assert!(
        queries
            .iter()
            .any(|(_, q)| q.contains(r#"dimension="spend_micros""#)),
        "no spend panel"
    );

    // A short run, through a toxiproxy proxy of our own in front of the rig's Redis:
    //   1. the operator reconciles two pools and their chains on the rig's apiserver; a
    //      worker generates requests from moto's SQS against the simulator under a tight
    //      limit (some wait, some are deferred), one prompt is blocked (it fails), one pool
    //      calls with a key the simulator refuses (an account error);
    //   2. Redis slows to 300 ms an answer, past the worker's 100 ms limiter timeout: the
    //      worker books through its failure mode (closed);
    //   3. Redis goes away: the operator's reconcile of a changed pool fails.
    // Every family a panel or an alert reads then has series on one of the two pages.
    let rig = Rig::load();
    let client = rig.kube().await;
    install_crds(&client).await;
    let ns = Rig::unique("monitoring");
    create_namespace(&client, &ns).await;
    let redis_url = rig.get("REDIS_URL");
    let upstream = redis_url
        .strip_prefix("redis://")
        .expect("REDIS_URL is redis://host:port")
        .trim_end_matches('/')
        .to_owned();
    let proxy = Toxiproxy::from_rig(&rig).create(&ns, &upstream).await;
    let proxied_url = format!("redis://{}", proxy.listen);

    let mut limit = LimitSpec::new(MODEL);
    limit.rpm = Some(4);
    limit.window = Duration::from_secs(4);
    let sim = Simulator::new(SimConfig {
        keys: vec![KeySpec {
            project: None,
            key: "test-key".into(),
        }],
        limits: vec![limit],
        latency: Duration::from_millis(100),
        blocks: vec![BlockRule {
            pattern: "forbidden".into(),
            reason: "IMAGE_SAFETY".into(),
        }],
        ..SimConfig::default()
    })
    .spawn()
    .await
    .expect("start simulator");

    let mut args = RunArgs::new(&proxied_url);
    args.watch_namespace = Some(ns.clone());
    args.resync_seconds = 2;
    args.usage_refresh_seconds = 1;
    args.leader_elect = true;
    args.lease_namespace = Some(ns.clone());
    args.identity = Some("monitoring-test".into());
    let shutdown = Shutdown::new();
    let operator = Operator::start(client.clone(), args, shutdown.clone())
        .await
        .expect("start operator");
    let operator_addr = operator.metrics_addr();
    let operator_run = tokio::spawn(operator.run());
    let broken_pool = |rpm: u64| {
        format!(
            "apiVersion: pacer.dev/v1alpha1\nkind: QuotaPool\nmetadata: {{name: broken, namespace: {ns}}}\n\
             spec:\n  project: {ns}-broken\n  tier: Tier2\n  apiKeyEnv: PACER_MONITORING_BAD_KEY\n  models:\n  - {{name: {MODEL}, rpm: {rpm}, windowSeconds: 4}}\n"
        )
    };
    let broken_chain = format!(
        "apiVersion: pacer.dev/v1alpha1\nkind: ModelChain\nmetadata: {{name: broken-chain, namespace: {ns}}}\n\
         spec:\n  pool: broken\n  steps:\n  - {{model: {MODEL}, maxWaitSeconds: 1}}\n"
    );
    let config = format!(
        "{}---\n{}---\n{broken_chain}",
        single_model_config(&ns, MODEL, 4, 4, 1),
        broken_pool(4)
    );
    let (ok, _, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(&config));
    assert!(ok, "kubectl apply: {err}");
    let store = pacer_core::config::ConfigStore::connect(&redis_url)
        .await
        .expect("config store");
    let chain = format!("{ns}/chain");
    let broken = format!("{ns}/broken-chain");
    eventually(
        Duration::from_secs(30),
        || "the operator compiles both chains into Redis".into(),
        || async {
            let cfg = store.load().await.ok()?;
            (cfg.chains.contains_key(&chain) && cfg.chains.contains_key(&broken)).then_some(())
        },
    )
    .await;

    let out = std::env::temp_dir().join(Rig::unique("pacer-monitoring-images"));
    let runtime_args = RuntimeArgs {
        redis_url: Some(proxied_url.clone()),
        records_redis_url: None,
        gemini_base_url: sim.url(),
        gemini_api_key: Some("test-key".into()),
        gemini_api_key_file: None,
        openai_base_url: None,
        openai_api_key: None,
        sink: out.display().to_string(),
        result_queue_url: None,
        config_refresh_ms: 200,
        limiter_timeout_ms: 100,
        claim_lease_seconds: 10,
        replica_id: Some("monitoring-w1".into()),
        day_seconds: None,
        pool_keys: BTreeMap::from([(
            "PACER_MONITORING_BAD_KEY".to_owned(),
            "not-a-key-the-provider-knows".to_owned(),
        )]),
    };
    let replica = runtime::build(&runtime_args, None, HandlerOptions::default())
        .await
        .expect("build a worker replica");
    let worker_addr = replica
        .metrics
        .clone()
        .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("serve the worker's /metrics");
    let queue_url = rig.create_queue(&ns).await;
    let request = |id: String, chain: &str, prompt: &str| serde_json::json!({"id": id, "chain": chain, "prompt": prompt});
    rig.send_bodies(
        &queue_url,
        (0..12)
            .map(|i| request(format!("{ns}-r{i}"), &chain, "a lighthouse"))
            .chain([
                request(format!("{ns}-blocked"), &chain, "something forbidden"),
                request(format!("{ns}-broken"), &broken, "a lighthouse"),
            ]),
    )
    .await;
    let stop_worker = tokio_util::sync::CancellationToken::new();
    let worker_run = tokio::spawn(worker::run(
        Arc::new(SqsQueue::new(rig.sqs().await, queue_url.clone())),
        WorkerOptions {
            concurrency: 8,
            visibility: Duration::from_secs(5),
            wait_time: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
            ..WorkerOptions::default()
        },
        replica.handler.clone(),
        replica.metrics.clone(),
        stop_worker.clone(),
    ));
    let mut pages: Vec<String> = Vec::new();
    let scrape = |what: &'static str, done: fn(&str, &str, &str) -> bool| {
        let pool = format!("{ns}/pool");
        async move {
            eventually(
                Duration::from_secs(90),
                || {
                    format!(
                        "{what} (worker /metrics at {worker_addr}, operator at {operator_addr})"
                    )
                },
                || async {
                    let w = http_get(worker_addr, "/metrics").await;
                    let o = http_get(operator_addr, "/metrics").await;
                    done(&w, &o, &pool).then_some((w, o))
                },
            )
            .await
        }
    };

    // 1. Successes, the failure, waits, deferrals, the account error, the pool's usage.
    let (w, o) = scrape("a short run's metrics", |w, o, pool| {
        sample(w, "pacer_function_messages_total{outcome=\"succeeded\"}")
            && sample(w, "pacer_function_messages_total{outcome=\"failed\"}")
            && sample(w, "pacer_function_deferred_total{")
            && sample(w, "pacer_function_account_errors_total{")
            && o.lines().any(|l| {
                l.starts_with("pacer_operator_usage_ratio{")
                    && l.contains(pool)
                    && l.contains("dimension=\"requests\"")
                    && !l.ends_with(" 0.0")
            })
    })
    .await;
    pages.extend([w, o]);

    // 2. A slow Redis: bookings go through the failure mode.
    proxy
        .add_toxic(
            "slow",
            "latency",
            "downstream",
            serde_json::json!({"latency": 300}),
        )
        .await;
    rig.send_bodies(
        &queue_url,
        (0..3).map(|i| request(format!("{ns}-slow{i}"), &chain, "a lighthouse")),
    )
    .await;
    let (w, o) = scrape("bookings in the failure mode", |w, _, _| {
        sample(
            w,
            "pacer_function_limiter_unavailable_total{mode=\"closed\"}",
        )
    })
    .await;
    pages.extend([w, o]);
    stop_worker.cancel();
    let _ = worker_run.await;

    // 3. No Redis: a changed pool cannot be compiled into it.
    proxy.set_enabled(false).await;
    let (ok, _, err) = kubectl(
        &rig,
        &["apply", "-n", &ns, "-f", "-"],
        Some(&broken_pool(5)),
    );
    assert!(ok, "kubectl apply: {err}");
    let (w, o) = scrape("a failed reconcile", |_, o, _| {
        sample(o, "pacer_operator_reconcile_errors_total{")
    })
    .await;
    pages.extend([w, o]);
    shutdown.cancel();
    let _ = operator_run.await;
    proxy.delete().await;
    let _ = std::fs::remove_dir_all(&out);

    let mut sampled = BTreeSet::new();
    let mut names = BTreeSet::new();
    for page in &pages {
        let (s, n) = exported(page);
        sampled.extend(s);
        names.extend(n);
    }
    let last = pages[pages.len() - 2..].join("\n");
    let mut missing = Vec::new();
    for (title, expr) in &queries {
        for name in metric_names(expr) {
            if !sampled.contains(&name) {
                missing.push(format!("{title}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "dashboard queries name metrics a worker and the operator did not serve: {missing:#?}\n{last}"
    );
    // The alerts read the same metrics (and Prometheus's own `up`).
    let rule = prometheus_rule(&[]);
    for (alert, r) in alerts(&rule) {
        for name in metric_names(r["expr"].as_str().expect("expr")) {
            assert!(
                name == "up" || sampled.contains(&name),
                "alert {alert} reads {name}, which a worker and the operator did not serve:\n{last}"
            );
        }
    }
    // Every family either serves is on the dashboard (a new metric needs a panel).
    for name in names.iter().filter(|n| n.starts_with("pacer_")) {
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum");
        assert!(
            queries.iter().any(|(_, q)| {
                metric_names(q)
                    .iter()
                    .any(|m| m == name || m.starts_with(base))
            }),
            "no panel shows {name}"
        );
    }
    assert!(
        pages[1].contains("pacer_operator_leader 1"),
        "the operator leads:\n{}",
        pages[1]
    );
}
