//! Reconciling a `QuotaPool`: compile, check the API key Secret exists, write the compiled
//! pool to Redis (only when it differs, so replicas reload only on real changes), read live
//! usage from the limiter, and report it all in status, conditions and Events.
use std::{sync::Arc, time::Duration};

use tracing::Instrument;

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use pacer_core::{
    config::{CompiledPool, FailureMode},
    limiter::{Limiter, QuotaKey},
    quota::Dim,
};
use pacer_crds::{
    DimensionUsage, ModelUsage, QuotaPool, QuotaPoolStatus, TenantStatus, compile::compile_pool,
};

use crate::{
    Error, Result,
    conditions::Conditions,
    context::{Context, FINALIZER, MANAGER},
    metrics::UsageLabels,
};

const KIND: &str = "quotapool";

pub(crate) async fn reconcile(pool: Arc<QuotaPool>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    let ns = pool
        .namespace()
        .ok_or_else(|| Error::NoNamespace(pool.name_any()))?;
    let key = format!("{ns}/{}", pool.name_any());
    let span = tracing::info_span!("reconcile", kind = KIND, pool = %key);
    ctx.retry_removals().await;
    let api: Api<QuotaPool> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            Finalizer::Apply(pool) => apply(&pool, &ns, &key, &ctx).await,
            Finalizer::Cleanup(pool) => cleanup(&pool, &key, &ctx).await,
        }
    })
    .instrument(span)
    .await;
    ctx.finish(&key, result)
}

pub(crate) fn error_policy(pool: Arc<QuotaPool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry(KIND, pool.as_ref(), error)
}

