//! The README's walk-through, run as written: the shell blocks between `<!-- walkthrough -->`
//! and `<!-- /walkthrough -->` are extracted from `README.md` (not copied here) and run with
//! bash against a fresh coordinator, as a newcomer would in a second terminal: with the admin
//! token the first start printed in `SWITCHYARD_TOKEN`, and the binary where `cargo run
//! --release` leaves it.

mod common;

use std::process::Command;

use common::spawn_serving_logged;

/// The `sh` blocks of the README's walk-through sections, in order.
fn walkthrough(readme: &str) -> String {
    let mut script = String::new();
    let mut in_section = false;
    let mut in_block = false;
    for line in readme.lines() {
        match line.trim() {
            "<!-- walkthrough -->" => in_section = true,
            "<!-- /walkthrough -->" => in_section = false,
            "```sh" if in_section => in_block = true,
            "```" if in_block => in_block = false,
            _ if in_block => {
                script.push_str(line);
                script.push('\n');
            }
            _ => {}
        }
    }
    script
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let script = walkthrough(&readme);
    assert!(
        script.contains("switchyard") && script.contains("curl"),
        "no walk-through found in the README"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    serve
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("switchyard-data"));
    let (mut server, addr, log) = spawn_serving_logged(serve);
    // The token the first start printed, as the newcomer copies it.
    let token = log
        .iter()
        .find_map(|l| l.trim().strip_prefix("sy_"))
        .map(|t| format!("sy_{t}"))
        .expect("the first start prints the admin token");
    // The repository root as the second terminal sees it: the binary where `cargo run
    // --release` puts it.
    let root = dir.path().join("repo");
    std::fs::create_dir_all(root.join("target/release")).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_switchyard"),
        root.join("target/release/switchyard"),
    )
    .unwrap();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&root)
        .env("SWITCHYARD_TOKEN", &token)
        .env("SWITCHYARD_SERVER", format!("http://{addr}"))
        .output()
        .expect("bash runs");
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the walk-through failed:\n{stdout}\n{stderr}"
    );
    // What the README's comments say each step shows.
    assert!(stderr.contains("2 finished, 0 failed"), "{stderr}");
    assert!(
        stdout.contains(r#""outcome": "task 1 got {\"name\":\"world\"}\n""#),
        "{stdout}"
    );
    assert!(stdout.contains(r#""lease_ms":15000"#), "{stdout}");
    assert!(
        stdout.contains(r#"{"task":3,"already_recorded":false}"#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#""state":"finished","attempt":1,"worker":2,"outcome":"hi""#),
        "{stdout}"
    );
}
