//! The repository's shape, checked: one job per file (README.md, "Architecture") only holds
//! if files stay small, functions stay short and no two files need each other.
//!
//! - no file under `src/` has more than [`MAX_FILE_LINES`] lines outside its
//!   `#[cfg(test)]` module;
//! - no production function is longer than [`MAX_FN_LINES`] lines;
//! - no cycle of uses between files: file A uses file B when A names an item defined in B
//!   (through a `use`, or a `crate::`/`super::`/`self::` path in code); a `pub use`
//!   re-export is followed to the file that defines the item and is not itself a use.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 100;

/// A source file: its module path (`["cow", "engine"]`) and its production text.
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    /// Whether it is a module root (`mod.rs`, `lib.rs`): its children are its submodules.
    is_root: bool,
    /// The text before its `#[cfg(test)]` module, with comments and literals blanked.
    code: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The lines before the first `#[cfg(test)]` that opens a module (the unit tests).
fn production_part(text: &str) -> &str {
    let mut offset = 0;
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" {
            let next = lines.peek().map_or("", |l| l.trim_start());
            if next.starts_with("mod ") || next.starts_with("pub mod ") {
                return &text[..offset];
            }
        }
        offset += line.len();
    }
    text
}

/// `text` with comments, string and char literals replaced by spaces (line breaks kept), so
/// braces and paths can be found by scanning.
fn blank_non_code(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied().unwrap_or(0);
        if c == b'/' && next == b'/' {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && next == b'*' {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == b'r' && (next == b'"' || next == b'#') && !ident_byte(b, i) {
            // Raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let end = b[j + 1..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| j + 1 + p + close.len());
            for &x in &b[i..end] {
                blank(&mut out, x);
            }
            i = end;
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' && (next == b'\\' || b.get(i + 2) == Some(&b'\'')) {
            // A char literal (a lifetime has no closing quote after one character).
            out.push(b' ');
            i += 1;
            if b.get(i) == Some(&b'\\') {
                out.push(b' ');
                i += 1;
            }
            while i < b.len() && b[i] != b'\'' {
                out.push(b' ');
                i += 1;
            }
            out.push(b' ');
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out)
        .expect("blanking keeps UTF-8 (multi-byte chars are copied or blanked whole)")
}

fn ident_byte(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

fn load(src: &Path) -> Vec<SourceFile> {
    let mut paths = Vec::new();
    rust_files(src, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "main.rs"))
        .map(|path| {
            let rel = path.strip_prefix(src).expect("under src/");
            let mut module: Vec<String> = rel
                .with_extension("")
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            let is_root = matches!(module.last().map(String::as_str), Some("mod" | "lib"));
            if is_root {
                module.pop();
            }
            let text = fs::read_to_string(&path).expect("read a source file");
            let code = blank_non_code(production_part(&text));
            SourceFile {
                path,
                module,
                is_root,
                code,
            }
        })
        .collect()
}

#[test]
fn no_file_is_longer_than_the_limit() {
    let mut too_long = Vec::new();
    for f in load(Path::new("src")) {
        let n = f.code.lines().count();
        if n > MAX_FILE_LINES {
            too_long.push(format!("{}: {n} lines", f.path.display()));
        }
    }
    assert!(
        too_long.is_empty(),
        "production code over {MAX_FILE_LINES} lines: {too_long:#?}"
    );
}

/// Every `fn` in `code` with its name and length in lines (signature to closing brace).
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some(at) = find_word(line, "fn") else {
            continue;
        };
        let name: String = line[at + 2..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue; // `fn(` types
        }
        // The body opens at the first `{` before any `;` (a declaration without a body ends
        // at `;`).
        let mut depth = 0i64;
        let mut opened = false;
        'scan: for (n, l) in lines.iter().enumerate().skip(start) {
            let from = if n == start { at } else { 0 };
            for ch in l[from..].chars() {
                match ch {
                    ';' if !opened => break 'scan,
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => {
                        depth -= 1;
                        if opened && depth == 0 {
                            found.push((name.clone(), start + 1, n - start + 1));
                            break 'scan;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    found
}

/// Byte index of `word` standing alone in `line`.
fn find_word(line: &str, word: &str) -> Option<usize> {
    let b = line.as_bytes();
    let mut from = 0;
    while let Some(p) = line[from..].find(word) {
        let i = from + p;
        let before = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        let after = b
            .get(i + word.len())
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || *c == b'_'));
        if before && after {
            return Some(i);
        }
        from = i + word.len();
    }
    None
}

#[test]
fn no_function_is_longer_than_the_limit() {
    let mut too_long = Vec::new();
    for f in load(Path::new("src")) {
        for (name, line, len) in functions(&f.code) {
            if len > MAX_FN_LINES {
                too_long.push(format!("{}:{line} {name}: {len} lines", f.path.display()));
            }
        }
    }
    assert!(
        too_long.is_empty(),
        "functions over {MAX_FN_LINES} lines: {too_long:#?}"
    );
}

/// The paths one `use` tree names, braces expanded: `a::{b, c::{d}}` -> `a::b`, `a::c::d`.
/// An alias stays in the path (`a::b as c`).
fn expand_use(tree: &str) -> Vec<String> {
    let tree = normalize(tree);
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut last) = (0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[last..i]);
                last = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[last..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            expand_use(p).into_iter().map(move |s| {
                if s == "self" {
                    prefix.trim_end_matches("::").to_string()
                } else {
                    format!("{prefix}{s}")
                }
            })
        })
        .collect()
}

