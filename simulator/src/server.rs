//! The HTTP surface: Google's routes and answers, `GET /_sim/stats` and `POST /_sim/reset`.
//!
//! Two surfaces share one set of projects and quotas: the Gemini API
//! (`/{v1,v1beta}/models/{model}:{method}`, the project chosen by the API key) and Gemini on
//! Vertex AI (`/{v1,v1beta1}/projects/{project}/locations/{location}/publishers/google/models/{model}:{method}`,
//! the project in the path, an OAuth access token in `Authorization: Bearer`). Access
//! tokens come from `POST /token`, the OAuth token endpoint a service-account key file's
//! `token_uri` can name (a JWT-bearer grant; the assertion's claims are checked, its
//! signature is not), or are given with `--vertex-token`.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use jiff::Timestamp;
use rand::Rng as _;
use serde_json::{Value, json};

use crate::{
    config::{ANY_MODEL, Detail as DetailKind, DetailsOrder, SimConfig},
    image,
    models::{self, ModelSpec},
    quota::{Costs, Exceeded, ModelQuota, ModelStats, ProjectSpend, TicketSeen},
    validate::{self, Parsed, Violation},
    wire::{
        BadRequest, Blob, Candidate, Content, Detail, ErrorInfo, ErrorResponse, FieldViolation,
        GenerateContentResponse, Help, Link, ModalityTokenCount, Part, PredictResponse, Prediction,
        PromptFeedback, ProtoDuration, QuotaDimensions, QuotaFailure, QuotaViolation, RetryInfo,
        Status, UsageMetadata, go_duration,
    },
};

/// The header carrying the limiter booking a Pacer call was made under (one per booking):
/// the simulator counts arrivals with and without it, and repeats within a project.
pub const TICKET_HEADER: &str = "x-pacer-ticket";

const HELP_URL: &str = "https://ai.google.dev/gemini-api/docs/rate-limits";

/// Shared state of one simulator.
pub(crate) struct Sim {
    config: SimConfig,
    models: HashMap<String, ModelSpec>,
    /// key → project.
    keys: HashMap<String, String>,
    quotas: Mutex<HashMap<String, ProjectState>>,
    credits: Mutex<HashMap<String, u64>>,
    /// Vertex access tokens issued by `POST /token` (and those given in the config).
    tokens: Mutex<HashSet<String>>,
    started: Instant,
}

/// Which of Google's APIs a request came through: they share quotas, and differ in
/// routes, credentials and how a spent quota is told.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Surface {
    GeminiApi,
    /// Vertex's shared quota answers a bare 429, naming no quota and no delay.
    Vertex,
}

/// One project's counters: its quota per model, its spend (shared by its models), and
/// every ticket its arrivals carried.
struct ProjectState {
    models: HashMap<String, ModelQuota>,
    spend: ProjectSpend,
    tickets: HashSet<String>,
}

impl Sim {
    fn initial_credits(config: &SimConfig) -> HashMap<String, u64> {
        config
            .credits
            .iter()
            .map(|c| (c.project.clone(), c.micros))
            .collect()
    }
}

impl Sim {
    pub(crate) fn new(config: SimConfig) -> Sim {
        let mut models: HashMap<String, ModelSpec> = models::builtin()
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect();
        for limit in config.limits.iter().filter(|l| l.model != ANY_MODEL) {
            models
                .entry(limit.model.clone())
                .or_insert_with(|| ModelSpec::generic(&limit.model));
        }
        let first = config
            .projects
            .first()
            .cloned()
            .unwrap_or_else(|| "sim-project".to_owned());
        let keys = config
            .keys
            .iter()
            .map(|k| {
                (
                    k.key.clone(),
                    k.project.clone().unwrap_or_else(|| first.clone()),
                )
            })
            .collect();
        let credits = Sim::initial_credits(&config);
        let tokens = config.vertex_tokens.iter().cloned().collect();
        Sim {
            config,
            models,
            keys,
            quotas: Mutex::new(HashMap::new()),
            credits: Mutex::new(credits),
            tokens: Mutex::new(tokens),
            started: Instant::now(),
        }
    }

