//! The module graph of `src/` has no import cycles: each module uses only
//! what lies below it in the flow (see the lib.rs module doc).
//!
//! Hand-written rather than a tool: cargo-modules' `--acyclic` check needs
//! the rust-analyzer crates built from source (tens of minutes on a small CI
//! machine) and follows our rustc's version closely; this reads `crate::` and
//! `super::` paths in the source, which is how every module of portico
//! names another (test modules are left out: they may use anything).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`http::proxy`) -> its source text without test modules.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).expect("read src dir");
        for e in entries {
            let path = e.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = rel
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            out.insert(parts.join("::"), strip_tests(&text));
        }
    }
    out
}

/// Drop `#[cfg(test)]` items: from the attribute to the end of the item's
/// brace block (or to the end of the line for `mod tests;`).
fn strip_tests(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let semi = after.find(';');
        let brace = after.find('{');
        match (brace, semi) {
            (Some(b), s) if s.is_none_or(|s| b < s) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (i, c) in after[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            (_, Some(s)) => rest = &after[s + 1..],
            _ => rest = "",
        }
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path that starts with `crate::` or `super::`, with `{a, b::c}`
/// groups expanded, as lists of segments (`super` kept as a segment).
fn paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if text[..at].chars().next_back().is_some_and(is_ident) {
                continue;
            }
            let head = start.trim_end_matches("::").to_string();
            expand(&text[from..], vec![head], &mut out);
        }
    }
    out
}

fn expand(s: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    let mut s = s;
    loop {
        if let Some(group) = s.strip_prefix('{') {
            let mut depth = 1;
            let mut end = group.len();
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let mut depth = 0;
            let mut item_start = 0;
            let body = &group[..end];
            for (i, c) in body.char_indices().chain([(body.len(), ',')]) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let item = body[item_start..i].trim();
                        if !item.is_empty() {
                            expand(item, path.clone(), out);
                        }
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let len = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
        if len == 0 {
            break;
        }
        path.push(s[..len].to_string());
        s = &s[len..];
        match s.strip_prefix("::") {
            Some(next) => s = next,
            None => break,
        }
    }
    out.push(path);
}

/// The module a path names (its longest prefix that is a module), seen
/// from module `from`.
fn target(modules: &BTreeMap<String, String>, from: &str, path: &[String]) -> Option<String> {
    let mut base: Vec<&str> = if from.is_empty() {
        Vec::new()
    } else {
        from.split("::").collect()
    };
    let mut segs = path;
    if segs.first().map(String::as_str) == Some("crate") {
        base.clear();
        segs = &segs[1..];
    } else {
        while segs.first().map(String::as_str) == Some("super") {
            base.pop()?;
            segs = &segs[1..];
        }
    }
    let full: Vec<&str> = base
        .into_iter()
        .chain(segs.iter().map(String::as_str))
        .collect();
    (1..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|m| modules.contains_key(m))
}

/// Edges `a -> b`: module `a` names something in module `b`. A module
/// naming its own parent's items or its children is not an edge.
fn edges(modules: &BTreeMap<String, String>) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (m, text) in modules {
        for p in paths(text) {
            let Some(t) = target(modules, m, &p) else {
                continue;
            };
            let nested = |a: &str, b: &str| b.is_empty() || a.starts_with(&format!("{b}::"));
            if &t != m && !nested(m, &t) && !nested(&t, m) {
                out.insert((m.clone(), t));
            }
        }
    }
    out
}

/// One cycle, if any, as `a -> b -> ... -> a`.
fn find_cycle(edges: &BTreeSet<(String, String)>) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
    }
    // 0 = unseen, 1 = on the current path, 2 = done.
    let mut state: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        v: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(v, 1);
        path.push(v);
        for &w in next.get(v).map(Vec::as_slice).unwrap_or(&[]) {
            match state.get(w).copied().unwrap_or(0) {
                1 => {
                    let from = path.iter().position(|x| *x == w).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        path[from..].iter().map(|s| s.to_string()).collect();
                    cycle.push(w.to_string());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(w, next, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(v, 2);
        None
    }
    let starts: Vec<&str> = next.keys().copied().collect();
    for v in starts {
        if state.get(v).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(v, &next, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn src_has_no_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    assert!(
        modules.contains_key("http::proxy") && modules.contains_key("listener"),
        "module discovery found {:?}",
        modules.keys().collect::<Vec<_>>()
    );
    let edges = edges(&modules);
    // The flow's known edges are seen (the reader works on this source).
    for (a, b) in [
        ("listener", "conn"),
        ("conn", "terminate"),
        ("http::proxy", "http::site"),
    ] {
        assert!(
            edges.contains(&(a.to_string(), b.to_string())),
            "expected edge {a} -> {b}; found {edges:?}"
        );
    }
    if let Some(cycle) = find_cycle(&edges) {
        panic!("import cycle in src/: {}", cycle.join(" -> "));
    }
}

fn graph(files: &[(&str, &str)]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(m, t)| (m.to_string(), strip_tests(t)))
        .collect()
}

#[test]
fn finds_a_cycle_through_super_and_groups() {
    let m = graph(&[
        ("", "pub mod a; pub mod b; pub mod http;"),
        ("a", "use crate::b::Thing;"),
        ("b", "use crate::http::{x::One, y};"),
        ("http", "pub mod x; pub mod y;"),
        ("http::x", "use super::y::Two;"),
        ("http::y", "fn f() { crate::a::go() }"),
    ]);
    let e = edges(&m);
    let cycle = find_cycle(&e).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert!(cycle.contains(&"a".to_string()), "{cycle:?}");
}

#[test]
fn ignores_test_modules_and_children() {
    let m = graph(&[
        ("", "pub mod a; pub mod b;"),
        ("a", "use crate::b::Thing;"),
        (
            "b",
            "pub struct Thing;\n#[cfg(test)]\nmod tests { use crate::a::X; fn f() { if true { } } }\n",
        ),
    ]);
    let e = edges(&m);
    assert_eq!(e, BTreeSet::from([("a".to_string(), "b".to_string())]));
    assert!(find_cycle(&e).is_none());
}
