//! From the resources platform teams apply to the configuration replicas read: the one
//! compile step shared by the operator and `pacer apply`.
//!
//! The schema and CEL rules catch most mistakes at `kubectl apply` time; this step checks
//! again (for `pacer apply`, which has no apiserver) and checks what a schema cannot see,
//! such as a chain naming a model its pool does not declare, a model without limits or a
//! price, or two pools for one provider project. Errors name the field and the fix.
use std::collections::BTreeMap;

use pacer_core::{
    config::{self, CompiledChain, CompiledPool, CompiledStep, RetryConfig},
    models::{self, ImageSize},
    quota,
};

use crate::{ChainStep, FailureMode, ModelChainSpec, Provider, QuotaPoolSpec, Tier};

/// A resource that cannot be compiled: the field at fault and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: field `{field}`: {problem}")]
pub struct CompileError {
    /// `QuotaPool namespace/name` or `ModelChain namespace/name`.
    pub resource: String,
    /// The field path, e.g. `spec.models[1].name`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

/// The most steps a chain may have.
pub const MAX_STEPS: usize = 8;
/// The largest headroom, in percent.
pub const MAX_HEADROOM: u8 = 90;

/// Compiles a `QuotaPool`'s spec.
pub fn compile_pool(
    namespace: &str,
    name: &str,
    generation: i64,
    spec: &QuotaPoolSpec,
) -> Result<CompiledPool, CompileError> {
    let full = format!("{namespace}/{name}");
    let err = |field: &str, problem: String| CompileError {
        resource: format!("QuotaPool {full}"),
        field: field.to_owned(),
        problem,
    };
    if spec.project.trim().is_empty() {
        return Err(err(
            "spec.project",
            "is empty: set the provider's project id".into(),
        ));
    }
    if let Some(url) = &spec.base_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(err(
            "spec.baseUrl",
            format!("{url:?} is not an http:// or https:// URL"),
        ));
    }
    if let Some(name) = &spec.api_key_env
        && (name.is_empty()
            || name.starts_with(|c: char| c.is_ascii_digit())
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(err(
            "spec.apiKeyEnv",
            format!(
                "{name:?} is not an environment variable name (letters, digits, _): name the variable, never the key"
            ),
        ));
    }
    let vertex = spec.provider == Provider::Vertex;
    if spec.vertex.is_some() && !vertex {
        return Err(err(
            "spec.vertex",
            "applies to provider vertex only: set spec.provider: vertex or remove spec.vertex"
                .into(),
        ));
    }
    if spec.models.is_empty() {
        return Err(err(
            "spec.models",
            "lists no model: declare at least one".into(),
        ));
    }
    if spec.headroom_percent > MAX_HEADROOM {
        return Err(err(
            "spec.headroomPercent",
            format!(
                "is {}; it must be 0 to {MAX_HEADROOM}",
                spec.headroom_percent
            ),
        ));
    }
    if !(1..=100).contains(&spec.alert_threshold_percent) {
        return Err(err("spec.alertThresholdPercent", "must be 1 to 100".into()));
    }
    check_tenants(spec).map_err(|(field, problem)| err(&field, problem))?;
    let tier = match spec.tier {
        Tier::Free => quota::Tier::Free,
        Tier::Tier1 => quota::Tier::Tier1,
        Tier::Tier2 => quota::Tier::Tier2,
        Tier::Tier3 => quota::Tier::Tier3,
    };
    let mut models: BTreeMap<String, config::ModelLimits> = BTreeMap::new();
    let mut window: Option<(u32, usize)> = None;
    let spend = match spec.spend_per_10_minutes_usd {
        Some(usd) if !(usd.is_finite() && usd >= 0.0) => {
            return Err(err(
                "spec.spendPer10MinutesUsd",
                "must be a non-negative number".into(),
            ));
        }
        Some(usd) => Some((usd * 1_000_000.0).round() as u64),
        None => None,
    };
    for (i, m) in spec.models.iter().enumerate() {
        let at = |f: &str| format!("spec.models[{i}].{f}");
        if m.name.trim().is_empty() {
            return Err(err(
                &at("name"),
                "is empty: use the model id from the API path".into(),
            ));
        }
        if models.contains_key(&m.name) {
            return Err(err(
                &at("name"),
                format!("{:?} is listed twice; list each model once", m.name),
            ));
        }
        if let (Some(rpd), Some(rpm)) = (m.rpd, m.rpm)
            && rpd < rpm
        {
            return Err(err(
                &at("rpd"),
                format!("{rpd} requests per day is below {rpm} per minute; raise rpd or lower rpm"),
            ));
        }
        if let Some(w) = m.window_seconds {
            if w == 0 {
                return Err(err(&at("windowSeconds"), "must be at least 1".into()));
            }
            match window {
                Some((first, j)) if first != w => {
                    return Err(err(
                        &at("windowSeconds"),
                        format!(
                            "is {w} but spec.models[{j}].windowSeconds is {first}: one pool has one \
                             per-minute window length; use the same value for every model"
                        ),
                    ));
                }
                _ => window = Some((w, i)),
            }
        }
        let price = match m.price_usd_per_image {
            Some(usd) if !(usd.is_finite() && usd >= 0.0) => {
                return Err(err(
                    &at("priceUsdPerImage"),
                    "must be a non-negative number of US dollars".into(),
                ));
            }
            Some(usd) => Some((usd * 1_000_000.0).round() as u64),
            None => None,
        };
        let known = models::model_info(&m.name);
        // Vertex AI has no AI Studio tiers: its shared quota publishes no per-project
        // limits, so the rate the pool may use must be declared.
        if vertex && m.rpm.is_none() {
            return Err(err(
                &at("rpm"),
                format!(
                    "is required on Vertex AI: {:?} has no tier default there (the AI Studio \
                     tiers do not apply); set the requests per minute the project may use \
                     (its provisioned throughput, or a share of the shared quota)",
                    m.name
                ),
            ));
        }
        // A model the table does not know has no default limits and no price: left out, it
        // would run unlimited and free. Its limits and price must be given.
        if known.is_none() {
            if m.rpm.is_none() {
                return Err(err(
                    &at("rpm"),
                    format!(
                        "is required: {:?} is not in Pacer's built-in model table, so it has no \
                         default limits; set rpm (and tpm, ipm, rpd wherever the provider limits \
                         them) from the provider's quota page, or fix the model name",
                        m.name
                    ),
                ));
            }
            if price.is_none() {
                return Err(err(
                    &at("priceUsdPerImage"),
                    format!(
                        "is required: {:?} is not in Pacer's built-in model table, so it has no \
                         price and the spend limit could not count it; set priceUsdPerImage (US \
                         dollars per image, from the provider's pricing page)",
                        m.name
                    ),
                ));
            }
        }
        // Limits not given take the tier's published default for the model.
        let defaults = if vertex {
            Default::default()
        } else {
            known.map(|info| info.limits(tier)).unwrap_or_default()
        };
        models.insert(
            m.name.clone(),
            config::ModelLimits {
                rpm: m.rpm.or(defaults.rpm),
                tpm: m.tpm.or(defaults.tpm),
                ipm: m.ipm.or(defaults.ipm),
                rpd: m.rpd.or(defaults.rpd),
                window_ms: 0, // set below, once the pool's window is known
                price_micros_per_image: price,
            },
        );
    }
    let window_ms = window.map_or(60_000, |(w, _)| u64::from(w) * 1000);
    for limits in models.values_mut() {
        limits.window_ms = window_ms;
    }
    Ok(CompiledPool {
        name: full,
        generation,
        provider: match spec.provider {
            Provider::Gemini => config::ProviderKind::Gemini,
            Provider::Vertex => config::ProviderKind::Vertex,
            Provider::OpenaiCompatible => config::ProviderKind::OpenaiCompatible,
        },
        project: spec.project.clone(),
        models,
        // Not given: the tier's spend limit (none on Vertex AI, which has no tiers).
        spend_micros_per_10_minutes: if vertex {
            spend
        } else {
            spend.or(Some(tier.spend_per_10min_micros()))
        },
        headroom_percent: spec.headroom_percent,
        alert_threshold_percent: spec.alert_threshold_percent,
        failure_mode: match spec.failure_mode {
            FailureMode::Closed => config::FailureMode::Closed,
            FailureMode::Open => config::FailureMode::Open,
            FailureMode::Local => config::FailureMode::Local,
        },
        expected_replicas: spec.expected_replicas.unwrap_or(1).max(1),
        api_key_ref: spec
            .api_key_secret
            .as_ref()
            .map(|s| format!("{namespace}/{}#{}", s.name, s.key)),
        api_key_env: spec.api_key_env.clone(),
        window_margin_ms: spec.window_margin_ms.map(u64::from),
        base_url: spec
            .base_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_owned()),
        vertex: vertex.then(|| {
            let given = spec.vertex.clone().unwrap_or_default();
            config::VertexSettings {
                location: given
                    .location
                    .unwrap_or_else(|| pacer_core::gemini::vertex::DEFAULT_LOCATION.to_owned()),
                credentials_file: given.credentials_file,
            }
        }),
        tenants: spec
            .tenants
            .iter()
            .map(|t| pacer_core::quota::TenantShare {
                name: t.name.clone(),
                weight: t.weight.max(1),
                floor_permille: t.floor_percent.unwrap_or(0).min(100) * 10,
                ceiling_permille: t.ceiling_percent.unwrap_or(100).clamp(1, 100) * 10,
                daily_budget_micros: t.daily_budget_usd.map(usd_micros),
                monthly_budget_micros: t.monthly_budget_usd.map(usd_micros),
            })
            .collect(),
    })
}