    fn project_of(&self, key: &str) -> Option<String> {
        if self.config.keys.is_empty() {
            return self
                .config
                .projects
                .first()
                .cloned()
                .or_else(|| Some("sim-project".to_owned()));
        }
        self.keys.get(key).cloned()
    }

    fn with_quota<T>(
        &self,
        project: &str,
        model: &str,
        f: impl FnOnce(&mut ModelQuota, &mut ProjectSpend, &mut HashSet<String>) -> T,
    ) -> T {
        let fixed = self.config.fixed_windows;
        let mut quotas = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        let state = quotas
            .entry(project.to_owned())
            .or_insert_with(|| ProjectState {
                models: HashMap::new(),
                spend: ProjectSpend::new(self.config.project_spend(project), fixed),
                tickets: HashSet::new(),
            });
        let quota = state
            .models
            .entry(model.to_owned())
            .or_insert_with(|| ModelQuota::new(self.config.model_limit(project, model), fixed));
        f(quota, &mut state.spend, &mut state.tickets)
    }

    /// Counts an arrival that is answered without a quota decision (invalid, fault,
    /// spent credit).
    fn count_only(&self, arrival: &Arrival, costs: Costs) {
        self.with_quota(&arrival.project, &arrival.model, |q, spend, seen| {
            q.count_arrival(spend, arrival.at, costs, arrival.ticket_seen(seen));
        });
    }

    /// Forgets every counter, window and ticket, and refills prepaid credits: a fresh
    /// simulator on the same port, for tests that share one.
    pub(crate) fn reset(&self) {
        let mut credits = self.credits.lock().unwrap_or_else(|p| p.into_inner());
        let mut quotas = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        quotas.clear();
        *credits = Sim::initial_credits(&self.config);
    }

    /// Stats as served by `/_sim/stats`: `models` (each model's figures over every
    /// project) and `projects` (each project's figures by model, plus its `spend`: the
    /// window its models share, which each model's `spend` figures also report).
    pub(crate) fn stats(&self) -> Value {
        let quotas = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        let mut projects: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        let mut models: BTreeMap<String, ModelStats> = BTreeMap::new();
        for (project, state) in quotas.iter() {
            let entry = projects.entry(project.clone()).or_default();
            // Models are keyed by name next to it: one named `spend` would hide it.
            entry.insert("spend".to_owned(), json!(state.spend.stats()));
            for (model, q) in &state.models {
                let s = q.stats(&state.spend);
                models
                    .entry(model.clone())
                    .or_insert_with(|| ModelStats {
                        window_s: s.window_s,
                        fixed_windows: s.fixed_windows,
                        limits: s.limits.clone(),
                        ..ModelStats::default()
                    })
                    .merge(&s);
                entry.insert(model.clone(), json!(s));
            }
        }
        json!({
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "models": models,
            "projects": projects,
        })
    }
}

/// Who sent a request, to which model, when, under which ticket.
struct Arrival {
    project: String,
    model: String,
    at: Timestamp,
    ticket: Option<String>,
}

impl Arrival {
    /// Whether the ticket is new to the project; remembers it.
    fn ticket_seen(&self, seen: &mut HashSet<String>) -> TicketSeen {
        match &self.ticket {
            None => TicketSeen::Untagged,
            Some(t) if seen.insert(t.clone()) => TicketSeen::Fresh,
            Some(_) => TicketSeen::Duplicate,
        }
    }
}

/// Builds the router.
pub(crate) fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/{version}/models/{action}", post(model_action))
        .route(
            "/{version}/projects/{project}/locations/{location}/publishers/google/models/{action}",
            post(vertex_action),
        )
        .route("/token", post(issue_token))
        .route("/_sim/stats", get(stats))
        .route("/_sim/reset", post(reset))
        .with_state(sim)
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    axum::Json(sim.stats()).into_response()
}

async fn reset(State(sim): State<Arc<Sim>>) -> Response {
    sim.reset();
    StatusCode::NO_CONTENT.into_response()
}

