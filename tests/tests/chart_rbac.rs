//! The chart on the rig's real apiserver: `helm install` succeeds (worker off: a bare
//! apiserver runs no pods), then the operator runs with a token minted by the TokenRequest
//! API for the chart's own ServiceAccount and reconciles, which proves the chart's RBAC is
//! enough; and that token is refused what the operator must not have (Secrets outside the
//! listed namespaces, listing or writing Secrets).
use std::time::{Duration, Instant};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    coordination::v1::Lease,
    core::v1::{Secret, ServiceAccount},
};
use kube::{Api, api::ListParams};
use pacer_core::config::ConfigStore;
use pacer_crds::{ModelChain, QuotaPool};
use pacer_operator::{Operator, RunArgs, Shutdown};
use pacer_tests::{Rig, create_namespace, install_crds, kubectl};

fn chart() -> String {
    Rig::repo_root().join("charts/pacer").display().to_string()
}

fn helm(rig: &Rig, args: &[&str]) -> String {
    let out = rig.tool("HELM").args(args).output().expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A client that authenticates with `token` against the rig's apiserver (same CA).
async fn client_with_token(rig: &Rig, token: &str) -> kube::Client {
    let path = rig.get("KUBECONFIG");
    let text = std::fs::read_to_string(&path).expect("read kubeconfig");
    let mut doc: serde_json::Value = serde_norway::from_str(&text).expect("kubeconfig YAML");
    doc["users"] = serde_json::json!([{ "name": "chart-sa", "user": { "token": token } }]);
    doc["contexts"][0]["context"]["user"] = "chart-sa".into();
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&serde_norway::to_string(&doc).expect("yaml"))
            .expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_with_the_charts_service_account_only() {
    let rig = Rig::load();
    let admin = rig.kube().await;
    install_crds(&admin).await;
    let release = Rig::unique("rbac");
    let release_ns = Rig::unique("pacer-sys");
    let app_ns = Rig::unique("pacer-app");
    let other_ns = Rig::unique("pacer-other");
    for ns in [&release_ns, &app_ns, &other_ns] {
        create_namespace(&admin, ns).await;
    }
    for ns in [&app_ns, &other_ns] {
        let mut secret = Secret::default();
        secret.metadata.name = Some("gemini-api-key".into());
        secret.string_data = Some([("api-key".to_owned(), "not-a-real-key".to_owned())].into());
        Api::<Secret>::namespaced(admin.clone(), ns)
            .create(&Default::default(), &secret)
            .await
            .expect("create Secret");
    }

    helm(
        &rig,
        &[
            "install",
            &release,
            &chart(),
            "--namespace",
            &release_ns,
            "--set",
            "worker.enabled=false",
            "--set",
            &format!("operator.secretNamespaces={{{app_ns}}}"),
            "--set",
            &format!("operator.watchNamespace={app_ns}"),
            "--set",
            &format!("redis.url={}", rig.get("REDIS_URL")),
        ],
    );
    let status = helm(&rig, &["status", &release, "--namespace", &release_ns]);
    assert!(status.contains("STATUS: deployed"), "{status}");

    // The chart's ServiceAccount, and a token for it from the TokenRequest API.
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), &release_ns);
    let sa = sas
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
        .await
        .expect("list ServiceAccounts")
        .items
        .into_iter()
        .find_map(|s| s.metadata.name)
        .expect("the chart created a ServiceAccount");
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = sas
        .create_token_request(&sa, &Default::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .and_then(|s| s.token)
        .expect("a minted token");
    let client = client_with_token(&rig, &token).await;

    // The operator with nothing but that token: leader election in the release namespace.
    let redis_url = rig.get("REDIS_URL");
    let mut args = RunArgs::new(&redis_url);
    args.watch_namespace = Some(app_ns.clone());
    args.leader_elect = true;
    args.lease_namespace = Some(release_ns.clone());
    args.identity = Some("chart-rbac-test".into());
    args.resync_seconds = 2;
    let shutdown = Shutdown::new();
    let operator = Operator::start(client.clone(), args, shutdown.clone())
        .await
        .expect("start operator");
    let running = tokio::spawn(operator.run());

    let pool = r#"apiVersion: pacer.dev/v1alpha1
kind: QuotaPool
metadata:
  name: images
spec:
  project: PROJECT
  models:
    - name: gemini-3-pro-image
  apiKeySecret:
    name: gemini-api-key
---
apiVersion: pacer.dev/v1alpha1
kind: ModelChain
metadata:
  name: thumbnails
spec:
  pool: images
  steps:
    - model: gemini-3-pro-image
"#
    .replace("PROJECT", &Rig::unique("proj"));
    let (ok, _, err) = kubectl(&rig, &["apply", "-n", &app_ns, "-f", "-"], Some(&pool));
    assert!(ok, "{err}");

    // Reconciled: Ready (the Secret check passed), config in Redis, status written.
    let pools: Api<QuotaPool> = Api::namespaced(admin.clone(), &app_ns);
    let chains: Api<ModelChain> = Api::namespaced(admin.clone(), &app_ns);
    let start = Instant::now();
    loop {
        let pool = pools.get("images").await.expect("get pool");
        let chain = chains.get("thumbnails").await.expect("get chain");
        let ready = |c: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>| {
            c.and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        let p = ready(pool.status.as_ref().map(|s| &s.conditions));
        let c = ready(chain.status.as_ref().map(|s| &s.conditions));
        if p.as_ref().is_some_and(|p| p.0 == "True") && c.as_ref().is_some_and(|c| c.0 == "True") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not reconciled with the chart's RBAC: pool {p:?}, chain {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let store = ConfigStore::connect(&redis_url).await.expect("redis");
    let cfg = store.load().await.expect("load");
    assert!(cfg.pools.contains_key(&format!("{app_ns}/images")));
    assert!(cfg.chains.contains_key(&format!("{app_ns}/thumbnails")));

    // It holds the Lease in the release namespace.
    let lease = Api::<Lease>::namespaced(admin.clone(), &release_ns)
        .get("pacer-operator")
        .await
        .expect("the operator created its Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("chart-rbac-test")
    );

    // And it is refused what it must not have.
    let other: Api<Secret> = Api::namespaced(client.clone(), &other_ns);
    let denied = other
        .get_metadata("gemini-api-key")
        .await
        .expect_err("read Secret elsewhere");
    assert_eq!(status_code(&denied), Some(403), "{denied}");
    // Its kinds outside the watched namespace (the chart's RBAC is namespaced).
    let pools_elsewhere: Api<QuotaPool> = Api::namespaced(client.clone(), &other_ns);
    let denied = pools_elsewhere
        .list(&ListParams::default())
        .await
        .expect_err("list QuotaPools outside the watched namespace");
    assert_eq!(status_code(&denied), Some(403), "{denied}");
    let own: Api<Secret> = Api::namespaced(client.clone(), &app_ns);
    let denied = own
        .list_metadata(&ListParams::default())
        .await
        .expect_err("list Secrets");
    assert_eq!(status_code(&denied), Some(403), "{denied}");
    let mut s = Secret::default();
    s.metadata.name = Some("planted".into());
    let denied = own
        .create(&Default::default(), &s)
        .await
        .expect_err("create Secret");
    assert_eq!(status_code(&denied), Some(403), "{denied}");
    let (ok, out, _) = kubectl(
        &rig,
        &[
            "auth",
            "can-i",
            "delete",
            "quotapools",
            "-n",
            &app_ns,
            &format!("--as=system:serviceaccount:{release_ns}:{sa}"),
        ],
        None,
    );
    assert!(
        !ok && out.trim() == "no",
        "the operator may delete QuotaPools: {out}"
    );

    // Deleting through the finalizer works with the same token.
    let (ok, _, err) = kubectl(
        &rig,
        &[
            "delete",
            "-n",
            &app_ns,
            "-f",
            "-",
            "--wait=true",
            "--timeout=20s",
        ],
        Some(&pool),
    );
    assert!(ok, "{err}");
    let cfg = store.load().await.expect("load");
    assert!(!cfg.pools.contains_key(&format!("{app_ns}/images")));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("operator stops")
        .expect("join")
        .expect("operator ends cleanly");
    helm(&rig, &["uninstall", &release, "--namespace", &release_ns]);
}

fn render(rig: &Rig, extra: &[&str]) -> Vec<serde_json::Value> {
    let chart = chart();
    let mut args = vec!["template", "r", &chart, "--namespace", "pacer-system"];
    args.extend_from_slice(extra);
    let out = helm(rig, &args);
    serde_norway::Deserializer::from_str(&out)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

#[test]
fn chart_renders_worker_keda_and_hardened_pods() {
    let rig = Rig::load();
    let docs = render(
        &rig,
        &[
            "--set",
            "worker.enabled=true",
            "--set",
            "worker.queueUrl=https://sqs.us-east-1.amazonaws.com/123/pacer",
            "--set",
            "worker.sink=s3://images/pacer",
            "--set",
            "worker.apiKeySecret.name=gemini-api-key",
            "--set",
            "worker.keda.poolRequestsPerMinute=950",
            "--set",
            "worker.keda.requestsPerMinutePerReplica=100",
            "--set",
            "serviceMonitor.enabled=true",
        ],
    );
    let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
    let scaled = kind("ScaledObject").next().expect("ScaledObject");
    assert_eq!(scaled["spec"]["maxReplicaCount"], 10, "ceil(950 / 100)");
    assert_eq!(scaled["spec"]["triggers"][0]["type"], "aws-sqs-queue");
    assert!(kind("ServiceMonitor").next().is_some());
    let deployments: Vec<_> = kind("Deployment").collect();
    assert_eq!(deployments.len(), 2, "operator and worker");
    for d in deployments {
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        for c in pod["containers"].as_array().expect("containers") {
            assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{c}");
            assert_eq!(
                c["securityContext"]["allowPrivilegeEscalation"], false,
                "{c}"
            );
            assert!(c["resources"]["limits"].is_object(), "{c}");
        }
    }
    let worker_env = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "r-pacer-worker")
        .expect("worker")["spec"]["template"]["spec"]["containers"][0]["env"]
        .clone();
    let key = worker_env
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "PACER_GEMINI_API_KEY")
        .expect("API key env");
    assert_eq!(key["valueFrom"]["secretKeyRef"]["name"], "gemini-api-key");

    // Watching one namespace: its kinds and Events there only, nothing cluster-wide.
    let docs = render(&rig, &["--set", "operator.watchNamespace=team-a"]);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert!(
        !kinds.contains(&"ClusterRole") && !kinds.contains(&"ClusterRoleBinding"),
        "cluster-wide RBAC while watching one namespace: {kinds:?}"
    );
    let operator_role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d.to_string().contains("quotapools"))
        .expect("a Role for the operator's kinds");
    assert_eq!(operator_role["metadata"]["namespace"], "team-a");

    // Secrets: `get` only, only in the release namespace by default, never cluster-wide.
    let docs = render(&rig, &[]);
    for role in docs.iter().filter(|d| d["kind"] == "ClusterRole") {
        assert!(
            !role.to_string().contains("secrets"),
            "cluster-wide Secret access: {role}"
        );
    }
    let secret_roles: Vec<_> = docs
        .iter()
        .filter(|d| d["kind"] == "Role" && d.to_string().contains("secrets"))
        .collect();
    assert_eq!(secret_roles.len(), 1);
    assert_eq!(secret_roles[0]["metadata"]["namespace"], "pacer-system");
    assert_eq!(
        secret_roles[0]["rules"][0]["verbs"],
        serde_json::json!(["get"])
    );
}

