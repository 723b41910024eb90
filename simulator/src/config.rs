//! The simulator's configuration: projects and their keys, quotas per model, faults.
//! Strings in the `pacer simulate` flag syntax parse with `FromStr`.
use std::{str::FromStr, time::Duration};

/// Configuration errors (bad flag values).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("bad limit {0:?}: {1}")]
    Limit(String, String),
    #[error("bad key {0:?}: expected KEY or PROJECT=KEY")]
    Key(String),
    #[error("bad block rule {0:?}: expected PATTERN or PATTERN=REASON")]
    Block(String),
    #[error("bad credit {0:?}: expected PROJECT=MICRODOLLARS")]
    Credit(String),
    #[error("bad schedule {0:?}: expected EVERY_SECONDS:FOR_SECONDS")]
    Schedule(String),
    #[error("bad details order {0:?}: expected `random` or a permutation of help,quota,retry")]
    DetailsOrder(String),
}

/// The `MODEL` of a spec that sets a project's spend and nothing else (`[PROJECT/]*:spend=N`).
pub const ANY_MODEL: &str = "*";

/// One project's quota for one model. `None` is unlimited; `Some(0)` is Google's
/// "limit: 0" (a free-tier project on an image model).
///
/// Spend is the exception: Google counts it per project, across the project's models, so
/// `spend` and `spend_window` set the project's one spend window
/// ([`SimConfig::project_spend`] says which spec wins).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitSpec {
    /// `None`: applies to every project (each project counts on its own).
    pub project: Option<String>,
    /// A model name, or [`ANY_MODEL`] for a spec that sets only the project's spend.
    pub model: String,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub ipm: Option<u64>,
    pub rpd: Option<u64>,
    /// Spend per `spend_window`, in micro-dollars.
    pub spend: Option<u64>,
    /// The window of the per-minute dimensions (60 s; shorten it to rehearse quickly).
    pub window: Duration,
    pub spend_window: Duration,
    /// Rehearsal days for `rpd`: this long, from multiples of it since the Unix epoch
    /// (`None`: Pacific days, as Google counts). Replicas take the same length from
    /// `PACER_DAY_SECONDS`.
    pub day: Option<Duration>,
}

impl LimitSpec {
    pub fn new(model: impl Into<String>) -> LimitSpec {
        LimitSpec {
            project: None,
            model: model.into(),
            rpm: None,
            tpm: None,
            ipm: None,
            rpd: None,
            spend: None,
            window: Duration::from_secs(60),
            spend_window: Duration::from_secs(600),
            day: None,
        }
    }

    fn spend_limit(&self) -> SpendLimit {
        SpendLimit {
            micros: self.spend,
            window: self.spend_window,
        }
    }
}

/// A project's spend quota: micro-dollars per `window`, shared by all its models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendLimit {
    /// `None`: unlimited (still measured).
    pub micros: Option<u64>,
    pub window: Duration,
}

impl Default for SpendLimit {
    fn default() -> SpendLimit {
        SpendLimit {
            micros: None,
            window: Duration::from_secs(600),
        }
    }
}

fn parse_secs(s: &str) -> Option<Duration> {
    let v: f64 = s.trim().trim_end_matches('s').parse().ok()?;
    if v > 0.0 {
        Duration::try_from_secs_f64(v).ok()
    } else {
        None
    }
}

const ANY_MODEL_FIELDS: &str = "MODEL `*` sets a project's spend: spend=MICROS[,spend_window=S]";

