//! The rig's kube-apiserver is real: Pacer's CRDs install, and a QuotaPool round-trips.
use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, CustomResourceExt, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use pacer_crds::{ModelChain, ModelLimits, QuotaPool, QuotaPoolSpec, Tier};
use pacer_tests::Rig;

/// Applies both CRDs and waits until the apiserver serves them.
pub async fn install_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("pacer-tests").force();
    for crd in [QuotaPool::crd(), ModelChain::crd()] {
        let name = crd.name_any();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .expect("apply CRD");
        let established = kube::runtime::wait::await_condition(
            crds.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .expect("CRD established within 30 s")
            .expect("watch CRD");
    }
}

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
            }],
            spend_per_10_minutes_usd: Some(10.0),
            headroom_percent: 5,
            alert_threshold_percent: 80,
            failure_mode: Default::default(),
            expected_replicas: None,
            api_key_secret: None,
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
