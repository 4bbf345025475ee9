//! The broker's layering, checked from its source: no file imports a file
//! that (through others) imports it back, and no layer reaches up.
//!
//! Bottom to top: the foundation (close codes, limits, shutdown, metrics),
//! transport, config, upstreams and
//! routing, handshake and sessions, the two modes, the app. The two modes
//! are peers and never import each other. An import is any `crate::`,
//! `super::` or `self::` path outside comments and outside the file's test
//! module (tests may reach across layers to build their fixtures).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each module prefix's layer; the longest matching prefix wins.
const LAYERS: &[(&str, u8, &str)] = &[
    ("close", 0, "foundation"),
    ("limits", 0, "foundation"),
    ("shutdown", 0, "foundation"),
    ("metrics", 0, "foundation"),
    ("transport", 1, "transport"),
    ("config", 2, "config"),
    ("upstream", 3, "upstreams"),
    ("routing", 3, "upstreams"),
    ("handshake", 4, "handshake and sessions"),
    ("session", 4, "handshake and sessions"),
    ("direct", 5, "modes"),
    ("mux", 5, "modes"),
    ("app", 6, "app"),
    ("", 6, "app"),
];

/// Rooms of one layer that must not import each other.
const PEERS: &[(&str, &str)] = &[("direct", "mux")];

/// A source file and the module path it defines (`transport::tls`; empty
/// for the crate root).
struct Module {
    file: PathBuf,
    path: Vec<String>,
    text: String,
}

fn modules(src: &Path) -> Vec<Module> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let last = parts.pop().expect("a file name");
            match last.as_str() {
                "main.rs" if parts.is_empty() => continue, // the binary
                "lib.rs" | "mod.rs" => {}
                other => parts.push(other.trim_end_matches(".rs").to_owned()),
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            out.push(Module {
                file: rel.to_path_buf(),
                path: parts,
                text,
            });
        }
    }
    out
}

/// The code of `text` without comments and without its test module.
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        // A trailing comment: `//` outside a string literal.
        let mut in_str = false;
        let mut cut = line.len();
        let bytes = line.as_bytes();
        for i in 0..bytes.len() {
            match bytes[i] {
                b'"' if i == 0 || bytes[i - 1] != b'\\' => in_str = !in_str,
                b'/' if !in_str && bytes.get(i + 1) == Some(&b'/') => {
                    cut = i;
                    break;
                }
                _ => {}
            }
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path the code names that starts at `crate`, `super` or `self`,
/// with `use` groups (`a::{b, c::{d}}`) expanded.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !is_ident(chars[i - 1]) && chars[i - 1] != ':';
        let rest: String = chars[i..chars.len().min(i + 7)].iter().collect();
        let root = ["crate::", "super::", "self::"]
            .into_iter()
            .find(|r| rest.starts_with(r));
        match root {
            Some(r) if starts_word => {
                let (found, next) = expand(&chars, i, Vec::new());
                out.extend(found);
                i = next.max(i + r.len());
            }
            _ => i += 1,
        }
    }
    out
}

/// Reads a path (or group) starting at `i` under `prefix`; returns the full
/// paths and the index after them.
fn expand(chars: &[char], mut i: usize, mut prefix: Vec<String>) -> (Vec<Vec<String>>, usize) {
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i] == '{' {
            i += 1;
            let mut out = Vec::new();
            loop {
                let (found, next) = expand(chars, i, prefix.clone());
                out.extend(found);
                i = next;
                while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
                    i += 1;
                }
                if i >= chars.len() || chars[i] == '}' {
                    return (out, i + 1);
                }
            }
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        if start == i {
            return (vec![prefix], i);
        }
        prefix.push(chars[start..i].iter().collect());
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// The file a path leads to: the longest prefix that is a module.
fn resolve<'a>(
    from: &Module,
    path: &[String],
    by_path: &'a BTreeMap<Vec<String>, PathBuf>,
) -> Option<&'a PathBuf> {
    let mut absolute: Vec<String> = Vec::new();
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => rest = &rest[1..],
        Some("self") => {
            absolute = from.path.clone();
            rest = &rest[1..];
        }
        Some("super") => {
            absolute = from.path.clone();
            while rest.first().map(String::as_str) == Some("super") {
                absolute.pop();
                rest = &rest[1..];
            }
            // `super` of `a/b.rs` (module `a::b`) and of `a/b/mod.rs`
            // (module `a::b` too) is `a`.
        }
        _ => return None,
    }
    absolute.extend(rest.iter().cloned());
    (0..=absolute.len())
        .rev()
        .find_map(|n| by_path.get(&absolute[..n]))
}

