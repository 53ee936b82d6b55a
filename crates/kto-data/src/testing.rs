//! Helpers for the tests of every crate of the workspace (kto-data is below all of them): where the shared
//! fixtures are. Compiled for tests only (the `testing` feature, which the crates' dev-dependencies enable).

use std::path::{Path, PathBuf};

/// `tests/fixtures/<name>` of this checkout as a canonical absolute path (so it can be written into a config that
/// another folder reads); panics, naming it, when it is missing.
pub fn fixture(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name);
    path.canonicalize()
        .unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// The TRL parity fixture (`tests/fixtures/trl-kto-parity`): a tiny Llama, its initial adapter, the data and TRL's
/// numbers.
pub fn trl_fixture() -> PathBuf {
    fixture("trl-kto-parity")
}