fn google_error(
    status: StatusCode,
    google_status: &str,
    message: &str,
    details: Vec<Detail>,
) -> Response {
    // The wire struct keeps Google's field order: code, message, status, details.
    let body = ErrorResponse {
        error: Status {
            code: status.as_u16(),
            message: message.to_owned(),
            status: google_status.to_owned(),
            details,
        },
    };
    json_response(status, &body)
}

fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        )],
        bytes,
    )
        .into_response()
}

fn bad_request(v: &Violation) -> Response {
    google_error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        &v.message,
        vec![Detail::BadRequest(BadRequest {
            field_violations: vec![FieldViolation {
                field: v.field.clone(),
                description: v.message.clone(),
            }],
        })],
    )
}

fn not_found(version: &str, model: &str, method: &str) -> Response {
    google_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        &format!(
            "models/{model} is not found for API version {version}, or is not supported for {method}. Call ListModels to see the list of available models and their supported methods."
        ),
        Vec::new(),
    )
}

/// The 429 Google sends when quotas are exceeded: one violation per exceeded dimension.
fn quota_exceeded(sim: &Sim, model: &str, exceeded: &[Exceeded]) -> Response {
    let retry_in = exceeded
        .iter()
        .map(|e| e.retry_in)
        .max()
        .unwrap_or(Duration::from_secs(1));
    let mut message = "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, head to: https://ai.dev/usage?tab=rate-limit. ".to_owned();
    let mut violations = Vec::new();
    for e in exceeded {
        // A limit of 0 is how Google answers a free-tier project on an image model.
        let free_tier = e.limit == 0;
        message.push_str(&format!(
            "\n* Quota exceeded for metric: {}, limit: {}, model: {model}",
            e.dim.quota_metric(free_tier),
            e.limit
        ));
        violations.push(QuotaViolation {
            quota_metric: e.dim.quota_metric(free_tier).to_owned(),
            quota_id: e.dim.quota_id(free_tier).to_owned(),
            quota_dimensions: QuotaDimensions {
                location: "global".to_owned(),
                model: model.to_owned(),
            },
            // Google leaves quotaValue out when the limit is 0.
            quota_value: (e.limit > 0).then(|| e.limit.to_string()),
        });
    }
    message.push_str(&format!("\nPlease retry in {}.", go_duration(retry_in)));
    let help = Detail::Help(Help {
        links: vec![Link {
            description: "Learn more about Gemini API quotas".to_owned(),
            url: HELP_URL.to_owned(),
        }],
    });
    let quota = Detail::QuotaFailure(QuotaFailure { violations });
    // RetryInfo carries whole seconds (truncated), the message the precise delay.
    let retry = Detail::RetryInfo(RetryInfo {
        retry_delay: ProtoDuration(Duration::from_secs(retry_in.as_secs())),
    });
    let mut details = vec![
        (DetailKind::Help, help),
        (DetailKind::QuotaFailure, quota),
        (DetailKind::RetryInfo, retry),
    ];
    match &sim.config.details_order {
        DetailsOrder::Random => {
            let mut rng = rand::rng();
            for i in (1..details.len()).rev() {
                let j = rng.random_range(0..=i);
                details.swap(i, j);
            }
        }
        DetailsOrder::Fixed(order) => {
            details.sort_by_key(|(d, _)| order.iter().position(|o| o == d).unwrap_or(usize::MAX));
        }
    }
    google_error(
        StatusCode::TOO_MANY_REQUESTS,
        "RESOURCE_EXHAUSTED",
        &message,
        details.into_iter().map(|(_, v)| v).collect(),
    )
}

fn api_key(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query.get("key").cloned())
        .filter(|k| !k.is_empty())
}

fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn prompt_tokens(prompt: &str) -> u64 {
    (prompt.chars().count() as u64).div_ceil(4).max(1)
}