/// `tree` with white space removed except single spaces between words (`a :: b as c` ->
/// `a::b as c`).
fn normalize(tree: &str) -> String {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut pending_space = false;
    for c in tree.chars() {
        if c.is_whitespace() {
            pending_space = true;
            continue;
        }
        if pending_space && word(c) && out.chars().last().is_some_and(word) {
            out.push(' ');
        }
        pending_space = false;
        out.push(c);
    }
    out
}

/// The path of a `use` path without its alias.
fn unaliased(path: &str) -> (String, Option<String>) {
    match path.split_once(" as ") {
        Some((p, a)) => (p.to_string(), Some(a.to_string())),
        None => (path.to_string(), None),
    }
}

/// The `use` statements of `code`: (is a `pub use` re-export, the tree after `use`).
fn use_statements(code: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(p) = find_word(rest, "use") {
        let before = rest[..p].trim_end();
        let is_pub = before.ends_with("pub") || before.ends_with(')') && before.contains("pub(");
        let stmt_end = rest[p..].find(';').map_or(rest.len(), |e| p + e);
        let line_start = rest[..p].rfind('\n').map_or(0, |n| n + 1);
        // Only statements: `use` first on its line after an optional visibility.
        let lead = rest[line_start..p].trim();
        if lead.is_empty() || lead.starts_with("pub") {
            out.push((is_pub, rest[p + 3..stmt_end].trim().to_string()));
        }
        rest = &rest[stmt_end.min(rest.len())..];
        if rest.is_empty() {
            break;
        }
        rest = &rest[1..];
    }
    out
}

/// Absolute paths (`crate::a::b`) written in code outside `use` statements.
fn inline_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for start_word in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(p) = code[from..].find(start_word) {
            let i = from + p;
            let b = code.as_bytes();
            let standalone = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
            let end = code[i..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| i + e);
            if standalone {
                out.push(code[i..end].trim_end_matches(':').to_string());
            }
            from = end.max(i + 1);
        }
    }
    out
}

struct Crate {
    files: Vec<SourceFile>,
    /// Module path -> index in `files`.
    by_module: BTreeMap<Vec<String>, usize>,
    /// (module, name) -> the absolute path it re-exports.
    reexports: BTreeMap<(Vec<String>, String), Vec<String>>,
}