fn usd_micros(usd: f64) -> u64 {
    (usd * 1_000_000.0).round() as u64
}

/// The tenants' rules (the CRD's CEL rules say the same, for `pacer apply` without an
/// API server): names unique and DNS labels, weights 1 to 1000, floors at most their
/// ceilings and at most 100 together.
fn check_tenants(spec: &QuotaPoolSpec) -> Result<(), (String, String)> {
    let mut floors = 0;
    for (i, t) in spec.tenants.iter().enumerate() {
        let at = |f: &str| format!("spec.tenants[{i}].{f}");
        let label = !t.name.is_empty()
            && t.name.len() <= 63
            && t.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !t.name.starts_with('-')
            && !t.name.ends_with('-');
        if !label {
            return Err((
                at("name"),
                format!(
                    "{:?} is not a tenant name: lowercase letters, digits and -, 1 to 63",
                    t.name
                ),
            ));
        }
        if spec.tenants[..i].iter().any(|u| u.name == t.name) {
            return Err((
                at("name"),
                format!(
                    "{:?} is declared twice: tenant names must be unique",
                    t.name
                ),
            ));
        }
        if !(1..=1000).contains(&t.weight) {
            return Err((
                at("weight"),
                format!("is {}; it must be 1 to 1000", t.weight),
            ));
        }
        let floor = t.floor_percent.unwrap_or(0);
        let ceiling = t.ceiling_percent.unwrap_or(100);
        if floor > 100 {
            return Err((
                at("floorPercent"),
                format!("is {floor}; it must be 0 to 100"),
            ));
        }
        if !(1..=100).contains(&ceiling) {
            return Err((
                at("ceilingPercent"),
                format!("is {ceiling}; it must be 1 to 100"),
            ));
        }
        if floor > ceiling {
            return Err((
                at("floorPercent"),
                format!("is {floor}, above the tenant's ceilingPercent {ceiling}"),
            ));
        }
        for (field, usd) in [
            ("dailyBudgetUsd", t.daily_budget_usd),
            ("monthlyBudgetUsd", t.monthly_budget_usd),
        ] {
            if let Some(usd) = usd
                && !(usd.is_finite() && usd >= 0.0)
            {
                return Err((
                    at(field),
                    format!("{usd} is not a non-negative number of dollars"),
                ));
            }
        }
        floors += floor;
    }
    if floors > 100 {
        return Err((
            "spec.tenants".into(),
            format!(
                "floorPercent adds up to {floors}: lower them to 100 or less so every floor can be met at once"
            ),
        ));
    }
    Ok(())
}