#[test]
fn values_schema_rejects_bad_values() {
    let rig = Rig::load();
    let out = rig
        .tool("HELM")
        .args(["template", "r", &chart(), "--set", "operator.replicas=many"])
        .output()
        .expect("helm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator"));
    let out = rig
        .tool("HELM")
        .args(["template", "r", &chart(), "--set", "worker.enabled=true"])
        .output()
        .expect("helm");
    assert!(
        !out.status.success(),
        "a worker without a queue URL rendered"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("worker.queueUrl"));
    // Nor one without a sink: the default folder is on the read-only root filesystem.
    let out = rig
        .tool("HELM")
        .args(["template", "r", &chart(), "--set", "worker.enabled=true"])
        .args([
            "--set",
            "worker.queueUrl=https://sqs.us-east-1.amazonaws.com/123/pacer",
        ])
        .output()
        .expect("helm");
    assert!(!out.status.success(), "a worker without a sink rendered");
    assert!(String::from_utf8_lossy(&out.stderr).contains("worker.sink"));
}

/// Every object the chart renders (worker on) passes the real apiserver's validation
/// (`kubectl apply --dry-run=server`); KEDA's and Prometheus' kinds are not installed on
/// the rig, so those two are checked for shape only in the rendering test above.
#[tokio::test]
async fn rendered_chart_passes_server_side_validation() {
    let rig = Rig::load();
    let client = rig.kube().await;
    install_crds(&client).await;
    let ns = Rig::unique("pacer-dry");
    create_namespace(&client, &ns).await;
    let chart = chart();
    let out = helm(
        &rig,
        &[
            "template",
            "dry",
            &chart,
            "--namespace",
            &ns,
            "--set",
            "worker.enabled=true",
            "--set",
            "worker.queueUrl=https://sqs.us-east-1.amazonaws.com/123/pacer",
            "--set",
            "worker.sink=s3://images/pacer",
            "--set",
            "worker.apiKeySecret.name=gemini-api-key",
        ],
    );
    let docs: Vec<String> = out
        .split("\n---")
        .filter(|d| !d.contains("kind: ScaledObject") && d.contains("kind:"))
        .map(str::to_owned)
        .collect();
    assert!(docs.len() >= 10, "rendered too little:\n{out}");
    let (ok, stdout, err) = kubectl(
        &rig,
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        Some(&docs.join("\n---\n")),
    );
    assert!(ok, "the apiserver rejected the chart:\n{stdout}{err}");
    for kind in [
        "deployment.apps",
        "clusterrole",
        "role.rbac",
        "service/",
        "serviceaccount/",
    ] {
        assert!(stdout.contains(kind), "no {kind} in:\n{stdout}");
    }
}
