//! What build.rs derives from the command line: `portico --version` names the
//! git commit of a checkout, and the shell completions and man pages written
//! beside the binary (what the Debian package ships) name every subcommand and
//! option that `--help` shows, so they cannot drift from it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn portico(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run portico {args:?}: {e}"));
    assert!(out.status.success(), "portico {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

#[test]
fn version_names_the_git_commit_of_a_checkout() {
    let version = env!("CARGO_PKG_VERSION");
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let in_checkout = git(&["rev-parse", "--show-toplevel"])
        .and_then(|top| std::fs::canonicalize(top).ok())
        .is_some_and(|top| Some(top) == std::fs::canonicalize(here).ok());
    let want = match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) if in_checkout => format!("portico {version} ({commit})\n"),
        _ => format!("portico {version}\n"),
    };
    assert_eq!(portico(&["--version"]), want);
    eprintln!("[cli] {}", want.trim_end());
}

/// The subcommands `portico --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let help = portico(&["--help"]);
    let list = help
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands: section in --help");
    let names: Vec<String> = list
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 2, "subcommands in --help: {names:?}\n{help}");
    names
}

/// The long options `portico SUB --help` shows (without `--help`).
fn long_options(sub: &str) -> Vec<String> {
    let help = portico(&[sub, "--help"]);
    let mut opts: Vec<String> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches([',', '>', ']']).to_string())
        .filter(|w| !w.is_empty() && w != "help")
        .collect();
    opts.dedup();
    opts
}

fn generated(dir: &str, name: &str) -> String {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_portico"));
    let path = bin
        .parent()
        .expect("the binary's directory")
        .join(dir)
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} (written by build.rs): {e}", path.display()))
}

#[test]
fn completions_and_man_pages_match_help() {
    let bash = generated("completions", "portico.bash");
    let zsh = generated("completions", "_portico");
    let fish = generated("completions", "portico.fish");
    let man = generated("man", "portico.1");
    assert!(man.contains(".TH portico 1"), "portico.1: {man}");
    for sub in subcommands() {
        assert!(bash.contains(&format!("portico,{sub})")), "bash: no {sub}");
        assert!(zsh.contains(&format!("'{sub}:")), "zsh: no {sub}");
        assert!(fish.contains(&format!("-a \"{sub}\"")), "fish: no {sub}");
        assert!(
            man.contains(&format!("portico\\-{sub}(1)")),
            "portico.1: no {sub}"
        );
        let page = generated("man", &format!("portico-{sub}.1"));
        let opts = long_options(&sub);
        for opt in &opts {
            assert!(bash.contains(&format!("--{opt}")), "bash: no {sub} --{opt}");
            assert!(zsh.contains(&format!("'--{opt}")), "zsh: no {sub} --{opt}");
            assert!(
                fish.contains(&format!("-l {opt}")),
                "fish: no {sub} --{opt}"
            );
            let roff = format!("\\-\\-{}", opt.replace('-', "\\-"));
            assert!(page.contains(&roff), "portico-{sub}.1: no --{opt}");
        }
        eprintln!("[cli] {sub}: {opts:?} in bash, zsh, fish and portico-{sub}.1");
    }
}
