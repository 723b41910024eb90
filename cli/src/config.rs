//! Local configuration: QuotaPool and ModelChain YAML compiled through the CRDs' own
//! validation, for a process that runs without Redis (`--config`). Only the command line
//! compiles YAML; the function takes a compiled configuration.
use std::{collections::BTreeMap, path::Path, path::PathBuf};

use anyhow::Context as _;
use clap::Args;
use pacer_core::config::CompiledConfig;

/// `--config`: the YAML a process without Redis runs with.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// QuotaPool and ModelChain YAML to run with when there is no Redis.
    #[arg(long, env = "PACER_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// The configuration to run with when there is no Redis: `--config`, else `fallback`.
    pub fn local(
        &self,
        fallback: Option<CompiledConfig>,
    ) -> anyhow::Result<Option<CompiledConfig>> {
        match &self.config {
            Some(path) => Ok(Some(from_file(path)?)),
            None => Ok(fallback),
        }
    }
}

/// Reads a YAML file of pools and chains into a configuration.
pub fn from_file(path: &Path) -> anyhow::Result<CompiledConfig> {
    let yaml = std::fs::read_to_string(path)
        .with_context(|| format!("reading --config {}", path.display()))?;
    from_yaml(&yaml).with_context(|| format!("in --config {}", path.display()))
}

/// Compiles YAML pools and chains into a configuration.
pub fn from_yaml(yaml: &str) -> anyhow::Result<CompiledConfig> {
    let compiled = pacer_crds::compile::compile_documents(yaml, "default", &BTreeMap::new())?;
    Ok(CompiledConfig {
        version: 1,
        pools: compiled
            .pools
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect(),
        chains: compiled
            .chains
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect(),
    })
}