impl Crate {
    fn new(files: Vec<SourceFile>) -> Self {
        let by_module = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.module.clone(), i))
            .collect();
        let mut c = Crate {
            files,
            by_module,
            reexports: BTreeMap::new(),
        };
        for i in 0..c.files.len() {
            for (is_pub, tree) in use_statements(&c.files[i].code) {
                if !is_pub {
                    continue;
                }
                for path in expand_use(&tree) {
                    let (path, alias) = unaliased(&path);
                    let abs = c.absolute(i, &path);
                    let name = alias.or_else(|| abs.last().cloned()).unwrap_or_default();
                    c.reexports.insert((c.files[i].module.clone(), name), abs);
                }
            }
        }
        c
    }

    /// A path written in file `i`, made absolute (segments after `crate`); external crates
    /// give an empty path.
    fn absolute(&self, i: usize, path: &str) -> Vec<String> {
        let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let f = &self.files[i];
        // The module `self` names in this file, and its parent for `super`.
        let here = f.module.clone();
        let mut base: Vec<String> = match segs.first() {
            Some(&"crate") => Vec::new(),
            Some(&"self") => here,
            Some(&"super") => {
                let mut m = here;
                m.pop();
                m
            }
            // A sibling module named in a module root (`use backend::X` in mod.rs).
            Some(s)
                if f.is_root
                    && self
                        .by_module
                        .contains_key(&[&here[..], &[s.to_string()]].concat()) =>
            {
                let mut m = here;
                m.push(s.to_string());
                return m
                    .into_iter()
                    .chain(segs[1..].iter().map(|s| s.to_string()))
                    .collect();
            }
            _ => return Vec::new(),
        };
        let mut rest = &segs[1..];
        while rest.first() == Some(&"super") {
            base.pop();
            rest = &rest[1..];
        }
        base.extend(rest.iter().map(|s| s.to_string()));
        base
    }

    /// The file defining what absolute path `abs` names, following re-exports.
    fn defining_file(&self, abs: &[String], hops: usize) -> Option<usize> {
        if abs.is_empty() || hops > 16 {
            return None;
        }
        // The longest prefix that is a module file.
        let mut k = abs.len();
        while k > 0 && !self.by_module.contains_key(&abs[..k]) {
            k -= 1;
        }
        let module = &abs[..k];
        let file = self
            .by_module
            .get(module)
            .copied()
            .or_else(|| self.by_module.get(&Vec::new()).copied())?;
        if let Some(item) = abs.get(k) {
            if let Some(target) = self.reexports.get(&(module.to_vec(), item.clone())) {
                let mut next = target.clone();
                next.extend(abs[k + 1..].iter().cloned());
                if next != abs {
                    return self.defining_file(&next, hops + 1).or(Some(file));
                }
            }
        }
        Some(file)
    }

    /// For each file, the files it uses.
    fn edges(&self) -> Vec<BTreeSet<usize>> {
        (0..self.files.len())
            .map(|i| {
                let code = &self.files[i].code;
                let mut paths: Vec<String> = use_statements(code)
                    .into_iter()
                    .filter(|(is_pub, _)| !is_pub)
                    .flat_map(|(_, tree)| expand_use(&tree))
                    .map(|p| unaliased(&p).0)
                    .collect();
                paths.extend(inline_paths(code));
                paths
                    .iter()
                    .filter_map(|p| self.defining_file(&self.absolute(i, p), 0))
                    .filter(|&j| j != i)
                    .collect()
            })
            .collect()
    }
}