async fn apply(pool: &QuotaPool, ns: &str, key: &str, ctx: &Context) -> Result<Action> {
    let generation = pool.metadata.generation.unwrap_or(0);
    let old = pool.status.clone().unwrap_or_default();
    let mut conditions = Conditions::new(&old.conditions, Some(generation));
    let mut status = QuotaPoolStatus {
        observed_generation: Some(generation),
        model_count: u32::try_from(pool.spec.models.len()).ok(),
        requests: old.requests.clone(),
        config_version: old.config_version,
        models: old.models.clone(),
        busiest_tenant: old.busiest_tenant.clone(),
        tenants: old.tenants.clone(),
        conditions: Vec::new(),
    };

    let compiled = match compile_pool(ns, &pool.name_any(), generation, &pool.spec) {
        Ok(c) => c,
        Err(e) => {
            // The schema catches nearly everything; what is left is the user's to fix, so
            // no retry until the object changes (a resync re-checks anyway).
            conditions.set("Ready", false, "InvalidSpec", &e.to_string());
            finish(pool, ctx, status, conditions).await?;
            return Ok(Action::requeue(ctx.resync));
        }
    };

    // Quotas are per project: a second pool for the same project would allow its quota
    // twice. Checked against the pools already in Redis (unreadable Redis is handled below).
    if let Ok(current) = ctx.store.load().await
        && let Err(e) = pacer_crds::compile::check_distinct_projects(
            std::slice::from_ref(&compiled),
            &current.pools,
        )
    {
        conditions.set("Ready", false, "InvalidSpec", &e.to_string());
        finish(pool, ctx, status, conditions).await?;
        return Ok(Action::requeue(ctx.resync));
    }

    let mut ready = (
        true,
        "Compiled",
        String::from("compiled and written to Redis"),
    );
    if let Some(reason_message) = check_secret(pool, ns, ctx).await? {
        ready = (false, reason_message.0, reason_message.1);
    }

    match write_if_changed(ctx, key, &compiled).await {
        Ok((written, version)) => {
            // Unchanged config keeps the version it was written at (the global version moves
            // with every other object's writes).
            if written || status.config_version.is_none() {
                status.config_version = Some(version);
            }
            ctx.redis_ok(true);
            conditions.set(
                "Degraded",
                false,
                "RedisReachable",
                "the operator reached Redis",
            );
        }
        Err(e) => {
            ctx.redis_ok(false);
            let mode = failure_mode_text(compiled.failure_mode);
            let message = format!("Redis unreachable ({e}); replicas apply failureMode {mode}");
            conditions.set("Degraded", true, "RedisUnavailable", &message);
            conditions.set("Ready", false, "RedisUnavailable", &message);
            finish(pool, ctx, status, conditions).await?;
            return Err(e);
        }
    }
    conditions.set("Ready", ready.0, ready.1, &ready.2);

    // Live usage: read at most every `usage_refresh` (a status patch triggers another
    // reconcile; without this a busy pool would patch in a tight loop).
    let spec_changed = old.observed_generation != Some(generation);
    let busy;
    if ctx.usage_due(key, spec_changed) {
        match read_usage(ctx, key, &compiled).await {
            Ok((models, tenants)) => {
                busy = models
                    .iter()
                    .flat_map(|m| &m.dimensions)
                    .any(|d| d.used > 0);
                status.requests = busiest_requests(&models);
                status.models = models;
                status.busiest_tenant = busiest_tenant(&tenants);
                status.tenants = tenants;
            }
            Err(e) => {
                ctx.redis_ok(false);
                let message = format!(
                    "reading usage failed ({e}); replicas apply failureMode {}",
                    failure_mode_text(compiled.failure_mode)
                );
                conditions.set("Degraded", true, "RedisUnavailable", &message);
                finish(pool, ctx, status, conditions).await?;
                return Err(e.into());
            }
        }
    } else {
        busy = status
            .models
            .iter()
            .flat_map(|m| &m.dimensions)
            .any(|d| d.used > 0);
    }
    near_limit_and_throttled(
        &mut conditions,
        &status.models,
        compiled.alert_threshold_percent,
    );
    budget_spent(&mut conditions, &status.tenants);
    // Raised by replicas whose provider blamed the account; it expires once calls stop
    // failing that way.
    let account = ctx.store.account_alert(&compiled.name).await;
    let alert_raised = matches!(account, Ok(Some(_)));
    match account {
        Ok(Some(message)) => conditions.set(
            "AccountProblem",
            true,
            "ProviderRefusedAccount",
            &format!("requests wait until the provider accepts the account again: {message}"),
        ),
        Ok(None) => conditions.set(
            "AccountProblem",
            false,
            "AccountAccepted",
            "no provider call blamed the account recently",
        ),
        Err(e) => tracing::warn!(error = %e, "reading the account alert failed"),
    }

    finish(pool, ctx, status, conditions).await?;
    Ok(Action::requeue(if busy || alert_raised {
        ctx.usage_refresh
    } else {
        ctx.resync
    }))
}

async fn cleanup(pool: &QuotaPool, key: &str, ctx: &Context) -> Result<Action> {
    // Limiter state is left to expire with its window: a pool recreated at once keeps
    // counting what was already sent.
    ctx.remove_config(KIND, key, pool.metadata.deletion_timestamp.as_ref())
        .await?;
    for m in &pool.spec.models {
        for dim in usage_dimensions() {
            ctx.metrics.usage.remove(&UsageLabels {
                pool: key.to_owned(),
                model: m.name.clone(),
                dimension: dim.to_owned(),
            });
        }
    }
    ctx.forget(key);
    tracing::info!(pool = %key, "removed the pool's config from Redis");
    Ok(Action::await_change())
}