/// Which fault, if any, this request draws.
fn draw_fault(sim: &Sim) -> Option<&'static str> {
    let f = &sim.config.faults;
    if f.overload_burst
        .is_some_and(|s| s.active(sim.started.elapsed()))
    {
        return Some("overload_burst");
    }
    let mut rng = rand::rng();
    let mut roll = |p: f64| p > 0.0 && rng.random::<f64>() < p;
    if roll(f.ghost_429) {
        Some("ghost_429")
    } else if roll(f.overload) {
        Some("overload")
    } else if roll(f.server_error) {
        Some("server_error")
    } else if roll(f.gateway_timeout) {
        Some("gateway_timeout")
    } else {
        None
    }
}

fn fault_response(kind: &str) -> Response {
    match kind {
        "ghost_429" => google_error(
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
            Vec::new(),
        ),
        "overload" | "overload_burst" => google_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            Vec::new(),
        ),
        "gateway_timeout" => google_error(
            StatusCode::GATEWAY_TIMEOUT,
            "DEADLINE_EXCEEDED",
            "The request timed out. Please try again.",
            Vec::new(),
        ),
        _ => google_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
            Vec::new(),
        ),
    }
}

fn latency(sim: &Sim) -> Duration {
    let c = &sim.config;
    let mut rng = rand::rng();
    let mut d = c.latency;
    if !c.latency_jitter.is_zero() {
        d += c.latency_jitter.mul_f64(rng.random::<f64>());
    }
    if c.faults.slow > 0.0 && rng.random::<f64>() < c.faults.slow {
        d += Duration::from_millis(c.faults.slow_ms);
    }
    d
}

/// A 200 whose body breaks off: the client sees the connection fail mid-answer.
fn reset_response() -> Response {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"candidates\": [{\"content\": {\"parts\": [{\"inlineData\": {\"mimeType\": \"image/png\", \"data\": \"iVBOR")),
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "simulated connection reset")),
    ];
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        )],
        Body::from_stream(futures::stream::iter(chunks)),
    )
        .into_response()
}

/// How the answer is framed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Json,
    /// `streamGenerateContent`: a JSON array of chunks.
    Array,
    /// `streamGenerateContent?alt=sse`.
    Sse,
    /// Imagen `:predict`.
    Predict,
}

/// The Gemini API: the project is the one the API key belongs to.
async fn model_action(
    State(sim): State<Arc<Sim>>,
    Path((version, action)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Counted on arrival, on the server's clock.
    let arrival = Timestamp::now();
    let (model, method) = action.split_once(':').unwrap_or((action.as_str(), ""));
    if version != "v1" && version != "v1beta" {
        return unknown_version();
    }
    let Some(framing) = framing_of(method, &query) else {
        return not_found(&version, model, method);
    };
    let Some(key) = api_key(&headers, &query) else {
        return google_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            Vec::new(),
        );
    };
    let Some(project) = sim.project_of(&key) else {
        return google_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            vec![Detail::ErrorInfo(ErrorInfo {
                reason: "API_KEY_INVALID".to_owned(),
                domain: "googleapis.com".to_owned(),
                metadata: BTreeMap::from([(
                    "service".to_owned(),
                    "generativelanguage.googleapis.com".to_owned(),
                )]),
            })],
        );
    };
    let call = Call {
        surface: Surface::GeminiApi,
        project,
        model,
        framing,
        arrival,
    };
    let Some(spec) = sim.model_spec(&call) else {
        return not_found(&version, model, method);
    };
    generate(&sim, call, spec, &headers, &body).await
}