/// Strongly connected components with more than one file (Tarjan).
fn cycles(edges: &[BTreeSet<usize>]) -> Vec<Vec<usize>> {
    struct T<'a> {
        edges: &'a [BTreeSet<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(t: &mut T<'_>, v: usize) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for &w in t.edges[v].iter() {
            match t.index[w] {
                None => {
                    visit(t, w);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(iw) if t.on[w] => t.low[v] = t.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                t.out.push(scc);
            }
        }
    }
    let n = edges.len();
    let mut t = T {
        edges,
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_two_files_need_each_other() {
    let krate = Crate::new(load(Path::new("src")));
    let edges = krate.edges();
    let name = |i: usize| krate.files[i].path.display().to_string();
    let found: Vec<Vec<String>> = cycles(&edges)
        .into_iter()
        .map(|scc| {
            scc.iter()
                .map(|&i| {
                    let uses: Vec<String> = edges[i]
                        .iter()
                        .filter(|j| scc.contains(j))
                        .map(|&j| name(j))
                        .collect();
                    format!("{} uses {}", name(i), uses.join(", "))
                })
                .collect()
        })
        .collect();
    assert!(found.is_empty(), "import cycles: {found:#?}");
}

#[test]
fn the_checker_sees_what_it_checks() {
    // The scanners themselves, on known input.
    let code = blank_non_code("fn a() {\n    let s = \"{\"; // }\n    let c = '{';\n}\n");
    assert_eq!(functions(&code), vec![("a".to_string(), 1, 4)]);
    assert_eq!(
        expand_use("crate::a::{b, c::{d, self}}"),
        vec!["crate::a::b", "crate::a::c::d", "crate::a::c"]
    );
    assert_eq!(
        production_part("fn x() {}\n#[cfg(test)]\nmod tests {}\n"),
        "fn x() {}\n"
    );
    let files = vec![
        SourceFile {
            path: "a.rs".into(),
            module: vec!["a".into()],
            is_root: false,
            code: "use crate::b::B;\n".into(),
        },
        SourceFile {
            path: "b.rs".into(),
            module: vec!["b".into()],
            is_root: false,
            code: "fn f() { crate::a::g(); }\n".into(),
        },
    ];
    let krate = Crate::new(files);
    assert_eq!(cycles(&krate.edges()).len(), 1, "a <-> b is a cycle");
}

/// README.md's "Architecture" section names every production file under `src/` (by its file
/// name in backquotes, or its path), so the section stays true as files are added. The crate
/// roots and the test kit (compiled only for tests) are exempt.
#[test]
fn the_architecture_section_names_every_file() {
    let readme = fs::read_to_string("README.md").expect("read README.md");
    let section = readme
        .split("\n## Architecture")
        .nth(1)
        .expect("README.md has an Architecture section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut files = Vec::new();
    rust_files(Path::new("src"), &mut files);
    let mut unnamed: Vec<String> = files
        .iter()
        .filter(|p| !p.starts_with("src/testkit"))
        .filter(|p| !matches!(p.to_str(), Some("src/lib.rs" | "src/main.rs")))
        .filter(|p| !declared_for_tests_only(p))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let path = p.to_str().unwrap_or_default();
            !section.contains(&format!("`{name}`")) && !section.contains(path)
        })
        .map(|p| p.display().to_string())
        .collect();
    unnamed.sort();
    assert!(
        unnamed.is_empty(),
        "README.md's Architecture section does not name: {unnamed:?}"
    );
}

/// Whether `file`'s module is declared `#[cfg(test)] mod NAME;` in its parent (`mod.rs` of its
/// folder, or `lib.rs`): test fixtures, not part of the architecture.
fn declared_for_tests_only(file: &Path) -> bool {
    let Some(name) = file.file_stem().and_then(|n| n.to_str()) else {
        return false;
    };
    let dir = file.parent().unwrap_or(Path::new("src"));
    let parent = if dir == Path::new("src") {
        dir.join("lib.rs")
    } else {
        dir.join("mod.rs")
    };
    let text = fs::read_to_string(parent).unwrap_or_default();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines.windows(2).any(|w| {
        w[0] == "#[cfg(test)]"
            && (w[1] == format!("mod {name};") || w[1] == format!("pub mod {name};"))
    })
}