/// `[PROJECT/]MODEL:rpm=N,tpm=N,ipm=N,rpd=N,spend=MICROS[,window=S][,spend_window=S][,day=S]`,
/// or `[PROJECT/]*:spend=MICROS[,spend_window=S]` for the project's spend alone.
impl FromStr for LimitSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<LimitSpec, ConfigError> {
        let bad = |why: &str| ConfigError::Limit(s.to_owned(), why.to_owned());
        let (target, fields) = s
            .split_once(':')
            .ok_or_else(|| bad("expected MODEL:key=value,..."))?;
        let (project, model) = match target.split_once('/') {
            Some((p, m)) => (Some(p.trim().to_owned()), m.trim()),
            None => (None, target.trim()),
        };
        if model.is_empty() {
            return Err(bad("empty model"));
        }
        let mut spec = LimitSpec::new(model);
        spec.project = project;
        for field in fields.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            let n = || {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| bad("expected a whole number"))
            };
            if spec.model == ANY_MODEL && !matches!(k.trim(), "spend" | "spend_window") {
                return Err(bad(ANY_MODEL_FIELDS));
            }
            match k.trim() {
                "rpm" => spec.rpm = Some(n()?),
                "tpm" => spec.tpm = Some(n()?),
                "ipm" => spec.ipm = Some(n()?),
                "rpd" => spec.rpd = Some(n()?),
                "spend" => spec.spend = Some(n()?),
                "window" => {
                    spec.window = parse_secs(v).ok_or_else(|| bad("window: seconds > 0"))?
                }
                "spend_window" => {
                    spec.spend_window =
                        parse_secs(v).ok_or_else(|| bad("spend_window: seconds > 0"))?
                }
                "day" => spec.day = Some(parse_secs(v).ok_or_else(|| bad("day: seconds > 0"))?),
                other => return Err(bad(&format!("unknown dimension {other:?}"))),
            }
        }
        if spec.model == ANY_MODEL && spec.spend.is_none() {
            return Err(bad(ANY_MODEL_FIELDS));
        }
        Ok(spec)
    }
}

/// An API key and the project it belongs to (several keys may share a project's quota).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// `None`: the first project.
    pub project: Option<String>,
    pub key: String,
}

impl FromStr for KeySpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<KeySpec, ConfigError> {
        let (project, key) = match s.split_once('=') {
            Some((p, k)) => (Some(p.trim().to_owned()), k.trim()),
            None => (None, s.trim()),
        };
        if key.is_empty() || project.as_deref() == Some("") {
            return Err(ConfigError::Key(s.to_owned()));
        }
        Ok(KeySpec {
            project,
            key: key.to_owned(),
        })
    }
}

/// Prompts containing `pattern` (case-insensitive) are blocked with `reason`: a
/// `promptFeedback.blockReason` (`SAFETY`, `PROHIBITED_CONTENT`, `BLOCKLIST`, `OTHER`) or a
/// candidate `finishReason` (`IMAGE_SAFETY`, `NO_IMAGE`, `IMAGE_RECITATION`,
/// `IMAGE_PROHIBITED_CONTENT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRule {
    pub pattern: String,
    pub reason: String,
}

impl BlockRule {
    /// Whether the reason is reported in `promptFeedback` (no candidates) rather than as
    /// a finish reason.
    pub fn is_prompt_block(&self) -> bool {
        matches!(
            self.reason.as_str(),
            "SAFETY" | "PROHIBITED_CONTENT" | "BLOCKLIST" | "OTHER" | "IMAGE_SAFETY_PROMPT"
        )
    }
}

impl FromStr for BlockRule {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<BlockRule, ConfigError> {
        let (pattern, reason) = s.rsplit_once('=').unwrap_or((s, "IMAGE_SAFETY"));
        const REASONS: &[&str] = &[
            "SAFETY",
            "PROHIBITED_CONTENT",
            "BLOCKLIST",
            "OTHER",
            "IMAGE_SAFETY",
            "NO_IMAGE",
            "IMAGE_RECITATION",
            "IMAGE_PROHIBITED_CONTENT",
        ];
        if pattern.is_empty() || !REASONS.contains(&reason) {
            return Err(ConfigError::Block(s.to_owned()));
        }
        Ok(BlockRule {
            pattern: pattern.to_lowercase(),
            reason: reason.to_owned(),
        })
    }
}

/// A prepaid credit balance: once spent, the project's requests get 402.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditSpec {
    pub project: String,
    pub micros: u64,
}

impl FromStr for CreditSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<CreditSpec, ConfigError> {
        let (p, m) = s
            .split_once('=')
            .ok_or_else(|| ConfigError::Credit(s.to_owned()))?;
        Ok(CreditSpec {
            project: p.trim().to_owned(),
            micros: m
                .trim()
                .parse()
                .map_err(|_| ConfigError::Credit(s.to_owned()))?,
        })
    }
}

/// A recurring burst: active for `length` at the start of every `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub every: Duration,
    pub length: Duration,
}

impl Schedule {
    pub fn active(&self, since_start: Duration) -> bool {
        let every = self.every.as_micros().max(1);
        since_start.as_micros() % every < self.length.as_micros()
    }
}

