//! The shape of the code, checked so it stays easy to enter: no dependency
//! cycle between the agent's modules (at any level of the module tree),
//! and no source file longer than a reader can hold.
//!
//! The module graph is read from the sources with `syn`: every `use` of
//! `crate::…`, `super::…` or `self::…` and every such path in code, outside
//! `#[cfg(test)]` items, is an edge to the longest module prefix it names.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Module path (`["proxy", "http"]`) → the modules its code names.
type Graph = BTreeMap<Vec<String>, BTreeSet<Vec<String>>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/proxy/http.rs` → `["proxy", "http"]`; `lib.rs` is the root.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts == ["lib"] { Vec::new() } else { parts }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// Collects the `crate`/`super`/`self` paths a file names.
struct Paths {
    found: Vec<Vec<String>>,
}

impl Paths {
    fn use_tree(&mut self, prefix: Vec<String>, t: &syn::UseTree) {
        match t {
            syn::UseTree::Path(p) => {
                let mut next = prefix;
                next.push(p.ident.to_string());
                self.use_tree(next, &p.tree);
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix;
                full.push(n.ident.to_string());
                self.found.push(full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix;
                full.push(r.ident.to_string());
                self.found.push(full);
            }
            syn::UseTree::Glob(_) => self.found.push(prefix),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix.clone(), t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item(&mut self, i: &'ast syn::Item) {
        let attrs = match i {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(x) => &x.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Enum(e) => &e.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            _ => return syn::visit::visit_item(self, i),
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_item(self, i);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segs.len() > 1 {
            self.found.push(segs);
        }
        syn::visit::visit_path(self, p);
    }
}

/// Modules declared `#[cfg(test)] mod name;` (their own files): test code,
/// which may use anything, is not part of the graph.
fn test_only_modules(src: &Path, files: &[PathBuf]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for f in files {
        let here = module_of(src, f);
        let file = syn::parse_file(&std::fs::read_to_string(f).unwrap()).unwrap();
        for item in &file.items {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
                && is_cfg_test(&m.attrs)
            {
                let mut p = here.clone();
                p.push(m.ident.to_string());
                out.push(p);
            }
        }
    }
    out
}

/// The agent's module graph.
fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // `main.rs` is the binary, not a module of the library.
    files.retain(|f| f.file_name().is_some_and(|n| n != "main.rs"));
    let test_only = test_only_modules(&src, &files);
    assert!(
        test_only.iter().any(|m| m == &["testing"]),
        "the test fixtures module is declared #[cfg(test)]: {test_only:?}"
    );
    files.retain(|f| {
        let m = module_of(&src, f);
        !test_only.iter().any(|t| m.starts_with(t))
    });
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
    assert!(
        modules.len() > 40,
        "found only {} modules under {}",
        modules.len(),
        src.display()
    );
    let mut g = Graph::new();
    for f in &files {
        let here = module_of(&src, f);
        let text = std::fs::read_to_string(f).unwrap();
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut v = Paths { found: Vec::new() };
        v.visit_file(&file);
        let deps = g.entry(here.clone()).or_default();
        for p in v.found {
            let mut abs = match p[0].as_str() {
                "crate" => Vec::new(),
                "super" => here[..here.len().saturating_sub(1)].to_vec(),
                "self" => here.clone(),
                _ => continue,
            };
            let mut rest = &p[1..];
            // `super::super::…`
            while rest.first().is_some_and(|s| s == "super") {
                abs.pop();
                rest = &rest[1..];
            }
            abs.extend(rest.iter().cloned());
            // The longest prefix that is a module.
            let target = (0..=abs.len())
                .rev()
                .map(|n| abs[..n].to_vec())
                .find(|m| modules.contains(m) || m.is_empty());
            if let Some(t) = target
                && !t.is_empty()
                && t != here
            {
                deps.insert(t);
            }
        }
    }
    g
}

