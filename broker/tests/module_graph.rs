//! The broker's module graph has no cycle and nothing imports upward into `lib.rs` (the
//! wiring). Each `.rs` file under `src/` is a module; an edge is any path through `crate::`,
//! `super::` or `self::`, or a child module named from its parent (`api::router`). Test code
//! (`#[cfg(test)] mod tests`) and comments are left out. Checked twice: file by file, and
//! folded to the top-level modules (`session::handler` counts as `session`).
//!
//! `cargo test -p fleet-broker --test module_graph -- --nocapture` prints both graphs;
//! `scripts/module-graph [<commit>]` runs it (on an older commit's tree too).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Every `.rs` file under `dir`, with its module path (`crate` for lib.rs).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("under src").with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
        if parts == ["main"] {
            continue; // the binary: a user of the library, not a module of it
        }
        if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
            parts.pop();
        }
        let name = if parts.is_empty() { "crate".to_owned() } else { parts.join("::") };
        out.insert(name, f);
    }
    out
}

/// The code of a file without comments and without its unit-test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.find("//") {
            // `//` inside a string literal (a URL) is rare in paths; a line comment is cut.
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn ident(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// The module paths `text` names after `prefix::` (a path or a `{...}` group), as segments.
fn paths_after(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let pat = format!("{prefix}::");
    let mut rest = text;
    while let Some(i) = rest.find(&pat) {
        let before = rest[..i].chars().last();
        rest = &rest[i + pat.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `foo_crate::`, `$crate::` is fine (a macro's own crate)
        }
        collect(rest, Vec::new(), &mut out);
    }
    out
}

fn collect(s: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let s = s.trim_start();
    if let Some(group) = s.strip_prefix('{') {
        // One level of `{a, b::c}` is enough for this crate's imports.
        let end = group.find('}').unwrap_or(group.len());
        for item in group[..end].split(',') {
            collect(item, base.clone(), out);
        }
        return;
    }
    let mut segs = base;
    let mut s = s;
    loop {
        let (id, rest) = ident(s);
        if id.is_empty() {
            break;
        }
        segs.push(id.to_owned());
        match rest.strip_prefix("::") {
            Some(r) if !r.starts_with('{') => s = r,
            Some(r) => return collect(r, segs, out),
            None => break,
        }
    }
    out.push(segs);
}

/// The longest module that `segs` (from the crate root) starts with.
fn resolve(mods: &BTreeMap<String, PathBuf>, segs: &[String]) -> String {
    for n in (1..=segs.len()).rev() {
        let name = segs[..n].join("::");
        if mods.contains_key(&name) {
            return name;
        }
    }
    "crate".to_owned()
}

fn graph(src: &Path) -> (BTreeMap<String, PathBuf>, Graph) {
    let mods = modules(src);
    let mut g = Graph::new();
    for (name, file) in &mods {
        let text = code(&std::fs::read_to_string(file).expect("read"));
        let own: Vec<String> =
            if name == "crate" { vec![] } else { name.split("::").map(str::to_owned).collect() };
        let parent = own[..own.len().saturating_sub(1)].to_vec();
        let mut targets = BTreeSet::new();
        for p in paths_after(&text, "crate") {
            targets.insert(resolve(&mods, &p));
        }
        for p in paths_after(&text, "super") {
            targets.insert(resolve(&mods, &[parent.clone(), p].concat()));
        }
        for p in paths_after(&text, "self") {
            targets.insert(resolve(&mods, &[own.clone(), p].concat()));
        }
        // Children named directly (`use conn::Conn;`, `api::router`).
        for child in mods.keys() {
            let c: Vec<&str> = child.split("::").collect();
            if c.len() == own.len() + 1 && c[..own.len()].iter().zip(&own).all(|(a, b)| a == b) {
                let last = c[c.len() - 1];
                if !paths_after(&text, last).is_empty() {
                    targets.insert(child.clone());
                }
            }
        }
        targets.remove(name);
        g.insert(name.clone(), targets);
    }
    (mods, g)
}

fn top(name: &str) -> String {
    name.split("::").next().unwrap_or(name).to_owned()
}

fn folded(g: &Graph) -> Graph {
    let mut out = Graph::new();
    for (from, tos) in g {
        let f = top(from);
        let e = out.entry(f.clone()).or_default();
        for t in tos {
            if top(t) != f {
                e.insert(top(t));
            }
        }
    }
    out
}

/// A cycle of `g`, if it has one.
fn cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        n: &str,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(g, m, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(g, n, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn print(title: &str, g: &Graph) {
    println!("{title}");
    for (from, tos) in g.iter().filter(|(f, _)| f.as_str() != "crate") {
        let tos: Vec<&str> = tos.iter().map(String::as_str).collect();
        println!("  {from} -> {}", tos.join(", "));
    }
}

#[test]
fn the_module_graph_has_no_cycle_and_nothing_imports_lib_rs() {
    // `MODULE_GRAPH_SRC=<dir>`: check another tree (an older commit's `broker/src`).
    let src = std::env::var_os("MODULE_GRAPH_SRC")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), PathBuf::from);
    let (_, g) = graph(&src);
    print("modules (files):", &g);
    let top = folded(&g);
    print("top-level modules:", &top);
    let upward: Vec<&String> = g
        .iter()
        .filter(|(from, tos)| from.as_str() != "crate" && tos.contains("crate"))
        .map(|(f, _)| f)
        .collect();
    assert!(upward.is_empty(), "modules importing from lib.rs (the wiring): {upward:?}");
    if let Some(c) = cycle(&g) {
        panic!("a cycle between files: {}", c.join(" -> "));
    }
    if let Some(c) = cycle(&top) {
        panic!("a cycle between top-level modules: {}", c.join(" -> "));
    }
}

#[test]
fn the_check_sees_cycles_and_upward_imports() {
    let dir = std::env::temp_dir().join(format!("fleet-module-graph-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\npub fn now() {}\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "mod x;\nuse x::X;\n").unwrap();
    std::fs::write(src.join("a/x.rs"), "use super::Y;\n// use crate::b;\n").unwrap();
    std::fs::write(src.join("b.rs"), "use crate::{a::x, now};\n").unwrap();
    let (_, g) = graph(&src);
    assert_eq!(cycle(&g), Some(vec!["a".into(), "a::x".into(), "a".into()]));
    assert!(g["b"].contains("crate") && g["b"].contains("a::x"), "{g:?}");
    assert!(!g["a::x"].contains("b"), "a comment is no import");
    std::fs::remove_dir_all(&dir).unwrap();
}