impl FromStr for Schedule {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Schedule, ConfigError> {
        let bad = || ConfigError::Schedule(s.to_owned());
        let (e, l) = s.split_once(':').ok_or_else(bad)?;
        Ok(Schedule {
            every: parse_secs(e).ok_or_else(bad)?,
            length: parse_secs(l).ok_or_else(bad)?,
        })
    }
}

/// The three details of a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    Help,
    QuotaFailure,
    RetryInfo,
}

/// The order of a 429's details: Google's varies, so clients must look them up by `@type`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DetailsOrder {
    /// A fresh shuffle per answer.
    #[default]
    Random,
    Fixed(Vec<Detail>),
}

impl FromStr for DetailsOrder {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<DetailsOrder, ConfigError> {
        if s.trim() == "random" {
            return Ok(DetailsOrder::Random);
        }
        let mut order = Vec::new();
        for name in s.split(',').map(str::trim) {
            let d = match name {
                "help" => Detail::Help,
                "quota" => Detail::QuotaFailure,
                "retry" => Detail::RetryInfo,
                _ => return Err(ConfigError::DetailsOrder(s.to_owned())),
            };
            if order.contains(&d) {
                return Err(ConfigError::DetailsOrder(s.to_owned()));
            }
            order.push(d);
        }
        if order.len() != 3 {
            return Err(ConfigError::DetailsOrder(s.to_owned()));
        }
        Ok(DetailsOrder::Fixed(order))
    }
}

/// Faults, each a probability per request (0 to 1) or a schedule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Bare 429 (no details), even under quota.
    pub ghost_429: f64,
    /// 503 "The model is overloaded".
    pub overload: f64,
    /// 503 for a while, periodically.
    pub overload_burst: Option<Schedule>,
    /// 500 INTERNAL.
    pub server_error: f64,
    /// 504 DEADLINE_EXCEEDED.
    pub gateway_timeout: f64,
    /// The connection breaks mid-answer, after the request was counted.
    pub reset: f64,
    /// Occasional slow answers: probability and extra delay.
    pub slow: f64,
    pub slow_ms: u64,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Project names; the first takes keys that name none.
    pub projects: Vec<String>,
    /// No keys at all: any non-empty key is accepted and belongs to the first project.
    pub keys: Vec<KeySpec>,
    pub limits: Vec<LimitSpec>,
    /// Count in calendar windows (minute boundaries on the wall clock) instead of a
    /// sliding window.
    pub fixed_windows: bool,
    pub details_order: DetailsOrder,
    /// Base latency of a success, and a uniform jitter added to it.
    pub latency: Duration,
    pub latency_jitter: Duration,
    pub faults: Faults,
    pub blocks: Vec<BlockRule>,
    pub credits: Vec<CreditSpec>,
    /// Models to treat as retired on top of the built-in shutdown dates.
    pub retired: Vec<String>,
    /// Access tokens the Vertex routes accept on top of those `POST /token` issues.
    pub vertex_tokens: Vec<String>,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            projects: vec!["sim-project".to_owned()],
            keys: Vec::new(),
            limits: Vec::new(),
            fixed_windows: false,
            details_order: DetailsOrder::Random,
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            faults: Faults::default(),
            blocks: Vec::new(),
            credits: Vec::new(),
            retired: Vec::new(),
            vertex_tokens: Vec::new(),
        }
    }
}

impl SimConfig {
    /// The spec that sets `model`'s quota in `project`: the project's own, else the one
    /// naming no project.
    pub fn model_limit(&self, project: &str, model: &str) -> Option<&LimitSpec> {
        let named = |l: &&LimitSpec| l.model == model && l.project.as_deref() == Some(project);
        let any = |l: &&LimitSpec| l.model == model && l.project.is_none();
        self.limits
            .iter()
            .find(named)
            .or_else(|| self.limits.iter().find(any))
    }