/// Gemini on Vertex AI: the project is in the path; the caller proves itself with an
/// access token, never an API key.
async fn vertex_action(
    State(sim): State<Arc<Sim>>,
    Path((version, project, location, action)): Path<(String, String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrival = Timestamp::now();
    let (model, method) = action.split_once(':').unwrap_or((action.as_str(), ""));
    let resource =
        format!("projects/{project}/locations/{location}/publishers/google/models/{model}");
    let vertex_not_found = || {
        google_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!(
                "Publisher Model `{resource}` was not found or your project does not have access to it. Please ensure you are using a valid model version."
            ),
            Vec::new(),
        )
    };
    if version != "v1" && version != "v1beta1" {
        return unknown_version();
    }
    let Some(framing) = framing_of(method, &query) else {
        return vertex_not_found();
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let known = token.is_some_and(|t| {
        sim.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(t)
    });
    if !known {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            Vec::new(),
        );
    }
    if !sim.config.projects.contains(&project) {
        return google_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            &format!(
                "Permission 'aiplatform.endpoints.predict' denied on resource '//aiplatform.googleapis.com/{resource}' (or it may not exist)."
            ),
            Vec::new(),
        );
    }
    let call = Call {
        surface: Surface::Vertex,
        project,
        model,
        framing,
        arrival,
    };
    let Some(spec) = sim.model_spec(&call) else {
        return vertex_not_found();
    };
    generate(&sim, call, spec, &headers, &body).await
}

/// One call that reached a model, on either surface.
struct Call<'a> {
    surface: Surface,
    project: String,
    model: &'a str,
    framing: Framing,
    arrival: Timestamp,
}

impl Sim {
    /// The model a call names, if it is served (not retired) for the call's framing.
    fn model_spec(&self, call: &Call<'_>) -> Option<&ModelSpec> {
        let today = call
            .arrival
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .date();
        self.models.get(call.model).filter(|m| {
            m.predict == (call.framing == Framing::Predict)
                && !m.is_retired(today)
                && !self.config.retired.iter().any(|r| r == call.model)
        })
    }
}

/// Google's answer to a path under an API version it does not serve.
fn unknown_version() -> Response {
    google_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "Requested entity was not found.",
        Vec::new(),
    )
}

fn framing_of(method: &str, query: &HashMap<String, String>) -> Option<Framing> {
    Some(match method {
        "generateContent" => Framing::Json,
        "streamGenerateContent" if query.get("alt").map(String::as_str) == Some("sse") => {
            Framing::Sse
        }
        "streamGenerateContent" => Framing::Array,
        "predict" => Framing::Predict,
        _ => return None,
    })
}

