//! The CRDs on a real kube-apiserver: every example in `crds/examples/` applies with
//! kubectl, every file in `crds/examples/invalid/` is rejected with a message naming the
//! field (each file says which with `# rejects:` lines), and `kubectl get` / `explain` show
//! what the printer columns and descriptions promise.
use std::path::PathBuf;

use pacer_tests::{Rig, create_namespace, install_crds, kubectl};

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Rig::repo_root().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

async fn namespace(prefix: &str) -> (Rig, String) {
    let rig = Rig::load();
    let client = rig.kube().await;
    install_crds(&client).await;
    let ns = Rig::unique(prefix);
    create_namespace(&client, &ns).await;
    (rig, ns)
}

#[tokio::test]
async fn every_example_applies_and_kubectl_get_shows_the_columns() {
    let (rig, ns) = namespace("crd-examples").await;
    let files = yaml_files("crds/examples");
    assert!(
        files.len() >= 4,
        "expected pools and chains in crds/examples"
    );
    for file in &files {
        let path = file.display().to_string();
        let (ok, out, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", &path], None);
        assert!(ok, "kubectl apply -f {path} failed:\n{out}{err}");
    }

    let (ok, out, err) = kubectl(&rig, &["get", "quotapools", "-n", &ns], None);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap_or_default();
    for col in ["NAME", "TIER", "MODELS", "REQUESTS", "READY", "AGE"] {
        assert!(
            header.contains(col),
            "no {col} column in `kubectl get quotapools`:\n{out}"
        );
    }
    assert!(out.contains("Tier1") && out.contains("Tier2"), "{out}");
    let (ok, out, err) = kubectl(&rig, &["get", "modelchains", "-n", &ns], None);
    assert!(ok, "{err}");
    for col in ["POOL", "STEPS", "READY"] {
        assert!(
            out.contains(col),
            "no {col} column in `kubectl get modelchains`:\n{out}"
        );
    }
    // Short names and the `pacer` category.
    let (ok, out, err) = kubectl(&rig, &["get", "pacer", "-n", &ns, "-o", "name"], None);
    assert!(ok, "{err}");
    assert!(
        out.contains("quotapool.pacer.dev/images-tier1")
            && out.contains("modelchain.pacer.dev/thumbnails"),
        "`kubectl get pacer` misses a kind:\n{out}"
    );
    let (ok, _, err) = kubectl(&rig, &["get", "qp,mc", "-n", &ns], None);
    assert!(ok, "short names qp, mc: {err}");

    // Defaults are filled by the apiserver.
    let (ok, out, err) = kubectl(
        &rig,
        &["get", "quotapool", "images-tier1", "-n", &ns, "-o", "json"],
        None,
    );
    assert!(ok, "{err}");
    let pool: serde_json::Value = serde_json::from_str(&out).expect("pool JSON");
    assert_eq!(pool["spec"]["alertThresholdPercent"], 80);
}

#[tokio::test]
async fn kubectl_explain_teaches_every_field() {
    let (rig, _ns) = namespace("crd-explain").await;
    for (path, phrase) in [
        (
            "quotapool.spec.headroomPercent",
            "percent under every limit",
        ),
        ("quotapool.spec.project", "Immutable"),
        ("quotapool.spec.models.rpd", "midnight America/Los_Angeles"),
        ("modelchain.spec.steps.maxWaitSeconds", "falling through"),
        ("quotapool.status.models", "Live usage"),
    ] {
        let (ok, out, err) = kubectl(&rig, &["explain", path], None);
        assert!(ok, "kubectl explain {path}: {err}");
        // kubectl wraps descriptions: compare with whitespace collapsed.
        let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            flat.contains(phrase),
            "`kubectl explain {path}` lacks {phrase:?}:\n{out}"
        );
    }
}

#[tokio::test]
async fn every_invalid_example_is_rejected_naming_the_field() {
    let (rig, ns) = namespace("crd-invalid").await;
    let files = yaml_files("crds/examples/invalid");
    assert!(files.len() >= 10, "expected one invalid example per rule");
    let mut failures = Vec::new();
    for file in &files {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(file).expect("read example");
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# rejects:"))
            .map(str::trim)
            .collect();
        assert!(!expected.is_empty(), "{name} has no `# rejects:` line");
        // Every document but the last is valid setup (e.g. the object before an update).
        let docs: Vec<&str> = text.split("\n---\n").collect();
        let (last, setup) = docs.split_last().expect("a document");
        for doc in setup {
            let (ok, out, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(doc));
            assert!(ok, "{name}: setup document failed:\n{out}{err}");
        }
        let (ok, out, err) = kubectl(&rig, &["apply", "-n", &ns, "-f", "-"], Some(last));
        if ok {
            failures.push(format!("{name}: accepted:\n{out}"));
            continue;
        }
        for want in &expected {
            if !err.contains(want) {
                failures.push(format!("{name}: message lacks {want:?}:\n{err}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
