//! The Lambda deployment template passes cfn-lint (PyPI's, from the rig's venv) and keeps
//! the settings the design depends on.
use pacer_tests::Rig;

fn template() -> std::path::PathBuf {
    Rig::repo_root().join("function/deploy/template.yaml")
}

#[test]
fn template_passes_cfn_lint() {
    let rig = Rig::load();
    let python = rig.get("PYTHON");
    let cfn_lint = std::path::Path::new(&python).with_file_name("cfn-lint");
    let out = std::process::Command::new(&cfn_lint)
        .arg(template())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "run {}: {e}; install it with tests/rig/install",
                cfn_lint.display()
            )
        });
    assert!(
        out.status.success(),
        "cfn-lint found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn template_wires_partial_batch_failures_dlq_and_visibility() {
    let text = std::fs::read_to_string(template()).expect("read template");
    let doc: serde_json::Value = serde_norway::from_str(
        // serde_norway does not know CloudFormation's short-form tags: strip them.
        &text
            .replace("!Ref ", "")
            .replace("!GetAtt ", "")
            .replace("!Sub ", "")
            .replace("!FindInMap ", "")
            .replace("!If", "")
            .replace("!Not ", "")
            .replace("!Equals ", "")
            .replace("!Join ", ""),
    )
    .expect("template is YAML");
    let res = &doc["Resources"];
    let event = &res["PacerFunction"]["Properties"]["Events"]["Requests"]["Properties"];
    assert_eq!(event["FunctionResponseTypes"][0], "ReportBatchItemFailures");
    assert!(event["ScalingConfig"]["MaximumConcurrency"].is_string());
    assert!(res["RequestQueue"]["Properties"]["RedrivePolicy"]["deadLetterTargetArn"].is_string());
    // Visibility is six times the function timeout for every allowed timeout.
    let map = doc["Mappings"]["VisibilityForTimeout"]
        .as_object()
        .expect("mapping");
    let allowed = doc["Parameters"]["FunctionTimeoutSeconds"]["AllowedValues"]
        .as_array()
        .expect("allowed");
    assert_eq!(map.len(), allowed.len());
    // Every allowed timeout leaves a call its budget after the deadline's reserve: a
    // shorter one would defer every delivery and never call.
    let call_budget = pacer_function::handler::HandlerOptions::default().call_budget;
    for t in allowed {
        let t: u64 = t
            .as_str()
            .expect("a string")
            .parse()
            .expect("numeric timeout");
        let usable = std::time::Duration::from_secs(t)
            .saturating_sub(pacer_function::lambda::DEADLINE_RESERVE);
        assert!(
            usable >= call_budget,
            "FunctionTimeoutSeconds {t} leaves {usable:?}, less than one call's budget {call_budget:?}"
        );
    }
    for (timeout, vis) in map {
        let t: u64 = timeout.parse().expect("numeric timeout");
        assert_eq!(
            vis["Seconds"].as_u64(),
            Some(6 * t),
            "visibility for timeout {t}"
        );
    }
    // Secrets stay in Secrets Manager: the function gets their ARNs, never their values.
    let env = res["PacerFunction"]["Properties"]["Environment"]["Variables"]
        .as_object()
        .expect("environment");
    for plain in ["PACER_REDIS_URL", "PACER_GEMINI_API_KEY"] {
        assert!(
            !env.contains_key(plain),
            "{plain} in the function's environment"
        );
    }
    for arn in [
        "PACER_REDIS_URL_SECRET_ARN",
        "PACER_GEMINI_API_KEY_SECRET_ARN",
    ] {
        assert!(env.contains_key(arn), "{arn} missing");
    }
    assert!(
        !text.contains("resolve:secretsmanager"),
        "a secret resolved into the template"
    );
}
