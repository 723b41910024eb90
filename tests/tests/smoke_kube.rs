//! The rig's kube-apiserver is real: Pacer's CRDs install, and a QuotaPool round-trips.
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, api::PostParams};
use pacer_crds::{ModelLimits, QuotaPool, QuotaPoolSpec, Tier};
use pacer_tests::{Rig, install_crds};

#[tokio::test]
async fn quota_pool_crd_applies_and_round_trips() {
    let client = Rig::load().kube().await;
    install_crds(&client).await;

    let ns = Rig::unique("smoke");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");

    let pools: Api<QuotaPool> = Api::namespaced(client.clone(), &ns);
    let pool = QuotaPool::new(
        "images",
        QuotaPoolSpec {
            provider: Default::default(),
            project: "my-project".into(),
            tier: Tier::Tier1,
            models: vec![ModelLimits {
                name: "gemini-3-pro-image".into(),
                rpm: Some(20),
                tpm: None,
                ipm: None,
                rpd: Some(250),
                window_seconds: None,
                price_usd_per_image: None,
            }],
            spend_per_10_minutes_usd: Some(10.0),
            headroom_percent: 5,
            alert_threshold_percent: 80,
            failure_mode: Default::default(),
            expected_replicas: None,
            window_margin_ms: None,
            api_key_secret: None,
            api_key_env: None,
            base_url: None,
            vertex: None,
            tenants: Vec::new(),
        },
    );
    pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("create QuotaPool");
    let back = pools.get("images").await.expect("read QuotaPool back");
    assert_eq!(back.spec, pool.spec);
    assert!(back.metadata.uid.is_some(), "the apiserver assigned no uid");

    namespaces
        .delete(&ns, &Default::default())
        .await
        .expect("delete namespace");
}
