//! `pacer simulate`: serves the Gemini simulator (see the `pacer_simulator` crate).
use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use clap::Args;
use pacer_simulator::{
    Faults, LimitSpec, SimConfig, Simulator,
    config::{BlockRule, CreditSpec, DetailsOrder, KeySpec, Schedule},
};

fn probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{p} is not a probability between 0 and 1"))
    }
}

/// Serve a faithful Gemini API that enforces quotas per project and model and injects
/// faults: point a client (or Google's SDK, via its base URL) at it to rehearse a fleet.
/// It counts every arrival on its own clock, refused ones included (`GET /_sim/stats`:
/// `arrivals`, `max_arrivals_in_any_window`, `accepted`, `rejected`, `faults`, `tickets`).
#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Address to listen on (port 0 picks one; the URL is printed on stdout).
    #[arg(long, env = "PACER_SIM_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,

    /// A project (repeatable). Quotas are per project; the first one takes keys that
    /// name no project.
    #[arg(
        long = "project",
        env = "PACER_SIM_PROJECTS",
        value_delimiter = ',',
        default_value = "sim-project"
    )]
    pub projects: Vec<String>,

    /// An API key, `KEY` or `PROJECT=KEY` (repeatable; keys of one project share its
    /// quota). With none, any non-empty key is accepted for the first project.
    #[arg(
        long = "key",
        env = "PACER_SIM_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub keys: Vec<KeySpec>,

    /// A quota, `[PROJECT/]MODEL:rpm=N,tpm=N,ipm=N,rpd=N,spend=MICRODOLLARS[,window=SECONDS][,spend_window=SECONDS]`
    /// (repeatable; `;`-separated in the env var). Omitted dimensions are unlimited; 0 is
    /// Google's "limit: 0". `window` (default 60) applies to rpm, tpm and ipm;
    /// `spend_window` defaults to 600. rpd resets at midnight America/Los_Angeles. Spend is
    /// the project's, shared by its models, as Google counts it: the smallest `spend` of the
    /// project's model specs, or `[PROJECT/]*:spend=MICRODOLLARS[,spend_window=SECONDS]`.
    #[arg(long = "limit", env = "PACER_SIM_LIMITS", value_delimiter = ';')]
    pub limits: Vec<LimitSpec>,

    /// Count in calendar windows (aligned to the wall clock) instead of a sliding window.
    #[arg(long, env = "PACER_SIM_FIXED_WINDOWS")]
    pub fixed_windows: bool,

    /// Order of a 429's details: `random` (a fresh shuffle each time, as Google varies it)
    /// or a permutation of `help,quota,retry`.
    #[arg(long, env = "PACER_SIM_DETAILS_ORDER", default_value = "random")]
    pub details_order: DetailsOrder,

    /// Base latency of an answer, in milliseconds.
    #[arg(long, env = "PACER_SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// Uniform random latency added on top of `--latency-ms`, in milliseconds.
    #[arg(long, env = "PACER_SIM_LATENCY_JITTER_MS", default_value_t = 0)]
    pub latency_jitter_ms: u64,

    /// Probability of a bare 429 without details (a "ghost" 429), even under quota.
    #[arg(long = "ghost-429-rate", env = "PACER_SIM_GHOST_429_RATE", default_value = "0", value_parser = probability)]
    pub ghost_429_rate: f64,

    /// Probability of a 503 "The model is overloaded".
    #[arg(long, env = "PACER_SIM_OVERLOAD_RATE", default_value = "0", value_parser = probability)]
    pub overload_rate: f64,

    /// Periodic 503 bursts, `EVERY_SECONDS:FOR_SECONDS` (e.g. `60:5`: the first 5 s of
    /// every minute since start).
    #[arg(long, env = "PACER_SIM_OVERLOAD_BURST")]
    pub overload_burst: Option<Schedule>,

    /// Probability of a 500 INTERNAL.
    #[arg(long, env = "PACER_SIM_SERVER_ERROR_RATE", default_value = "0", value_parser = probability)]
    pub server_error_rate: f64,

    /// Probability of a 504 DEADLINE_EXCEEDED.
    #[arg(long, env = "PACER_SIM_GATEWAY_TIMEOUT_RATE", default_value = "0", value_parser = probability)]
    pub gateway_timeout_rate: f64,

    /// Probability that the connection breaks mid-answer (after the request was counted).
    #[arg(long, env = "PACER_SIM_RESET_RATE", default_value = "0", value_parser = probability)]
    pub reset_rate: f64,

    /// Probability of a slow answer (adds `--slow-ms`).
    #[arg(long, env = "PACER_SIM_SLOW_RATE", default_value = "0", value_parser = probability)]
    pub slow_rate: f64,

    /// Extra latency of a slow answer, in milliseconds.
    #[arg(long, env = "PACER_SIM_SLOW_MS", default_value_t = 30_000)]
    pub slow_ms: u64,

    /// Block prompts containing PATTERN (case-insensitive), `PATTERN[=REASON]`
    /// (repeatable; `;`-separated in the env var). REASON: IMAGE_SAFETY (default),
    /// NO_IMAGE, IMAGE_RECITATION, IMAGE_PROHIBITED_CONTENT (finish reasons), or SAFETY,
    /// PROHIBITED_CONTENT, BLOCKLIST, OTHER (promptFeedback.blockReason).
    #[arg(long = "block", env = "PACER_SIM_BLOCKS", value_delimiter = ';')]
    pub blocks: Vec<BlockRule>,

    /// Prepaid credit, `PROJECT=MICRODOLLARS` (repeatable): once spent, that project's
    /// requests get 402.
    #[arg(long = "credit", env = "PACER_SIM_CREDITS", value_delimiter = ',')]
    pub credits: Vec<CreditSpec>,

    /// Treat MODEL as retired (404), on top of the built-in shutdown dates (repeatable).
    #[arg(long = "retire", env = "PACER_SIM_RETIRED", value_delimiter = ',')]
    pub retired: Vec<String>,

    /// An access token the Vertex AI routes accept (repeatable), on top of those the
    /// simulator's `POST /token` issues to a service-account key whose `token_uri` names
    /// it.
    #[arg(
        long = "vertex-token",
        env = "PACER_SIM_VERTEX_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub vertex_tokens: Vec<String>,

    /// Write a service-account key file for the first project to this path once listening:
    /// its `token_uri` is this simulator, so a Vertex AI pool whose
    /// `spec.vertex.credentialsFile` names it rehearses Google's OAuth flow.
    #[arg(long, env = "PACER_SIM_WRITE_VERTEX_KEY")]
    pub write_vertex_key: Option<std::path::PathBuf>,
}

