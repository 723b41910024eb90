//! Reconciling a `ModelChain`: check its pool and every step's model exist, compile it,
//! write it to Redis, and report Ready (with the reason when a reference is missing).
use std::sync::Arc;

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use pacer_core::config::CompiledChain;
use pacer_crds::{
    ModelChain, ModelChainStatus, QuotaPool,
    compile::{compile_chain, compile_pool},
};
use tracing::Instrument;

use crate::{
    Error, Result,
    conditions::Conditions,
    context::{Context, FINALIZER, MANAGER},
};

const KIND: &str = "modelchain";

pub(crate) async fn reconcile(chain: Arc<ModelChain>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    let ns = chain
        .namespace()
        .ok_or_else(|| Error::NoNamespace(chain.name_any()))?;
    let key = format!("{ns}/{}", chain.name_any());
    let span = tracing::info_span!("reconcile", kind = KIND, chain = %key);
    ctx.retry_removals().await;
    let api: Api<ModelChain> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, chain, |event| async {
        match event {
            Finalizer::Apply(chain) => apply(&chain, &ns, &key, &ctx).await,
            Finalizer::Cleanup(chain) => {
                ctx.remove_config(KIND, &key, chain.metadata.deletion_timestamp.as_ref())
                    .await?;
                ctx.forget(&key);
                tracing::info!(chain = %key, "removed the chain's config from Redis");
                Ok(Action::await_change())
            }
        }
    })
    .instrument(span)
    .await;
    ctx.finish(&key, result)
}

pub(crate) fn error_policy(chain: Arc<ModelChain>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry(KIND, chain.as_ref(), error)
}

async fn apply(chain: &ModelChain, ns: &str, key: &str, ctx: &Context) -> Result<Action> {
    let generation = chain.metadata.generation.unwrap_or(0);
    let old = chain.status.clone().unwrap_or_default();
    let mut conditions = Conditions::new(&old.conditions, Some(generation));
    let mut status = ModelChainStatus {
        observed_generation: Some(generation),
        resolved: None,
        config_version: old.config_version,
        conditions: Vec::new(),
    };

    let pools: Api<QuotaPool> = Api::namespaced(ctx.client.clone(), ns);
    let pool = pools.get_opt(&chain.spec.pool).await?;
    let compiled_pool = match &pool {
        None => {
            conditions.set(
                "Ready",
                false,
                "PoolNotFound",
                &format!(
                    "QuotaPool {ns}/{} (spec.pool) does not exist; create it or fix spec.pool",
                    chain.spec.pool
                ),
            );
            finish(chain, ctx, status, conditions).await?;
            // The pool watch wakes this chain when the pool appears.
            return Ok(Action::requeue(ctx.resync));
        }
        Some(p) => match compile_pool(
            ns,
            &p.name_any(),
            p.metadata.generation.unwrap_or(0),
            &p.spec,
        ) {
            Ok(c) => c,
            Err(e) => {
                conditions.set(
                    "Ready",
                    false,
                    "PoolInvalid",
                    &format!("QuotaPool {ns}/{} is invalid: {e}", chain.spec.pool),
                );
                finish(chain, ctx, status, conditions).await?;
                return Ok(Action::requeue(ctx.resync));
            }
        },
    };

    let compiled = match compile_chain(
        ns,
        &chain.name_any(),
        generation,
        &chain.spec,
        Some(&compiled_pool),
    ) {
        Ok(c) => c,
        Err(e) => {
            let reason = if e.field.ends_with(".model") {
                "ModelNotInPool"
            } else {
                "InvalidSpec"
            };
            conditions.set("Ready", false, reason, &e.to_string());
            finish(chain, ctx, status, conditions).await?;
            return Ok(Action::requeue(ctx.resync));
        }
    };
    status.resolved = Some(
        compiled
            .steps
            .iter()
            .map(|s| s.model.as_str())
            .collect::<Vec<_>>()
            .join(" → "),
    );

    match write_if_changed(ctx, key, &compiled).await {
        Ok((written, version)) => {
            ctx.redis_ok(true);
            // Unchanged config keeps the version it was written at (the global version moves
            // with every other object's writes).
            if written || status.config_version.is_none() {
                status.config_version = Some(version);
            }
            conditions.set(
                "Ready",
                true,
                "Compiled",
                "pool and models resolved; compiled and written to Redis",
            );
            finish(chain, ctx, status, conditions).await?;
            Ok(Action::requeue(ctx.resync))
        }
        Err(e) => {
            ctx.redis_ok(false);
            conditions.set(
                "Ready",
                false,
                "RedisUnavailable",
                &format!("writing the chain to Redis failed: {e}"),
            );
            finish(chain, ctx, status, conditions).await?;
            Err(e)
        }
    }
}

async fn write_if_changed(
    ctx: &Context,
    key: &str,
    compiled: &CompiledChain,
) -> Result<(bool, u64)> {
    let current = ctx.store.load().await?;
    if current.chains.get(key) == Some(compiled) {
        return Ok((false, current.version));
    }
    let version = ctx.store.put_chain(compiled).await?;
    ctx.metrics
        .config_writes
        .get_or_create(&crate::metrics::KindLabels { kind: KIND })
        .inc();
    tracing::info!(chain = %key, version, "wrote the chain's config to Redis");
    Ok((true, version))
}

async fn finish(
    chain: &ModelChain,
    ctx: &Context,
    mut status: ModelChainStatus,
    conditions: Conditions,
) -> Result<()> {
    let (list, transitions) = conditions.into_list();
    status.conditions = list;
    if chain.status.as_ref() != Some(&status) {
        let api: Api<ModelChain> =
            Api::namespaced(ctx.client.clone(), &chain.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "apiVersion": "pacer.dev/v1alpha1",
            "kind": "ModelChain",
            "status": status,
        });
        api.patch_status(
            &chain.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    ctx.publish(&chain.object_ref(&()), &transitions).await;
    Ok(())
}