    /// `project`'s spend quota, one for all its models (Google counts spend per project).
    /// A `*` spec sets it (`PROJECT/*`, else `*`); otherwise the specs that set the
    /// project's models ([`Self::model_limit`], for every model a spec names) do, and if
    /// they disagree the smallest `spend` wins, with its own `spend_window` (on a tie, the
    /// longer window: the stricter). None of them: unlimited, over 600 s.
    pub fn project_spend(&self, project: &str) -> SpendLimit {
        if let Some(any) = self.model_limit(project, ANY_MODEL) {
            return any.spend_limit();
        }
        let mut models: Vec<&str> = self.limits.iter().map(|l| l.model.as_str()).collect();
        models.sort_unstable();
        models.dedup();
        models
            .into_iter()
            .filter_map(|m| self.model_limit(project, m))
            .filter(|l| l.spend.is_some())
            .map(LimitSpec::spend_limit)
            .min_by_key(|s| (s.micros, std::cmp::Reverse(s.window)))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_syntax() {
        let l: LimitSpec = "gemini-3-pro-image:rpm=20,tpm=100000,ipm=20,rpd=250,window=5"
            .parse()
            .expect("parses");
        assert_eq!(
            (l.rpm, l.tpm, l.ipm, l.rpd, l.window),
            (
                Some(20),
                Some(100_000),
                Some(20),
                Some(250),
                Duration::from_secs(5)
            )
        );
        let l: LimitSpec = "acme/m:rpm=0,spend=10000000".parse().expect("parses");
        assert_eq!(
            (l.project.as_deref(), l.rpm, l.spend),
            (Some("acme"), Some(0), Some(10_000_000))
        );
        assert!("m:rpm=x".parse::<LimitSpec>().is_err());
        assert!("m:bogus=1".parse::<LimitSpec>().is_err());
        assert!("nocolon".parse::<LimitSpec>().is_err());
    }

    #[test]
    fn any_model_sets_only_the_spend() {
        let l: LimitSpec = "acme/*:spend=5000,spend_window=60".parse().expect("parses");
        assert_eq!(
            (l.project.as_deref(), l.model.as_str(), l.spend),
            (Some("acme"), ANY_MODEL, Some(5000))
        );
        assert_eq!(l.spend_window, Duration::from_secs(60));
        assert!("*:rpm=1,spend=5".parse::<LimitSpec>().is_err());
        assert!("*:spend_window=60".parse::<LimitSpec>().is_err());
        assert!("*:spend=5,window=5".parse::<LimitSpec>().is_err());
    }

    /// Spend is the project's: its model specs set it (the smallest wins), a `*` spec
    /// overrides them, a project's own spec for a model shadows the unprefixed one.
    #[test]
    fn project_spend_comes_from_the_specs_that_apply() {
        let config = |specs: &[&str]| SimConfig {
            limits: specs.iter().map(|s| s.parse().expect("limit")).collect(),
            ..SimConfig::default()
        };
        let spend = |c: &SimConfig, p: &str| {
            let s = c.project_spend(p);
            (s.micros, s.window.as_secs())
        };
        let c = config(&[
            "a:spend=300,spend_window=60",
            "b:spend=200,spend_window=30",
            "acme/b:rpm=5",
            "acme/c:spend=100,spend_window=120",
        ]);
        assert_eq!(spend(&c, "other"), (Some(200), 30));
        // acme's b spec sets no spend; a's applies, c's is smaller.
        assert_eq!(spend(&c, "acme"), (Some(100), 120));
        let c = config(&["a:spend=300", "*:spend=900,spend_window=60"]);
        assert_eq!(spend(&c, "acme"), (Some(900), 60));
        let c = config(&["*:spend=900", "acme/*:spend=50"]);
        assert_eq!(
            (spend(&c, "acme"), spend(&c, "b")),
            ((Some(50), 600), (Some(900), 600))
        );
        let c = config(&["a:spend=10,spend_window=60", "b:spend=10,spend_window=90"]);
        assert_eq!(
            spend(&c, "p"),
            (Some(10), 90),
            "a tie takes the stricter window"
        );
        assert_eq!(spend(&config(&["a:rpm=1"]), "p"), (None, 600));
    }

    #[test]
    fn other_syntax() {
        assert_eq!(
            "p=k".parse::<KeySpec>().expect("key").project.as_deref(),
            Some("p")
        );
        assert!(
            "cat=SAFETY"
                .parse::<BlockRule>()
                .expect("rule")
                .is_prompt_block()
        );
        assert!("cat=NOPE".parse::<BlockRule>().is_err());
        assert!("help,retry,quota".parse::<DetailsOrder>().is_ok());
        assert!("help,help,quota".parse::<DetailsOrder>().is_err());
        let s: Schedule = "60:5".parse().expect("schedule");
        assert!(s.active(Duration::from_secs(62)) && !s.active(Duration::from_secs(66)));
    }
}
