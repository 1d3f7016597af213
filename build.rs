//! Build script:
//! - `VERSION_WITH_COMMIT` for `portico --version`: the package version, plus the
//!   short git commit when building from a git checkout of this crate (a
//!   source tarball has no `.git` and shows the version alone);
//! - bash, zsh and fish completions and the man pages, generated from the
//!   clap definition in src/cli.rs (so they never drift from `--help`), written
//!   beside the binary: `target/<profile>/completions/` and
//!   `target/<profile>/man/` (`.1` and `.1.gz`), where `cargo deb` takes them from (its assets
//!   under `target/release/` resolve to the real profile directory).

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use clap::CommandFactory;
use clap_complete::Shell;

// The same file main.rs uses; only the definitions are needed here.
#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cli.rs");

    let version = env!("CARGO_PKG_VERSION");
    let version = match git_commit() {
        Some(commit) => format!("{version} ({commit})"),
        None => version.to_string(),
    };
    // Not a PORTICO_* name: cargo also sets it for `cargo run` and `cargo test`
    // processes, and portico reads PORTICO_* variables as config overrides.
    println!("cargo:rustc-env=VERSION_WITH_COMMIT={version}");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let Some(profile_dir) = profile_dir(&out_dir) else {
        println!(
            "cargo:warning=OUT_DIR {} is not <target>/<profile>/build/<crate>/out: \
             completions and man pages not written",
            out_dir.display()
        );
        return;
    };
    // clap keeps `&'static str`s; this process ends right after.
    let version: &'static str = version.leak();
    let command = || cli::Cli::command().version(version);
    let mut cmd = command();
    let completions = profile_dir.join("completions");
    std::fs::create_dir_all(&completions).expect("create the completions directory");
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "portico", &completions)
            .unwrap_or_else(|e| panic!("write the {shell} completions: {e}"));
    }
    let man = profile_dir.join("man");
    // No pages left over from a subcommand that is gone.
    let _ = std::fs::remove_dir_all(&man);
    std::fs::create_dir_all(&man).expect("create the man page directory");
    // A fresh command: generating completions built `cmd`, which added the
    // `help` subcommand that man pages do not get.
    clap_mangen::generate_to(command(), &man).expect("write the man pages");
    // cargo-deb does not compress assets taken from the target directory.
    for entry in std::fs::read_dir(&man).expect("read the man page directory") {
        let page = entry.expect("man page directory entry").path();
        if page.extension().is_some_and(|e| e == "1") {
            gzip(&page);
        }
    }
}

/// PAGE.gz beside PAGE, at the best compression, without a name or time.
fn gzip(page: &Path) {
    use std::io::Write;
    let text = std::fs::read(page).unwrap_or_else(|e| panic!("read {}: {e}", page.display()));
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    gz.write_all(&text).expect("gzip into memory");
    let bytes = gz.finish().expect("gzip into memory");
    let mut name = page.as_os_str().to_owned();
    name.push(".gz");
    std::fs::write(&name, bytes).unwrap_or_else(|e| panic!("write {}.gz: {e}", page.display()));
}

/// `<target>/<profile>` from `<target>/<profile>/build/<crate>-<hash>/out`.
fn profile_dir(out_dir: &Path) -> Option<PathBuf> {
    let build = out_dir.parent()?.parent()?;
    (build.file_name()? == "build").then(|| build.parent().map(Path::to_path_buf))?
}

fn git(args: &[&str]) -> Option<String> {
    let out = Process::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// The short commit of HEAD when this crate's directory is the top of a git
/// work tree (not merely somewhere inside another repository), and the files
/// whose change means a new commit: HEAD, the branch's ref, packed-refs.
fn git_commit() -> Option<String> {
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(here).ok()? {
        return None;
    }
    let path = |name: &str| git(&["rev-parse", "--git-path", name]).map(|p| here.join(p));
    let mut watch = vec![path("HEAD")?];
    // A watched path that does not exist would rerun this script on every
    // build. A branch that lives in packed-refs gets a loose ref file at its
    // next commit, which shows in the ref's directory.
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|b| path(&b)) {
        watch.extend(
            [Some(branch.as_path()), branch.parent()]
                .into_iter()
                .flatten()
                .find(|p| p.exists())
                .map(Path::to_path_buf),
        );
    }
    watch.extend(path("packed-refs"));
    for p in watch.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    git(&["rev-parse", "--short", "HEAD"])
}