impl SimulateArgs {
    /// The simulator configuration these flags describe.
    pub fn config(&self) -> SimConfig {
        SimConfig {
            projects: self.projects.clone(),
            keys: self.keys.clone(),
            limits: self.limits.clone(),
            fixed_windows: self.fixed_windows,
            details_order: self.details_order.clone(),
            latency: Duration::from_millis(self.latency_ms),
            latency_jitter: Duration::from_millis(self.latency_jitter_ms),
            faults: Faults {
                ghost_429: self.ghost_429_rate,
                overload: self.overload_rate,
                overload_burst: self.overload_burst,
                server_error: self.server_error_rate,
                gateway_timeout: self.gateway_timeout_rate,
                reset: self.reset_rate,
                slow: self.slow_rate,
                slow_ms: self.slow_ms,
            },
            blocks: self.blocks.clone(),
            credits: self.credits.clone(),
            retired: self.retired.clone(),
            vertex_tokens: self.vertex_tokens.clone(),
        }
    }
}

/// Serves until interrupted.
pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let listener = Simulator::bind(args.listen)?;
    let addr = listener.local_addr()?;
    let simulator = Simulator::new(args.config());
    tracing::info!(
        %addr,
        "Gemini simulator listening; counts at GET /_sim/stats, cleared by POST /_sim/reset"
    );
    println!("http://{addr}");
    if let Some(path) = &args.write_vertex_key {
        let project = args.projects.first().map_or("sim-project", String::as_str);
        std::fs::write(
            path,
            pacer_simulator::oauth::service_account_json(&format!("http://{addr}"), project),
        )
        .with_context(|| format!("writing --write-vertex-key {}", path.display()))?;
        tracing::info!(path = %path.display(), project, "wrote a Vertex AI rehearsal key file");
    }
    tokio::select! {
        served = simulator.serve(listener) => served?,
        _ = pacer_core::process::shutdown_signal() => tracing::info!("stopped by a signal"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use crate::{Cli, Command};

    #[test]
    fn every_flag_has_help_and_an_env_var() {
        let cli = Cli::command();
        let simulate = cli
            .find_subcommand("simulate")
            .expect("simulate subcommand");
        for arg in simulate.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_help().is_some(), "--{id} has no help");
            assert!(arg.get_env().is_some(), "--{id} has no env var");
        }
    }

    #[test]
    fn flags_build_the_config() {
        let cli = Cli::try_parse_from([
            "pacer",
            "simulate",
            "--listen",
            "127.0.0.1:0",
            "--limit",
            "gemini-3-pro-image:rpm=20,tpm=100000,rpd=250",
            "--key",
            "acme=k1",
            "--ghost-429-rate",
            "0.01",
            "--block",
            "gore=IMAGE_SAFETY",
            "--overload-burst",
            "60:5",
        ])
        .expect("parses");
        #[allow(unreachable_patterns)]
        let args = match cli.command {
            Command::Simulate(args) => args,
            _ => panic!("not simulate"),
        };
        let config = args.config();
        assert_eq!(config.limits[0].rpm, Some(20));
        assert_eq!(config.faults.ghost_429, 0.01);
        assert!(config.faults.overload_burst.is_some());
        assert!(Cli::try_parse_from(["pacer", "simulate", "--overload-rate", "2"]).is_err());
    }
}
