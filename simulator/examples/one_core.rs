//! Serves the simulator on a single-threaded runtime, for measuring what one core holds:
//! `cargo run --release -p pacer-simulator --example one_core -- 127.0.0.1:8090 1000`
//! (address, latency in ms), then drive it with thousands of concurrent requests.
use std::{net::SocketAddr, time::Duration};

use pacer_simulator::{SimConfig, Simulator};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8090".into())
        .parse()?;
    let latency_ms: u64 = args.next().unwrap_or_else(|| "0".into()).parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = Simulator::bind(addr)?;
        println!("http://{}", listener.local_addr()?);
        let sim = Simulator::new(SimConfig {
            latency: Duration::from_millis(latency_ms),
            ..SimConfig::default()
        });
        sim.serve(listener).await?;
        Ok(())
    })
}
