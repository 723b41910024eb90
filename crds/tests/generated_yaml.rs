//! The checked-in CRD YAML (in crds/ and in the chart) is what the types generate.
//! Regenerate with `cargo run -p pacer-operator -- crd > crds/generated/pacer.dev.yaml`
//! and copy it to `charts/pacer/crds/` (`tests/regen` does both).
use std::path::Path;

#[test]
fn checked_in_crd_yaml_is_current() {
    let want = pacer_crds::crd_yaml().expect("serialize CRDs");
    let root = Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("..");
    for path in [
        "crds/generated/pacer.dev.yaml",
        "charts/pacer/crds/pacer.dev.yaml",
    ] {
        let have = std::fs::read_to_string(root.join(path)).unwrap_or_default();
        assert!(
            have == want,
            "{path} is out of date: run `tests/regen` and commit the result"
        );
    }
}