/// Counts, decides and answers a call that reached a model.
async fn generate(
    sim: &Sim,
    call: Call<'_>,
    spec: &ModelSpec,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let Call {
        surface,
        project,
        model,
        framing,
        arrival,
    } = call;
    // From here on the request reached the model: it counts as an arrival, whatever the
    // answer, before any decision about it.
    let arrival = Arrival {
        project,
        model: model.to_owned(),
        at: arrival,
        ticket: headers
            .get(TICKET_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
    };
    let parsed = if framing == Framing::Predict {
        predict_request(body)
    } else {
        validate::generate_content(body, spec)
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(v) => {
            // Google charges no tokens, images or spend for a request it refuses to parse.
            sim.count_only(&arrival, Costs::default());
            return bad_request(&v);
        }
    };
    let (image_tokens, price) = spec.cost(parsed.image_size.as_deref()).unwrap_or((0, 0));
    // Flex is billed at half the standard rates.
    let tier_price = |micros: u64| if parsed.flex { micros / 2 } else { micros };
    let tokens = prompt_tokens(&parsed.prompt);
    let caption_tokens = if parsed.text_too {
        prompt_tokens(&caption(&parsed.prompt))
    } else {
        0
    };
    // Billed as Google bills it: the answer's tokens at the model's rates.
    let costs = Costs {
        input_tokens: tokens,
        images: 1,
        spend_micros: tier_price(spec.spend_micros(tokens, caption_tokens, image_tokens, price)),
    };
    if let Some(kind) = draw_fault(sim) {
        sim.with_quota(&arrival.project, model, |q, spend, seen| {
            q.count_arrival(spend, arrival.at, costs, arrival.ticket_seen(seen));
            q.fault(kind);
        });
        return fault_response(kind);
    }
    // Credit and quota are decided under one lock each, in a fixed order (credits, then
    // quotas), so concurrent requests cannot overspend a prepaid balance.
    {
        let mut credits = sim.credits.lock().unwrap_or_else(|p| p.into_inner());
        // Prepaid credit is the Gemini API's (Vertex bills a Cloud billing account).
        let left = credits
            .get_mut(&arrival.project)
            .filter(|_| surface == Surface::GeminiApi);
        if left
            .as_deref()
            .is_some_and(|left| *left < tier_price(price).max(1))
        {
            sim.count_only(&arrival, costs);
            // Google's words for it (reported on 402s, and in 2026 on 429s too); the
            // status name of the 402 is assumed.
            return google_error(
                StatusCode::PAYMENT_REQUIRED,
                "FAILED_PRECONDITION",
                "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to manage your project and billing.",
                Vec::new(),
            );
        }
        let decided = sim.with_quota(&arrival.project, model, |q, spend, seen| {
            q.arrive(spend, arrival.at, costs, arrival.ticket_seen(seen))
        });
        if let Err(exceeded) = decided {
            return match surface {
                Surface::GeminiApi => quota_exceeded(sim, model, &exceeded),
                Surface::Vertex => vertex_exhausted(),
            };
        }
        if let Some(left) = left {
            *left = left.saturating_sub(tier_price(price));
        }
    }
    let wait = latency(sim);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let reset = {
        let p = sim.config.faults.reset;
        p > 0.0 && rand::rng().random::<f64>() < p
    };
    if reset {
        sim.with_quota(&arrival.project, model, |q, _, _| q.fault("reset"));
        return reset_response();
    }
    let answer = answer(
        sim,
        spec,
        &parsed,
        tokens,
        image_tokens,
        framing == Framing::Predict,
    );
    match framing {
        Framing::Json | Framing::Predict => json_response(StatusCode::OK, &answer),
        Framing::Array => json_response(StatusCode::OK, &Value::Array(vec![answer])),
        Framing::Sse => {
            let text = format!(
                "data: {}\r\n\r\n",
                serde_json::to_string(&answer).unwrap_or_default()
            );
            (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                )],
                text,
            )
                .into_response()
        }
    }
}

/// Vertex's answer to a spent shared quota: a bare 429 that names no quota and no delay.
fn vertex_exhausted() -> Response {
    google_error(
        StatusCode::TOO_MANY_REQUESTS,
        "RESOURCE_EXHAUSTED",
        "Resource exhausted. Please try again later. Please refer to https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details.",
        Vec::new(),
    )
}

/// The OAuth token endpoint: a JWT-bearer grant from a service account gets an access
/// token the Vertex routes accept. The assertion's claims are checked as Google's endpoint
/// checks them (issuer, a scope, not expired); its signature is not (the simulator holds no
/// public keys).
async fn issue_token(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let refuse = |why: &str| {
        json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_grant", "error_description": why}),
        )
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}),
        );
    }
    let Some(claims) = form
        .get("assertion")
        .and_then(|jwt| jwt.split('.').nth(1))
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
    else {
        return refuse("Invalid JWT: could not decode the assertion.");
    };
    let named = |claim: &str| {
        claims
            .get(claim)
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty())
    };
    if !named("iss") {
        return refuse("Invalid JWT: no issuer (iss).");
    }
    if !named("scope") {
        return refuse("Invalid OAuth scope or ID token audience provided.");
    }
    let now = Timestamp::now().as_second();
    if claims
        .get("exp")
        .and_then(Value::as_i64)
        .is_none_or(|exp| exp <= now)
    {
        return refuse(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
        );
    }
    let token = format!("ya29.sim-{}", random_id());
    sim.tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(token.clone());
    json_response(
        StatusCode::OK,
        &json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}),
    )
}

