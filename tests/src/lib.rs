//! End-to-end tests of Pacer against real services started by `tests/rig/up`.
//!
//! [`Rig`] reads the addresses `tests/rig/up` wrote; a test that needs a service the rig
//! did not start fails with a message saying how to start it.
use std::{collections::HashMap, path::PathBuf};

/// The addresses of the rig's services.
#[derive(Debug, Clone)]
pub struct Rig {
    vars: HashMap<String, String>,
}

impl Rig {
    /// The file `tests/rig/up` writes: `$PACER_RIG_ENV`, else `.rig/env` in the repo.
    pub fn env_file() -> PathBuf {
        std::env::var_os("PACER_RIG_ENV").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.rig/env")
        })
    }

    /// Loads the rig's addresses, or panics with how to start the rig.
    pub fn load() -> Rig {
        let path = Self::env_file();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the test rig is not running ({}: {e}); start it with `tests/rig/up` \
                 (or run the whole suite with `tests/run`)",
                path.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('\'').to_owned()))
            .collect();
        Rig { vars }
    }

    /// One address, or a panic naming the missing variable and how to start the rig.
    pub fn get(&self, name: &str) -> String {
        self.vars.get(name).cloned().unwrap_or_else(|| {
            panic!(
                "{name} is missing from {}: the rig did not start that service; run `tests/rig/up`",
                Self::env_file().display()
            )
        })
    }
}
