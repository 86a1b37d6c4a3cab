//! Helpers shared by the integration tests.

/// The `tap` example binary: `cargo test` builds examples beside the test executables (as
/// `examples/tap-<hash>`; `cargo build --example tap` as `examples/tap`). The newest wins.
pub fn tap_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples");
    let newest = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let name = name
                .strip_suffix(std::env::consts::EXE_SUFFIX)
                .unwrap_or(&name)
                .to_owned();
            (name == "tap" || name.starts_with("tap-")) && !name.contains('.')
        })
        .max_by_key(|entry| entry.metadata().and_then(|m| m.modified()).ok());
    newest.map(|entry| entry.path()).unwrap_or_else(|| {
        panic!(
            "no tap binary in {}: cargo build --example tap --all-features",
            dir.display()
        )
    })
}