/// Checks the referenced Secret exists, by reading its metadata only: the key never
/// reaches this process. `Ok(Some((reason, message)))` when it is not usable.
async fn check_secret(
    pool: &QuotaPool,
    ns: &str,
    ctx: &Context,
) -> Result<Option<(&'static str, String)>> {
    let Some(secret) = &pool.spec.api_key_secret else {
        return Ok(None);
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    match api.get_metadata_opt(&secret.name).await {
        Ok(Some(_)) => Ok(None),
        Ok(None) => Ok(Some((
            "ApiKeySecretMissing",
            format!(
                "Secret {ns}/{} (spec.apiKeySecret) does not exist; create it with the key {:?}",
                secret.name, secret.key
            ),
        ))),
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(Some((
            "ApiKeySecretForbidden",
            format!(
                "the operator may not read Secret {ns}/{}: add {ns} to the chart's \
                 operator.secretNamespaces",
                secret.name
            ),
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn write_if_changed(
    ctx: &Context,
    key: &str,
    compiled: &CompiledPool,
) -> Result<(bool, u64)> {
    let current = ctx.store.load().await?;
    if current.pools.get(key) == Some(compiled) {
        return Ok((false, current.version));
    }
    let version = ctx.store.put_pool(compiled).await?;
    ctx.metrics
        .config_writes
        .get_or_create(&crate::metrics::KindLabels { kind: KIND })
        .inc();
    tracing::info!(pool = %key, version, "wrote the pool's config to Redis");
    Ok((true, version))
}

async fn read_usage(
    ctx: &Context,
    key: &str,
    compiled: &CompiledPool,
) -> Result<(Vec<ModelUsage>, Vec<TenantStatus>), pacer_core::limiter::Error> {
    let mut out = Vec::with_capacity(compiled.models.len());
    let mut tenants: Vec<TenantStatus> = compiled
        .tenants
        .iter()
        .map(|t| TenantStatus {
            name: t.name.clone(),
            ..TenantStatus::default()
        })
        .collect();
    // The budgets are the project's (one per tenant, over every model): any model's read
    // gives them.
    let mut spent: Vec<(u64, u64)> = vec![(0, 0); tenants.len()];
    for model in compiled.models.keys() {
        let Some(quota) = compiled.model_quota(model) else {
            continue;
        };
        let per_tenant = ctx
            .limiter
            .tenant_usage(&QuotaKey::new(&compiled.project, model), &quota)
            .await?;
        for (i, u) in per_tenant.iter().enumerate() {
            let Some(t) = tenants.get_mut(i) else {
                continue;
            };
            t.requests += u.requests;
            t.booked_ahead += u.booked_ahead;
            t.wait_seconds = t.wait_seconds.max(ceil_secs(u.queue));
            spent[i] = (
                spent[i].0.max(u.spent_today_micros),
                spent[i].1.max(u.spent_this_month_micros),
            );
        }
        let usage = ctx
            .limiter
            .usage(&QuotaKey::new(&compiled.project, model), &quota)
            .await?;
        let mut dimensions = Vec::new();
        for d in &usage.dimensions {
            let percent = d
                .limit
                .filter(|l| *l > 0)
                .map(|l| u32::try_from(d.used.saturating_mul(100) / l).unwrap_or(u32::MAX));
            let ratio = match d.limit {
                Some(l) if l > 0 => d.used as f64 / l as f64,
                _ => 0.0,
            };
            ctx.metrics
                .usage
                .get_or_create(&UsageLabels {
                    pool: key.to_owned(),
                    model: model.clone(),
                    dimension: d.dim.name().to_owned(),
                })
                .set(ratio);
            // Unlimited and unused dimensions would only clutter `kubectl describe`.
            if d.limit.is_some() || d.used > 0 {
                dimensions.push(DimensionUsage {
                    dimension: d.dim.name().to_owned(),
                    used: d.used,
                    limit: d.limit,
                    percent,
                });
            }
        }
        if let Some(l) = usage.daily_limit.filter(|l| *l > 0) {
            ctx.metrics
                .usage
                .get_or_create(&UsageLabels {
                    pool: key.to_owned(),
                    model: model.clone(),
                    dimension: "requests_per_day".to_owned(),
                })
                .set(usage.daily_used as f64 / l as f64);
        }
        let cooldown = usage.cooldown_remaining.max(usage.daily_blocked_remaining);
        out.push(ModelUsage {
            name: model.clone(),
            dimensions,
            daily_used: Some(usage.daily_used),
            daily_limit: usage.daily_limit,
            cooldown_seconds: Some(ceil_secs(cooldown)),
            // Only where a cut was learned (a shared quota answering bare 429s).
            learned_rate_percent: (usage.rate_cut_permille > 0)
                .then(|| 100 - usage.rate_cut_permille.min(1000) / 10),
        });
    }
    let total: u64 = tenants.iter().map(|t| t.requests).sum();
    let active: Vec<bool> = tenants
        .iter()
        .map(|t| t.requests > 0 || t.booked_ahead > 0)
        .collect();
    let expected = pacer_core::quota::fair_shares(&compiled.tenants, &active);
    for (i, (t, share)) in tenants.iter_mut().zip(&compiled.tenants).enumerate() {
        t.share_percent = (t.requests * 100)
            .checked_div(total)
            .map_or(0, |p| u32::try_from(p).unwrap_or(100));
        t.expected_share_percent = u32::try_from(expected[i] / 10).unwrap_or(0);
        t.spent_today_usd = spent[i].0 as f64 / 1e6;
        let left =
            |budget: Option<u64>, used: u64| budget.map(|b| b.saturating_sub(used) as f64 / 1e6);
        t.budget_left_today_usd = left(share.daily_budget_micros, spent[i].0);
        t.budget_left_this_month_usd = left(share.monthly_budget_micros, spent[i].1);
        let gone = |budget: Option<u64>, used: u64| {
            budget.is_some_and(|b| b.saturating_sub(used).saturating_mul(50) < b.max(1))
        };
        t.budget_spent = if gone(share.monthly_budget_micros, spent[i].1) {
            Some("month".into())
        } else if gone(share.daily_budget_micros, spent[i].0) {
            Some("day".into())
        } else {
            None
        };
        let labels = crate::metrics::TenantLabels {
            pool: key.to_owned(),
            tenant: t.name.clone(),
        };
        ctx.metrics
            .tenant_share
            .get_or_create(&labels)
            .set(if total > 0 {
                t.requests as f64 / total as f64
            } else {
                0.0
            });
        ctx.metrics
            .tenant_spent
            .get_or_create(&labels)
            .set(t.spent_today_usd);
    }
    Ok((out, tenants))
}

/// `name share%` of the tenant with the largest part of the window's requests.
fn busiest_tenant(tenants: &[TenantStatus]) -> Option<String> {
    tenants
        .iter()
        .filter(|t| t.requests > 0)
        .max_by_key(|t| (t.share_percent, t.requests))
        .map(|t| format!("{} {}%", t.name, t.share_percent))
}

/// `BudgetSpent` while a tenant's daily or monthly budget is spent: its requests wait for
/// the reset.
fn budget_spent(conditions: &mut Conditions, tenants: &[TenantStatus]) {
    let spent: Vec<String> = tenants
        .iter()
        .filter_map(|t| match t.budget_spent.as_deref()? {
            "month" => Some(format!(
                "{}'s monthly budget (until the month ends)",
                t.name
            )),
            _ => Some(format!(
                "{}'s daily budget (until Pacific midnight)",
                t.name
            )),
        })
        .collect();
    if spent.is_empty() {
        conditions.set(
            "BudgetSpent",
            false,
            "WithinBudget",
            "no tenant's budget is spent",
        );
    } else {
        conditions.set(
            "BudgetSpent",
            true,
            "TenantBudgetSpent",
            &format!(
                "spent: {}; those requests wait for the reset",
                spent.join(", ")
            ),
        );
    }
}

fn usage_dimensions() -> impl Iterator<Item = &'static str> {
    Dim::ALL
        .iter()
        .map(|d| d.name())
        .chain(std::iter::once("requests_per_day"))
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `used/limit` of requests for the model using the largest share of its request limit.
fn busiest_requests(models: &[ModelUsage]) -> Option<String> {
    models
        .iter()
        .filter_map(|m| {
            m.dimensions
                .iter()
                .find(|d| d.dimension == Dim::Requests.name())
        })
        .max_by_key(|d| (d.percent.unwrap_or(0), d.used))
        .map(|d| match d.limit {
            Some(l) => format!("{}/{l}", d.used),
            None => format!("{}/-", d.used),
        })
}

fn near_limit_and_throttled(conditions: &mut Conditions, models: &[ModelUsage], threshold: u8) {
    let near: Vec<String> = models
        .iter()
        .flat_map(|m| {
            m.dimensions
                .iter()
                .filter(|d| d.percent.is_some_and(|p| p >= u32::from(threshold)))
                .map(move |d| {
                    format!(
                        "{} {} {}% ({}/{})",
                        m.name,
                        d.dimension,
                        d.percent.unwrap_or(0),
                        d.used,
                        d.limit.unwrap_or(0)
                    )
                })
        })
        .collect();
    if near.is_empty() {
        conditions.set(
            "NearLimit",
            false,
            "BelowThreshold",
            &format!("every limit is below {threshold}%"),
        );
    } else {
        conditions.set("NearLimit", true, "AboveThreshold", &near.join(", "));
    }
    let cooling: Vec<String> = models
        .iter()
        .filter(|m| m.cooldown_seconds.is_some_and(|s| s > 0))
        .map(|m| {
            format!(
                "{} cooling down {}s",
                m.name,
                m.cooldown_seconds.unwrap_or(0)
            )
        })
        .collect();
    if cooling.is_empty() {
        conditions.set(
            "Throttled",
            false,
            "NoCooldown",
            "no upstream 429 cooldown active",
        );
    } else {
        conditions.set("Throttled", true, "Upstream429", &cooling.join(", "));
    }
}

fn failure_mode_text(mode: FailureMode) -> &'static str {
    match mode {
        FailureMode::Closed => "closed (work is deferred)",
        FailureMode::Open => "open (no global limit)",
        FailureMode::Local => "local (each replica keeps to limit / expectedReplicas)",
    }
}

/// Server-side applies the status (only when it changed) and records transition Events.
async fn finish(
    pool: &QuotaPool,
    ctx: &Context,
    mut status: QuotaPoolStatus,
    conditions: Conditions,
) -> Result<()> {
    let (list, transitions) = conditions.into_list();
    status.conditions = list;
    if pool.status.as_ref() != Some(&status) {
        let api: Api<QuotaPool> =
            Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "apiVersion": "pacer.dev/v1alpha1",
            "kind": "QuotaPool",
            "status": status,
        });
        api.patch_status(
            &pool.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    ctx.publish(&pool.object_ref(&()), &transitions).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(name: &str, used: u64, limit: u64) -> ModelUsage {
        ModelUsage {
            name: name.into(),
            dimensions: vec![DimensionUsage {
                dimension: "requests".into(),
                used,
                limit: Some(limit),
                percent: Some(u32::try_from(used * 100 / limit).unwrap_or(0)),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn busiest_model_is_the_largest_share_not_the_largest_count() {
        let models = [usage("flash", 100, 2000), usage("pro", 15, 20)];
        assert_eq!(busiest_requests(&models).as_deref(), Some("15/20"));
    }

    #[test]
    fn near_limit_names_the_model_and_dimension() {
        let mut c = Conditions::new(&[], None);
        near_limit_and_throttled(&mut c, &[usage("pro", 17, 20)], 80);
        let (list, _) = c.into_list();
        let near = list
            .iter()
            .find(|c| c.type_ == "NearLimit")
            .expect("NearLimit");
        assert_eq!(near.status, "True");
        assert!(
            near.message.contains("pro requests 85%"),
            "{}",
            near.message
        );
    }
}
