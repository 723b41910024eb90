//! Issue 16: the chart's ScaledObject, capped by the quota, against KEDA's own CRD (from
//! KEDA's Go module, applied to the rig's apiserver): a server-side dry run with strict field
//! validation accepts it, and refuses a misspelt field (so the check can fail).
use pacer_tests::{Rig, create_namespace, kubectl};

fn chart() -> String {
    Rig::repo_root().join("charts/pacer").display().to_string()
}

/// The ScaledObject the chart renders with `extra` values, as YAML.
fn scaled_object(rig: &Rig, namespace: &str, extra: &[&str]) -> String {
    let chart = chart();
    let mut args = vec![
        "template",
        "r",
        &chart,
        "--namespace",
        namespace,
        "--show-only",
        "templates/worker.yaml",
        "--set",
        "worker.enabled=true",
        "--set",
        "worker.queueUrl=https://sqs.us-east-1.amazonaws.com/123/pacer",
        "--set",
        "worker.sink=s3://images/pacer",
    ];
    args.extend_from_slice(extra);
    let out = rig.tool("HELM").args(&args).output().expect("run helm");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("\n---")
        .find(|doc| doc.contains("kind: ScaledObject"))
        .unwrap_or_else(|| panic!("no ScaledObject rendered:\n{text}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_accepts_the_quota_capped_scaled_object() {
    let rig = Rig::load();
    let crd = std::path::Path::new(&rig.get("KEDA_CRDS")).join("keda.sh_scaledobjects.yaml");
    let crd = crd.display().to_string();
    let (ok, _, err) = kubectl(
        &rig,
        &["apply", "--server-side", "--force-conflicts", "-f", &crd],
        None,
    );
    assert!(ok, "applying KEDA's ScaledObject CRD: {err}");
    let (ok, _, err) = kubectl(
        &rig,
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd/scaledobjects.keda.sh",
        ],
        None,
    );
    assert!(ok, "KEDA's CRD never became established: {err}");
    let client = rig.kube().await;
    let ns = Rig::unique("keda");
    create_namespace(&client, &ns).await;

    let capped = scaled_object(
        &rig,
        &ns,
        &["--set", &format!("worker.keda.quotaPool={ns}/images")],
    );
    println!("{capped}");
    assert!(capped.contains("type: metrics-api"), "{capped}");
    assert!(
        capped.contains(&format!(
            "url: \"http://r-pacer-operator.{ns}.svc:8080/scale/{ns}/images\""
        )),
        "{capped}"
    );
    assert!(
        capped.contains("formula: \"min(queue / 20, quota)\""),
        "{capped}"
    );
    let dry_run = |doc: &str| {
        kubectl(
            &rig,
            &[
                "apply",
                "--dry-run=server",
                "--validate=strict",
                "-n",
                &ns,
                "-f",
                "-",
            ],
            Some(doc),
        )
    };
    let (ok, out, err) = dry_run(&capped);
    assert!(ok, "KEDA's CRD refused the chart's ScaledObject: {err}");
    assert!(out.contains("scaledobject.keda.sh/r-pacer-worker"), "{out}");
    // The queue alone: no quota trigger, no formula; also accepted.
    let queue_only = scaled_object(&rig, &ns, &[]);
    assert!(!queue_only.contains("metrics-api"), "{queue_only}");
    let (ok, _, err) = dry_run(&queue_only);
    assert!(ok, "{err}");
    // The check bites: a misspelt field is refused by KEDA's schema.
    let (ok, _, err) = dry_run(&capped.replace("scalingModifiers:", "scalingModifier:"));
    assert!(!ok, "a misspelt field passed KEDA's schema");
    assert!(err.contains("scalingModifier"), "{err}");
}