/// Cycles among the children of `parent`: each module below `parent` is
/// counted as the child it is in.
fn cycles_below(g: &Graph, parent: &[String]) -> Vec<Vec<String>> {
    let child = |m: &Vec<String>| -> Option<String> {
        (m.len() > parent.len() && m.starts_with(parent)).then(|| m[parent.len()].clone())
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in g {
        let Some(a) = child(from) else { continue };
        for to in tos {
            if let Some(b) = child(to)
                && a != b
            {
                edges.entry(a.clone()).or_default().insert(b);
            }
        }
    }
    // Depth-first search for a back edge; report each cycle once.
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for start in edges.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((node, path)) = stack.pop() {
            for next in edges.get(&node).into_iter().flatten() {
                if next == start {
                    let mut c = path.clone();
                    c.sort();
                    if done.insert(c) {
                        cycles.push(path.clone());
                    }
                } else if !path.contains(next) && next > start {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    cycles
}

#[test]
fn no_dependency_cycle_between_modules_at_any_level() {
    let g = graph();
    let parents: BTreeSet<Vec<String>> = g
        .keys()
        .flat_map(|m| (0..m.len()).map(|n| m[..n].to_vec()))
        .collect();
    let mut found = Vec::new();
    for p in &parents {
        for c in cycles_below(&g, p) {
            let at = if p.is_empty() {
                "crate".to_owned()
            } else {
                p.join("::")
            };
            found.push(format!("{at}: {}", c.join(" → ")));
        }
    }
    assert!(
        found.is_empty(),
        "dependency cycles between modules (each arrow: the first module names the next):\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    // The check itself, on a graph with a cycle two levels down and one
    // between top-level modules.
    let m = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    let mut g = Graph::new();
    g.entry(m("proxy::http"))
        .or_default()
        .insert(m("proxy::outbound"));
    g.entry(m("proxy::outbound"))
        .or_default()
        .insert(m("proxy::http::send"));
    g.entry(m("tls")).or_default().insert(m("identity"));
    g.entry(m("identity::manager"))
        .or_default()
        .insert(m("tls"));
    assert_eq!(cycles_below(&g, &m("proxy")).len(), 1);
    assert_eq!(cycles_below(&g, &[]).len(), 1);
    assert!(cycles_below(&g, &m("proxy::http")).is_empty());
    // And the real graph has the edges it should: reading found them.
    let real = graph();
    assert!(real[&m("proxy::outbound")].contains(&m("proxy::upstream")));
    assert!(real[&m("identity::ca_client")].contains(&m("ca::protocol")));
}

/// Files that are pure type definitions (the Istio API model) may be
/// longer: they read as a reference, not as logic.
const TYPE_DEFINITIONS: &[&str] = &["mesh-agent/src/istio/networking.rs"];

#[test]
fn no_source_file_is_over_800_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for dir in ["mesh-agent", "mesh-common", "mesh-ebpf", "tests", "xtask"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 80, "found only {} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 800 && !TYPE_DEFINITIONS.contains(&rel.as_str())).then(|| format!("{rel}: {n}"))
        })
        .collect();
    assert!(
        long.is_empty(),
        "split these by concern: {}",
        long.join(", ")
    );
}

/// Every crate states its licence, and `LICENSE` explains each one (the
/// eBPF programs' licence is what they declare to the kernel).
#[test]
fn every_crate_states_its_licence() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let summary = std::fs::read_to_string(root.join("LICENSE")).expect("LICENSE");
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let workspace_licence = workspace
        .lines()
        .find_map(|l| l.strip_prefix("license = "))
        .expect("a workspace licence")
        .trim_matches('"')
        .to_owned();
    for krate in ["mesh-agent", "mesh-common", "mesh-ebpf", "tests", "xtask"] {
        let manifest = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap();
        let licence = manifest
            .lines()
            .find_map(|l| {
                if l.trim() == "license.workspace = true" {
                    Some(workspace_licence.clone())
                } else {
                    l.strip_prefix("license = ")
                        .map(|v| v.trim_matches('"').to_owned())
                }
            })
            .unwrap_or_else(|| panic!("{krate}/Cargo.toml states no licence"));
        let name = if krate == "tests" {
            "mesh-tests"
        } else {
            krate
        };
        let row = summary
            .lines()
            .find(|l| l.starts_with('|') && l.contains(name.trim_start_matches("mesh-")))
            .unwrap_or_else(|| panic!("LICENSE has no row for {name}"));
        let stated = row.split('|').nth(2).map(str::trim);
        assert_eq!(stated, Some(licence.as_str()), "{name}: LICENSE says {row}");
    }
    for text in ["LICENSE-APACHE", "LICENSE-MIT", "LICENSE-GPL-2.0"] {
        assert!(root.join(text).exists(), "{text} missing");
    }
    let ebpf = std::fs::read_to_string(root.join("mesh-ebpf/src/main.rs")).unwrap();
    assert!(
        ebpf.contains("b\"Dual MIT/GPL\\0\""),
        "the programs' declared licence changed"
    );
}