fn predict_request(body: &[u8]) -> Result<Parsed, Violation> {
    let v: Value = serde_json::from_slice(body).map_err(|e| Violation {
        field: String::new(),
        message: format!("Invalid JSON payload received. {e}"),
    })?;
    let prompt = v
        .pointer("/instances/0/prompt")
        .and_then(Value::as_str)
        .ok_or_else(|| Violation {
            field: "instances[0].prompt".to_owned(),
            message: "* PredictRequest.instances[0].prompt: a prompt is required\n".to_owned(),
        })?;
    Ok(Parsed {
        prompt: prompt.to_owned(),
        text_too: false,
        aspect_ratio: v
            .pointer("/parameters/aspectRatio")
            .and_then(Value::as_str)
            .map(str::to_owned),
        image_size: None,
        flex: false,
    })
}

/// A success, or the block a configured rule asks for.
fn answer(
    sim: &Sim,
    spec: &ModelSpec,
    parsed: &Parsed,
    tokens: u64,
    image_tokens: u64,
    predict: bool,
) -> Value {
    let lower = parsed.prompt.to_lowercase();
    let block = sim
        .config
        .blocks
        .iter()
        .find(|b| lower.contains(&b.pattern));
    let png = || {
        base64::engine::general_purpose::STANDARD.encode(image::render(
            &parsed.prompt,
            parsed.aspect_ratio.as_deref(),
        ))
    };
    if predict {
        let resp = PredictResponse {
            predictions: vec![Prediction {
                bytes_base64_encoded: png(),
                mime_type: "image/png".to_owned(),
            }],
        };
        return serde_json::to_value(&resp).unwrap_or(Value::Null);
    }
    let prompt_details = vec![ModalityTokenCount {
        modality: "TEXT",
        token_count: tokens,
    }];
    // A blocked answer bills the prompt only.
    let prompt_only = UsageMetadata {
        prompt_token_count: tokens,
        total_token_count: tokens,
        prompt_tokens_details: prompt_details.clone(),
        ..UsageMetadata::default()
    };
    let mut resp = GenerateContentResponse {
        model_version: Some(spec.name.clone()),
        response_id: Some(random_id()),
        ..GenerateContentResponse::default()
    };
    match block {
        Some(rule) if rule.is_prompt_block() => {
            resp.prompt_feedback = Some(PromptFeedback {
                block_reason: rule.reason.clone(),
            });
            resp.usage_metadata = Some(prompt_only);
        }
        Some(rule) => {
            resp.candidates = vec![Candidate {
                content: Content {
                    parts: Vec::new(),
                    role: Some("model".to_owned()),
                },
                finish_reason: Some(rule.reason.clone()),
                index: 0,
            }];
            resp.usage_metadata = Some(prompt_only);
        }
        None => {
            let mut parts = Vec::new();
            let mut candidate_details = Vec::new();
            let mut text_tokens = 0;
            if parsed.text_too {
                let caption = caption(&parsed.prompt);
                text_tokens = prompt_tokens(&caption);
                parts.push(Part {
                    text: Some(caption),
                    ..Part::default()
                });
                candidate_details.push(ModalityTokenCount {
                    modality: "TEXT",
                    token_count: text_tokens,
                });
            }
            parts.push(Part {
                inline_data: Some(Blob {
                    mime_type: "image/png".to_owned(),
                    data: png(),
                }),
                ..Part::default()
            });
            candidate_details.push(ModalityTokenCount {
                modality: "IMAGE",
                token_count: image_tokens,
            });
            let candidates = text_tokens + image_tokens;
            let thoughts = spec.thought_tokens;
            resp.candidates = vec![Candidate {
                content: Content {
                    parts,
                    role: Some("model".to_owned()),
                },
                finish_reason: Some("STOP".to_owned()),
                index: 0,
            }];
            resp.usage_metadata = Some(UsageMetadata {
                prompt_token_count: tokens,
                candidates_token_count: Some(candidates),
                total_token_count: tokens + candidates + thoughts,
                prompt_tokens_details: prompt_details,
                candidates_tokens_details: candidate_details,
                thoughts_token_count: (thoughts > 0).then_some(thoughts),
            });
        }
    }
    serde_json::to_value(&resp).unwrap_or(Value::Null)
}

