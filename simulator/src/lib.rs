//! A faithful Gemini API simulator: Google's routes, answers and error bodies, quotas
//! enforced per project and model the way Google counts them, and faults on demand, so
//! tests, benchmarks and users can rehearse a fleet offline. `pacer simulate` serves it;
//! tests start it in-process with [`Simulator::spawn`].
//!
//! - [`config`]: [`SimConfig`] and the flag syntax of limits, keys, blocks and schedules.
//! - [`quota`]: counting at arrival (sliding or calendar windows, Pacific days); what
//!   arrived in any window (refused requests included) and what was accepted. Spend
//!   counts per project, shared by its models, as Google's spend quota does.
//! - [`models`]: the model facts it serves, read from core's one model table (sizes,
//!   tokens, prices, ratios, reasoning tokens, shutdown dates), plus the retired Imagen
//!   models.
//! - [`wire`]: Gemini's JSON (requests, answers, `google.rpc` error details, durations),
//!   written from Google's documented shapes and not shared with Pacer's client, so a
//!   mistake in one is caught by the other.
//! - [`validate`]: Google's 400s for unknown fields, bad enum values, sizes and ratios.
//! - [`image`]: small, valid PNGs of the requested aspect ratio, derived from the prompt.
//! - `server`: the axum routes, `GET /_sim/stats` and `POST /_sim/reset`.
use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, task::JoinHandle};

pub mod config;
pub mod image;
pub mod models;
pub mod oauth;
pub mod quota;
mod server;
pub mod validate;
pub mod wire;

pub use config::{ConfigError, Faults, KeySpec, LimitSpec, SimConfig};
pub use server::TICKET_HEADER;

/// Pending connections the listener queues (benchmarks open thousands at once).
const BACKLOG: u32 = 8192;

/// A simulator: cheap to clone, all clones share state.
#[derive(Clone)]
pub struct Simulator {
    sim: Arc<server::Sim>,
}

impl Simulator {
    pub fn new(config: SimConfig) -> Simulator {
        Simulator {
            sim: Arc::new(server::Sim::new(config)),
        }
    }

    /// The axum router, to embed or serve.
    pub fn router(&self) -> axum::Router {
        server::router(self.sim.clone())
    }

    /// What `GET /_sim/stats` returns.
    pub fn stats(&self) -> serde_json::Value {
        self.sim.stats()
    }

    /// What `POST /_sim/reset` does: forgets every count, window and ticket.
    pub fn reset(&self) {
        self.sim.reset();
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// Binds `addr` with a deep backlog.
    pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    }

    /// Serves on `addr` (port 0 for any) in a background task.
    pub async fn spawn_on(self, addr: SocketAddr) -> std::io::Result<RunningSimulator> {
        let listener = Self::bind(addr)?;
        let addr = listener.local_addr()?;
        let sim = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = self.serve(listener).await {
                tracing::error!(error = %e, "simulator stopped");
            }
        });
        Ok(RunningSimulator { addr, sim, task })
    }

    /// Serves on `127.0.0.1:0` in a background task.
    pub async fn spawn(self) -> std::io::Result<RunningSimulator> {
        self.spawn_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }
}

/// A simulator serving in the background; stops when dropped.
pub struct RunningSimulator {
    pub addr: SocketAddr,
    pub sim: Simulator,
    task: JoinHandle<()>,
}

impl RunningSimulator {
    /// The base URL to give a client (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> serde_json::Value {
        self.sim.stats()
    }

    /// Writes a service-account key file for `project` whose tokens come from this
    /// simulator (see [`oauth`]): what a Vertex AI pool's `credentialsFile` names in a
    /// rehearsal.
    pub fn write_vertex_key_file(
        &self,
        path: &std::path::Path,
        project: &str,
    ) -> std::io::Result<()> {
        std::fs::write(path, oauth::service_account_json(&self.url(), project))
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}