/// Checks that no two pools name one provider project: the limiter keeps one state per
/// (project, model), and two pools would each allow the project's whole quota (and its
/// spend twice). `pools` are the ones being compiled; `existing` the ones already
/// configured (a pool of the same name is being replaced, not duplicated).
pub fn check_distinct_projects(
    pools: &[CompiledPool],
    existing: &BTreeMap<String, CompiledPool>,
) -> Result<(), CompileError> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    // Pools already configured are only compared with the new ones: a conflict among them
    // alone is not this compile's to report.
    for pool in existing
        .values()
        .filter(|e| !pools.iter().any(|p| p.name == e.name))
    {
        seen.entry(pool.project.as_str())
            .or_insert(pool.name.as_str());
    }
    for pool in pools {
        if let Some(first) = seen.insert(pool.project.as_str(), pool.name.as_str())
            && first != pool.name
        {
            return Err(CompileError {
                resource: format!("QuotaPool {}", pool.name),
                field: "spec.project".into(),
                problem: format!(
                    "{:?} is also the project of QuotaPool {first}: quotas are per project, and \
                     two pools would each allow its whole quota; declare every model of the \
                     project in one pool",
                    pool.project
                ),
            });
        }
    }
    Ok(())
}

/// Compiles a `ModelChain`'s spec; with its pool, checks that every step's model is in it.
pub fn compile_chain(
    namespace: &str,
    name: &str,
    generation: i64,
    spec: &ModelChainSpec,
    pool: Option<&CompiledPool>,
) -> Result<CompiledChain, CompileError> {
    let full = format!("{namespace}/{name}");
    let err = |field: &str, problem: String| CompileError {
        resource: format!("ModelChain {full}"),
        field: field.to_owned(),
        problem,
    };
    if spec.pool.trim().is_empty() {
        return Err(err(
            "spec.pool",
            "is empty: name a QuotaPool in this namespace".into(),
        ));
    }
    if spec.steps.is_empty() || spec.steps.len() > MAX_STEPS {
        return Err(err(
            "spec.steps",
            format!(
                "has {} steps; a chain has 1 to {MAX_STEPS}",
                spec.steps.len()
            ),
        ));
    }
    let pool_name = format!("{namespace}/{}", spec.pool);
    for (i, step) in spec.steps.iter().enumerate() {
        if step.model.trim().is_empty() {
            return Err(err(&format!("spec.steps[{i}].model"), "is empty".into()));
        }
        if let Some(pool) = pool
            && !pool.has_model(&step.model)
        {
            let known: Vec<&str> = pool.models.keys().map(String::as_str).collect();
            return Err(err(
                &format!("spec.steps[{i}].model"),
                format!(
                    "{:?} is not declared in QuotaPool {pool_name} (it has {known:?}); add it to \
                     the pool or change the step",
                    step.model
                ),
            ));
        }
        check_step_options(step)
            .map_err(|(field, problem)| err(&format!("spec.steps[{i}].{field}"), problem))?;
        if let Some(pool) = pool
            && step.service_tier == Some(crate::chain::ServiceTier::Flex)
            && pool.provider != config::ProviderKind::Gemini
        {
            return Err(err(
                &format!("spec.steps[{i}].serviceTier"),
                format!(
                    "flex is a Gemini API tier; QuotaPool {pool_name} uses provider {:?}: \
                     remove serviceTier or use a Gemini API pool",
                    pool.provider
                ),
            ));
        }
    }
    let r = &spec.retry;
    if r.attempts == 0 {
        return Err(err(
            "spec.retry.attempts",
            "must be at least 1 (the first attempt)".into(),
        ));
    }
    if r.base_delay_ms == 0 || r.max_delay_ms < r.base_delay_ms {
        return Err(err(
            "spec.retry.maxDelayMs",
            "must be at least spec.retry.baseDelayMs, which must be positive".into(),
        ));
    }
    if spec.request_timeout_seconds == 0 {
        return Err(err(
            "spec.requestTimeoutSeconds",
            "must be at least 1".into(),
        ));
    }
    if let (Some(tenant), Some(pool)) = (&spec.tenant, pool)
        && !pool.tenants.iter().any(|t| &t.name == tenant)
    {
        let known: Vec<&str> = pool.tenants.iter().map(|t| t.name.as_str()).collect();
        return Err(err(
            "spec.tenant",
            format!(
                "{tenant:?} is not one of QuotaPool {pool_name}'s tenants ({known:?}): add it to the pool's spec.tenants or change the chain"
            ),
        ));
    }
    Ok(CompiledChain {
        tenant: spec.tenant.clone(),
        name: full,
        generation,
        pool: pool_name,
        steps: spec
            .steps
            .iter()
            .map(|s| CompiledStep {
                model: s.model.clone(),
                max_wait_ms: u64::from(s.max_wait_seconds) * 1000,
                aspect_ratio: s.aspect_ratio.clone(),
                image_size: s.image_size.map(image_size),
                service_tier: s.service_tier.map(|t| match t {
                    crate::chain::ServiceTier::Standard => models::ServiceTier::Standard,
                    crate::chain::ServiceTier::Flex => models::ServiceTier::Flex,
                }),
            })
            .collect(),
        retry: RetryConfig {
            attempts: r.attempts,
            base_delay_ms: r.base_delay_ms,
            max_delay_ms: r.max_delay_ms,
        },
        request_timeout_ms: u64::from(spec.request_timeout_seconds) * 1000,
        priority: spec.priority,
        deadline_ms: spec.deadline_seconds.map(|s| u64::from(s) * 1000),
    })
}