fn layer(path: &[String]) -> (u8, &'static str, String) {
    let joined = path.join("::");
    let (prefix, rank, name) = LAYERS
        .iter()
        .filter(|(p, _, _)| p.is_empty() || joined == *p || joined.starts_with(&format!("{p}::")))
        .max_by_key(|(p, _, _)| p.len())
        .expect("the root matches everything");
    (*rank, name, prefix.to_string())
}

/// Files of the broker and the files each imports.
fn graph() -> (
    BTreeMap<PathBuf, Vec<String>>,
    BTreeMap<PathBuf, BTreeSet<PathBuf>>,
) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    let by_path: BTreeMap<Vec<String>, PathBuf> = modules
        .iter()
        .map(|m| (m.path.clone(), m.file.clone()))
        .collect();
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for m in &modules {
        let targets = edges.entry(m.file.clone()).or_default();
        for p in paths(&code(&m.text)) {
            if let Some(to) = resolve(m, &p, &by_path) {
                if *to != m.file {
                    targets.insert(to.clone());
                }
            }
        }
    }
    let names = modules.into_iter().map(|m| (m.file, m.path)).collect();
    (names, edges)
}

/// Strongly connected components with more than one file (Tarjan).
fn cycles(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on_stack: BTreeSet<&'a PathBuf>,
        out: Vec<Vec<PathBuf>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a PathBuf) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.edges.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.out.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.out
}

#[test]
fn no_file_of_the_broker_imports_itself_back() {
    let (_, edges) = graph();
    let found = cycles(&edges);
    assert!(
        found.is_empty(),
        "import cycles between files: {found:#?}\n(every file's imports: {edges:#?})"
    );
}

#[test]
fn no_layer_imports_a_higher_one_and_the_modes_stay_apart() {
    let (names, edges) = graph();
    let mut wrong = Vec::new();
    for (from, targets) in &edges {
        let (rank, name, room) = layer(&names[from]);
        for to in targets {
            let (to_rank, to_name, to_room) = layer(&names[to]);
            if to_rank > rank {
                wrong.push(format!(
                    "{} ({name}) imports {} ({to_name}), a higher layer",
                    from.display(),
                    to.display()
                ));
            }
            let apart = PEERS
                .iter()
                .any(|&(a, b)| (room == a && to_room == b) || (room == b && to_room == a));
            if apart {
                wrong.push(format!(
                    "{} imports {}: the modes are peers",
                    from.display(),
                    to.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_imports_groups_and_cycles() {
    // Its own parsing, on a made-up file: groups expand, comments and
    // strings do not count, the test module is left out.
    let text = "use crate::a::{b, c::{d, e}};\n// crate::zzz\nlet u = \"ws://x\"; super::f(); // crate::yyy\n#[cfg(test)]\nmod tests { use crate::t; }\n";
    let found: Vec<String> = paths(&code(text)).iter().map(|p| p.join("::")).collect();
    assert_eq!(
        found,
        [
            "crate::a::b",
            "crate::a::c::d",
            "crate::a::c::e",
            "super::f"
        ]
    );
    let edge = |a: &str, b: &str| (PathBuf::from(a), BTreeSet::from([PathBuf::from(b)]));
    let looped = BTreeMap::from([edge("x.rs", "y.rs"), edge("y.rs", "x.rs")]);
    assert_eq!(cycles(&looped).len(), 1);
}

#[test]
fn the_module_map_in_lib_rs_names_every_file_and_only_files_that_exist() {
    let (names, _) = graph();
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read lib.rs");
    // The map's entries: "//! - `path.rs`: ...".
    let listed: BTreeSet<PathBuf> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//! - `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(path, _)| PathBuf::from(path))
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    let files: BTreeSet<PathBuf> = names
        .keys()
        .filter(|f| **f != Path::new("lib.rs"))
        .cloned()
        .collect();
    let unlisted: Vec<_> = files.difference(&listed).collect();
    let gone: Vec<_> = listed.difference(&files).collect();
    assert!(
        unlisted.is_empty() && gone.is_empty(),
        "src/lib.rs's map misses {unlisted:?} and names files that do not exist: {gone:?}"
    );
}