/// The words an answer asked for text and image carries with its image.
fn caption(prompt: &str) -> String {
    format!(
        "Here is the image: {}",
        prompt.chars().take(60).collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Simulator, config::KeySpec};

    const PRO: &str = "gemini-3-pro-image";
    const FLASH: &str = "gemini-3.1-flash-image";

    fn config(limits: &[String]) -> SimConfig {
        SimConfig {
            projects: vec!["acme".into(), "other".into()],
            keys: ["acme=k-acme", "other=k-other"]
                .iter()
                .map(|k| k.parse::<KeySpec>().expect("key"))
                .collect(),
            limits: limits.iter().map(|l| l.parse().expect("limit")).collect(),
            ..SimConfig::default()
        }
    }

    /// Sends one image request; returns the status and the body.
    async fn call(url: &str, key: &str, model: &str) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1beta/models/{model}:generateContent"))
            .header("x-goog-api-key", key)
            .body(r#"{"contents":[{"parts":[{"text":"a lighthouse"}]}]}"#)
            .send()
            .await
            .expect("sent");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// What one request to `model` spends, read from an unlimited simulator's stats.
    async fn spend_of(model: &str) -> u64 {
        let sim = Simulator::new(config(&[])).spawn().await.expect("binds");
        assert_eq!(call(&sim.url(), "k-acme", model).await.0, 200);
        sim.stats()["projects"]["acme"]["spend"]["max_in_any_window"]
            .as_u64()
            .filter(|&s| s > 0)
            .expect("a spend")
    }

    /// Google's spend quota is the project's: a spec for one model limits the spend of
    /// all the project's models together, and only that project's.
    #[tokio::test]
    async fn a_project_spends_its_limit_once_across_its_models() {
        let (pro, flash) = (spend_of(PRO).await, spend_of(FLASH).await);
        // Room for a Pro and half a Flash: a Flash alone fits, but not after the Pro.
        let limit = pro + flash / 2;
        let sim = Simulator::new(config(&[format!("acme/{PRO}:spend={limit}")]))
            .spawn()
            .await
            .expect("binds");
        let url = sim.url();
        assert_eq!(call(&url, "k-acme", PRO).await.0, 200);
        let (status, body) = call(&url, "k-acme", FLASH).await;
        assert_eq!(status, 429, "{body}");
        let violations = body["error"]["details"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d.get("violations").is_some()))
            .map(|d| d["violations"].clone())
            .expect("a QuotaFailure");
        assert_eq!(
            violations,
            json!([{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_spend",
                "quotaId": "GenerateContentSpendPer10MinutesPerProject",
                "quotaDimensions": {"location": "global", "model": FLASH},
                "quotaValue": limit.to_string(),
            }])
        );
        // Another project's models count on their own (and no spec limits its spend).
        assert_eq!(call(&url, "k-other", FLASH).await.0, 200);
        assert_eq!(call(&url, "k-other", FLASH).await.0, 200);

        let stats = sim.stats();
        let acme = &stats["projects"]["acme"];
        assert_eq!(
            acme["spend"],
            json!({
                "limit": limit,
                "window_s": 600.0,
                "max_in_any_window": pro,
                "max_arrivals_in_any_window": pro + flash,
            }),
            "{stats}"
        );
        for model in [PRO, FLASH] {
            let m = &acme[model];
            assert_eq!(m["max_in_any_window"]["spend"], pro, "{model}: {m}");
            assert_eq!(m["max_arrivals_in_any_window"]["spend"], pro + flash);
            assert_eq!(m["limits"]["spend"], limit);
        }
        assert_eq!(acme[FLASH]["rejected"]["spend"], 1);
        let other = &stats["projects"]["other"];
        assert_eq!(other["spend"]["limit"], Value::Null);
        assert_eq!(other["spend"]["max_in_any_window"], 2 * flash);
        assert_eq!(other[FLASH]["max_in_any_window"]["spend"], 2 * flash);
        // A model's figures over every project keep the largest project's (acme's Flash
        // reports acme's spend, the Pro's).
        assert_eq!(
            stats["models"][FLASH]["max_in_any_window"]["spend"],
            pro.max(2 * flash)
        );
    }
}