/// The core size of a resource's size (the CRD keeps its own enum, so its schema is
/// independent of core).
fn image_size(size: crate::ImageSize) -> ImageSize {
    match size {
        crate::ImageSize::HalfK => ImageSize::Half,
        crate::ImageSize::OneK => ImageSize::K1,
        crate::ImageSize::TwoK => ImageSize::K2,
        crate::ImageSize::FourK => ImageSize::K4,
    }
}

/// A step's default aspect ratio and size against what its model takes, when the model
/// table knows the model (another provider's model is the provider's to judge). The error
/// is the field (`aspectRatio` or `imageSize`) and the problem.
fn check_step_options(step: &ChainStep) -> Result<(), (&'static str, String)> {
    let Some(info) = models::model_info(&step.model) else {
        return Ok(());
    };
    if let Some(ratio) = &step.aspect_ratio
        && !info.takes_ratio(ratio)
    {
        return Err((
            "aspectRatio",
            format!(
                "{ratio:?} is not an aspect ratio {} takes; use one of {:?}",
                info.id,
                info.aspect_ratios()
            ),
        ));
    }
    if let Some(size) = step.image_size.map(image_size)
        && !info.takes_size(size)
    {
        let sizes: Vec<&str> = info
            .image_sizes()
            .into_iter()
            .map(ImageSize::name)
            .collect();
        return Err((
            "imageSize",
            format!(
                "{:?} is not an image size {} offers; use one of {sizes:?}",
                size.name(),
                info.id
            ),
        ));
    }
    Ok(())
}

/// What a YAML file of `QuotaPool` and `ModelChain` documents compiles to.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Compiled {
    /// The pools, in file order.
    pub pools: Vec<CompiledPool>,
    /// The chains, in file order.
    pub chains: Vec<CompiledChain>,
}

/// Compiles every document of a YAML stream (what `kubectl apply -f` takes). A chain's pool
/// must be in the same stream or in `existing` (the pools already configured).
pub fn compile_documents(
    yaml: &str,
    default_namespace: &str,
    existing: &BTreeMap<String, CompiledPool>,
) -> Result<Compiled, CompileError> {
    let mut out = Compiled::default();
    let mut chains = Vec::new();
    for (index, doc) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let at = format!("document {}", index + 1);
        let value: serde_json::Value =
            serde::Deserialize::deserialize(doc).map_err(|e| CompileError {
                resource: at.clone(),
                field: "(yaml)".into(),
                problem: e.to_string(),
            })?;
        if value.is_null() {
            continue;
        }
        let field = |f: &str, problem: String| CompileError {
            resource: at.clone(),
            field: f.into(),
            problem,
        };
        let api = value["apiVersion"].as_str().unwrap_or_default();
        if api != "pacer.dev/v1alpha1" {
            return Err(field(
                "apiVersion",
                format!("is {api:?}; expected \"pacer.dev/v1alpha1\""),
            ));
        }
        let name = value["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| field("metadata.name", "is missing".into()))?;
        let namespace = value["metadata"]["namespace"]
            .as_str()
            .unwrap_or(default_namespace);
        let generation = value["metadata"]["generation"].as_i64().unwrap_or(0);
        let spec = &value["spec"];
        match value["kind"].as_str().unwrap_or_default() {
            "QuotaPool" => {
                let spec: QuotaPoolSpec =
                    parse_spec(spec, &format!("QuotaPool {namespace}/{name}"))?;
                out.pools
                    .push(compile_pool(namespace, name, generation, &spec)?);
            }
            "ModelChain" => {
                let spec: ModelChainSpec =
                    parse_spec(spec, &format!("ModelChain {namespace}/{name}"))?;
                chains.push((namespace.to_owned(), name.to_owned(), generation, spec));
            }
            other => {
                return Err(field(
                    "kind",
                    format!("is {other:?}; expected QuotaPool or ModelChain"),
                ));
            }
        }
    }
    check_distinct_projects(&out.pools, existing)?;
    for (namespace, name, generation, spec) in chains {
        let pool_name = format!("{namespace}/{}", spec.pool);
        let pool = out
            .pools
            .iter()
            .find(|p| p.name == pool_name)
            .or_else(|| existing.get(&pool_name));
        let Some(pool) = pool else {
            return Err(CompileError {
                resource: format!("ModelChain {namespace}/{name}"),
                field: "spec.pool".into(),
                problem: format!(
                    "QuotaPool {pool_name} is neither in this file nor configured; apply it first"
                ),
            });
        };
        out.chains.push(compile_chain(
            &namespace,
            &name,
            generation,
            &spec,
            Some(pool),
        )?);
    }
    Ok(out)
}

/// Deserialises a spec, rejecting fields the type does not know (kubectl would prune them
/// silently; a typo in a limit must not pass unnoticed).
fn parse_spec<T>(spec: &serde_json::Value, resource: &str) -> Result<T, CompileError>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let err = |field: String, problem: String| CompileError {
        resource: resource.into(),
        field,
        problem,
    };
    if !spec.is_object() {
        return Err(err("spec".into(), "is missing or not a mapping".into()));
    }
    let parsed: T =
        serde_json::from_value(spec.clone()).map_err(|e| err("spec".into(), e.to_string()))?;
    let back = serde_json::to_value(&parsed).map_err(|e| err("spec".into(), e.to_string()))?;
    if let Some(path) = unknown_field(spec, &back, "spec") {
        return Err(err(
            path,
            "is not a known field; check its spelling with `kubectl explain`".into(),
        ));
    }
    Ok(parsed)
}

/// The first path present in `given` but absent from `known`.
fn unknown_field(
    given: &serde_json::Value,
    known: &serde_json::Value,
    path: &str,
) -> Option<String> {
    match (given, known) {
        (serde_json::Value::Object(g), serde_json::Value::Object(k)) => {
            g.iter().find_map(|(key, v)| {
                let p = format!("{path}.{key}");
                match k.get(key) {
                    None if !v.is_null() => Some(p),
                    None => None,
                    Some(kv) => unknown_field(v, kv, &p),
                }
            })
        }
        (serde_json::Value::Array(g), serde_json::Value::Array(k)) => g
            .iter()
            .zip(k)
            .enumerate()
            .find_map(|(i, (gv, kv))| unknown_field(gv, kv, &format!("{path}[{i}]"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = r#"
apiVersion: pacer.dev/v1alpha1
kind: QuotaPool
metadata: {name: images, namespace: team}
spec:
  project: my-project
  tier: Tier1
  headroomPercent: 10
  spendPer10MinutesUsd: 10
  models:
    - name: gemini-3-pro-image
    - name: gemini-3.1-flash-image
      rpm: 100
"#;
    const CHAIN: &str = r#"
---
apiVersion: pacer.dev/v1alpha1
kind: ModelChain
metadata: {name: posters, namespace: team}
spec:
  pool: images
  steps:
    - {model: gemini-3-pro-image, maxWaitSeconds: 20}
    - {model: gemini-3.1-flash-image}
"#;

    fn compile(yaml: &str) -> Result<Compiled, CompileError> {
        compile_documents(yaml, "default", &BTreeMap::new())
    }

    #[test]
    fn compiles_a_pool_and_chain_with_tier_defaults_and_headroom() {
        let c = compile(&format!("{POOL}{CHAIN}")).unwrap();
        let pool = &c.pools[0];
        assert_eq!(pool.name, "team/images");
        // Tier 1's published limits fill what the spec leaves out.
        assert_eq!(pool.models["gemini-3-pro-image"].rpm, Some(20));
        assert_eq!(pool.models["gemini-3-pro-image"].rpd, Some(250));
        let pro = pool.model_quota("gemini-3-pro-image").unwrap();
        assert_eq!(pro.requests.limit, Some(18)); // less 10 % headroom
        let flash = pool.model_quota("gemini-3.1-flash-image").unwrap();
        assert_eq!(flash.requests.limit, Some(90));
        assert_eq!(pro.spend_micros.limit, Some(9_000_000)); // the project's $10, less 10 %
        let chain = &c.chains[0];
        assert_eq!((chain.pool.as_str(), chain.steps.len()), ("team/images", 2));
        assert_eq!(chain.steps[0].max_wait_ms, 20_000);
        // The flash step takes the extreme ratios and 512, spelled "0.5K" or "512".
        let c = compile(&format!("{POOL}{CHAIN}").replace(
            "{model: gemini-3.1-flash-image}",
            "{model: gemini-3.1-flash-image, aspectRatio: \"1:8\", imageSize: \"0.5K\"}",
        ))
        .unwrap();
        let step = &c.chains[0].steps[1];
        assert_eq!(step.aspect_ratio.as_deref(), Some("1:8"));
        assert_eq!(step.image_size, Some(ImageSize::Half));
    }

    /// Issue 13: a pool names its own key variable and endpoint; a key pasted where the
    /// variable's name goes, or an endpoint that is not a URL, is refused by field.
    #[test]
    fn a_pool_s_own_key_variable_and_endpoint() {
        let own = POOL.replace(
            "  tier: Tier1\n",
            "  tier: Tier1\n  apiKeyEnv: GEMINI_KEY_PROJECT_A\n  baseUrl: https://proxy.example/\n",
        );
        let pool = &compile(&own).unwrap().pools[0];
        assert_eq!(pool.api_key_env.as_deref(), Some("GEMINI_KEY_PROJECT_A"));
        assert_eq!(pool.base_url.as_deref(), Some("https://proxy.example"));
        let e = compile(&own.replace("GEMINI_KEY_PROJECT_A", "AIzaSy-abc.def")).unwrap_err();
        assert_eq!(e.field, "spec.apiKeyEnv");
        let e = compile(&own.replace("https://proxy.example/", "proxy.example")).unwrap_err();
        assert_eq!(e.field, "spec.baseUrl");
    }

    /// Issue 13: a step may ask for the flex tier (half price, answers in minutes), on the
    /// Gemini API only.
    #[test]
    fn a_flex_step_is_compiled_and_refused_off_the_gemini_api() {
        let flex = format!("{POOL}{CHAIN}").replace(
            "{model: gemini-3.1-flash-image}",
            "{model: gemini-3.1-flash-image, serviceTier: flex}",
        );
        let c = compile(&flex).unwrap();
        assert_eq!(
            c.chains[0].steps[1].service_tier,
            Some(models::ServiceTier::Flex)
        );
        assert_eq!(c.chains[0].steps[0].service_tier, None);
        let e = compile(&flex.replace("  tier: Tier1\n", "  provider: openaiCompatible\n"))
            .unwrap_err();
        assert_eq!(e.field, "spec.steps[1].serviceTier");
        assert!(compile(&flex.replace("serviceTier: flex", "serviceTier: cheap")).is_err());
    }

    /// Issue 13: a Vertex AI pool has no AI Studio tier: every rate must be declared, no
    /// spend limit is assumed, and the location defaults to `global`.
    #[test]
    fn a_vertex_pool_declares_its_rates_and_takes_no_tier_defaults() {
        let vertex = POOL
            .replace("  tier: Tier1\n", "  provider: vertex\n")
            .replace("  spendPer10MinutesUsd: 10\n", "");
        let e = compile(&vertex).unwrap_err();
        assert_eq!(e.field, "spec.models[0].rpm");
        assert!(e.problem.contains("Vertex AI"), "{e}");
        let declared = vertex.replace(
            "    - name: gemini-3-pro-image\n",
            "    - name: gemini-3-pro-image\n      rpm: 30\n",
        );
        let pool = &compile(&declared).unwrap().pools[0];
        assert_eq!(pool.models["gemini-3-pro-image"].rpm, Some(30));
        assert_eq!(
            pool.models["gemini-3-pro-image"].rpd, None,
            "no tier default"
        );
        assert_eq!(pool.spend_micros_per_10_minutes, None);
        let settings = pool.vertex.as_ref().expect("vertex settings");
        assert_eq!(settings.location, "global");
        assert_eq!(settings.credentials_file, None);
        let regional = declared.replace(
            "  provider: vertex\n",
            "  provider: vertex\n  vertex: {location: us-central1, credentialsFile: /var/run/sa/key.json}\n",
        );
        let pool = &compile(&regional).unwrap().pools[0];
        let settings = pool.vertex.as_ref().expect("vertex settings");
        assert_eq!(settings.location, "us-central1");
        assert_eq!(
            settings.credentials_file.as_deref(),
            Some("/var/run/sa/key.json")
        );
        // Vertex settings on a Gemini API pool are a mistake, said by field.
        let e = compile(&POOL.replace(
            "  tier: Tier1\n",
            "  tier: Tier1\n  vertex: {location: global}\n",
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.vertex");
    }

    #[test]
    fn errors_name_the_field() {
        let e = compile(&POOL.replace("rpm: 100", "rpm: 100\n      rpmm: 5")).unwrap_err();
        assert_eq!(e.field, "spec.models[1].rpmm");
        let e = compile(&POOL.replace("gemini-3.1-flash-image", "gemini-3-pro-image")).unwrap_err();
        assert_eq!(e.field, "spec.models[1].name");
        let e = compile(&POOL.replace("headroomPercent: 10", "headroomPercent: 95")).unwrap_err();
        assert_eq!(e.field, "spec.headroomPercent");
        let e = compile(&format!(
            "{POOL}{}",
            CHAIN.replace("model: gemini-3.1-flash-image", "model: dall-e")
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.steps[1].model");
        assert!(e.problem.contains("not declared"), "{e}");
        let e = compile(CHAIN).unwrap_err();
        assert_eq!(e.field, "spec.pool");
        let e = compile(&format!("{POOL}{CHAIN}").replace(
            "maxWaitSeconds: 20}",
            "maxWaitSeconds: 20, aspectRatio: \"1:8\"}",
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.steps[0].aspectRatio");
        assert!(e.problem.contains("\"21:9\""), "{e}");
        let e = compile(&format!("{POOL}{CHAIN}").replace(
            "maxWaitSeconds: 20}",
            "maxWaitSeconds: 20, imageSize: \"0.5K\"}",
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.steps[0].imageSize");
        assert!(e.problem.contains("[\"1K\", \"2K\", \"4K\"]"), "{e}");
        let e = compile(&POOL.replace("kind: QuotaPool", "kind: Pool")).unwrap_err();
        assert_eq!(e.field, "kind");
    }

    const UNKNOWN: &str = r#"
apiVersion: pacer.dev/v1alpha1
kind: QuotaPool
metadata: {name: gateway, namespace: team}
spec:
  project: other-project
  models:
    - name: gemini-3-pro-image
    - name: imagen-5
      rpm: 30
      priceUsdPerImage: 0.04
"#;

    #[test]
    fn a_model_outside_the_table_needs_limits_and_a_price() {
        let c = compile(UNKNOWN).unwrap();
        let pool = &c.pools[0];
        assert_eq!(pool.models["imagen-5"].rpm, Some(30));
        assert_eq!(pool.image_price_micros("imagen-5", None), Some(40_000));
        assert_eq!(
            pool.image_price_micros("imagen-5", Some(ImageSize::K4)),
            Some(40_000)
        );
        // Known models keep the table's price by size.
        assert_eq!(
            pool.image_price_micros("gemini-3-pro-image", Some(ImageSize::K4)),
            Some(240_000)
        );

        let e = compile(&UNKNOWN.replace("      rpm: 30\n", "")).unwrap_err();
        assert_eq!(e.field, "spec.models[1].rpm");
        assert!(e.problem.contains("built-in model table"), "{e}");
        let e = compile(&UNKNOWN.replace("      priceUsdPerImage: 0.04\n", "")).unwrap_err();
        assert_eq!(e.field, "spec.models[1].priceUsdPerImage");
        assert!(e.problem.contains("set priceUsdPerImage"), "{e}");
        let e = compile(&UNKNOWN.replace("0.04", "-1")).unwrap_err();
        assert_eq!(e.field, "spec.models[1].priceUsdPerImage");
    }

    #[test]
    fn a_price_replaces_the_tables_for_a_known_model() {
        let c =
            compile(&POOL.replace("rpm: 100", "rpm: 100\n      priceUsdPerImage: 0.05")).unwrap();
        let pool = &c.pools[0];
        assert_eq!(
            pool.image_price_micros("gemini-3.1-flash-image", Some(ImageSize::K4)),
            Some(50_000)
        );
    }

    #[test]
    fn every_example_compiles_together() {
        let dir = std::path::Path::new(
            &std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
        )
        .join("examples");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        // Pools first: chains name them.
        files.sort_by_key(|p| !p.file_name().unwrap().to_string_lossy().starts_with("pool"));
        let stream: Vec<String> = files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        let c = compile(&stream.join("\n---\n")).unwrap();
        let gateway = c
            .pools
            .iter()
            .find(|p| p.name == "default/images-gateway")
            .unwrap();
        assert_eq!(
            gateway.image_price_micros("gpt-image-1", None),
            Some(42_000)
        );
        assert!(c.chains.len() >= 2);
    }

    #[test]
    fn tenants_compile_to_shares_and_their_rules_name_the_field() {
        let with = |tenants: &str| POOL.to_owned() + "  tenants:\n" + tenants;
        let c = compile(&with(
            "  - {name: web, weight: 3, floorPercent: 30}\n  - {name: batch, ceilingPercent: 40}\n",
        ))
        .unwrap();
        let t = &c.pools[0].tenants;
        assert_eq!(
            (t[0].weight, t[0].floor_permille, t[0].ceiling_permille),
            (3, 300, 1000)
        );
        assert_eq!(
            (t[1].weight, t[1].floor_permille, t[1].ceiling_permille),
            (1, 0, 400)
        );
        let quota = c.pools[0].model_quota("gemini-3-pro-image").unwrap();
        assert_eq!(quota.tenants, *t, "every model's quota carries the tenants");
        for (tenants, field, says) in [
            (
                "  - {name: a}\n  - {name: a}\n",
                "spec.tenants[1].name",
                "twice",
            ),
            (
                "  - {name: a, weight: 0}\n",
                "spec.tenants[0].weight",
                "1 to 1000",
            ),
            ("  - {name: A}\n", "spec.tenants[0].name", "lowercase"),
            (
                "  - {name: a, floorPercent: 50, ceilingPercent: 40}\n",
                "spec.tenants[0].floorPercent",
                "ceilingPercent 40",
            ),
            (
                "  - {name: a, floorPercent: 60}\n  - {name: b, floorPercent: 50}\n",
                "spec.tenants",
                "adds up to 110",
            ),
        ] {
            let e = compile(&with(tenants)).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.problem.contains(says), "{e}");
        }
    }

    #[test]
    fn two_pools_for_one_project_are_rejected() {
        let second = POOL.replace("name: images", "name: more-images");
        let e = compile(&format!("{POOL}---{second}")).unwrap_err();
        assert_eq!(e.resource, "QuotaPool team/more-images");
        assert_eq!(e.field, "spec.project");
        assert!(e.problem.contains("QuotaPool team/images"), "{e}");

        // Against the pools already configured too; re-applying the same pool is fine.
        let existing: BTreeMap<String, CompiledPool> = compile(POOL)
            .unwrap()
            .pools
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        assert!(compile_documents(POOL, "default", &existing).is_ok());
        let e = compile_documents(&second, "default", &existing).unwrap_err();
        assert!(e.problem.contains("QuotaPool team/images"), "{e}");
    }
}
