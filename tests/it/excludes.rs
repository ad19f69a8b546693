//! Ray's exclude semantics: gitignore patterns, per-directory .gitignore, default excludes.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::json;

use crate::common::{Workspace, tree_listing};

fn files_in_store(ws: &Workspace, spec: serde_json::Value) -> BTreeSet<String> {
    let path = ws.spec("env.json", &spec);
    let built = ws.build(&path);
    tree_listing(Path::new(built["working_dir"].as_str().unwrap()))
        .into_iter()
        .filter(|p| !p.ends_with('/'))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn write_tree(ws: &Workspace) {
    for path in [
        "proj/a.py",
        "proj/top.txt",
        "proj/sub/top.txt",
        "proj/b.log",
        "proj/keep.log",
        "proj/data/x.csv",
        "proj/data/sub/y.csv",
        "proj/build/out.txt",
        "proj/src/build/z.py",
        "proj/src/t.tmp",
        "proj/src/important.tmp",
        "proj/c.bak",
        "proj/src/c.bak",
        "proj/nested/secret/k",
        "proj/nested/public/p",
        "proj/.git/config",
        "proj/.venv/bin/python",
        "proj/venv/lib/x.py",
        "proj/__pycache__/m.pyc",
        "proj/src/__pycache__/n.pyc",
        "proj/.hidden",
    ] {
        ws.write(path, path);
    }
    ws.write("proj/.gitignore", "*.bak\n");
    ws.write("proj/src/.gitignore", "*.tmp\n!important.tmp\n");
    ws.write("proj/nested/.gitignore", "secret/\n");
}

#[test]
fn excludes_and_gitignores_follow_git_semantics() {
    let ws = Workspace::new();
    write_tree(&ws);
    let got = files_in_store(
        &ws,
        json!({"working_dir": "proj", "excludes": ["*.log", "!keep.log", "build/", "data/sub", "/top.txt"]}),
    );
    let want = set(&[
        ".gitignore",
        ".hidden",
        "a.py",
        "data/x.csv",
        "keep.log",
        "nested/.gitignore",
        "nested/public/p",
        "src/.gitignore",
        "src/important.tmp",
        "sub/top.txt",
    ]);
    assert_eq!(got, want);
}

#[test]
fn defaults_apply_without_excludes_and_a_negation_brings_one_back() {
    let ws = Workspace::new();
    write_tree(&ws);
    let got = files_in_store(&ws, json!({"working_dir": "proj"}));
    for gone in [
        ".git/config",
        ".venv/bin/python",
        "venv/lib/x.py",
        "__pycache__/m.pyc",
        "src/__pycache__/n.pyc",
        "c.bak",
        "src/c.bak",
        "src/t.tmp",
        "nested/secret/k",
    ] {
        assert!(!got.contains(gone), "{gone} should be excluded");
    }
    for kept in [
        "b.log",
        "build/out.txt",
        "src/build/z.py",
        "data/sub/y.csv",
        "top.txt",
        "src/important.tmp",
    ] {
        assert!(got.contains(kept), "{kept} should be kept");
    }
    let with_venv = files_in_store(&ws, json!({"working_dir": "proj", "excludes": ["!venv"]}));
    assert!(with_venv.contains("venv/lib/x.py"));
    assert!(!with_venv.contains(".venv/bin/python"));
}

#[test]
fn renv_package_takes_the_same_excludes() {
    let ws = Workspace::new();
    write_tree(&ws);
    let spec = ws.spec(
        "env.json",
        &json!({"working_dir": "proj", "excludes": ["*.log", "data/"]}),
    );
    let built = ws.build(&spec);
    let out = ws
        .renv()
        .args([
            "package",
            "proj",
            "--exclude",
            "*.log",
            "--exclude",
            "data/",
            "--json",
        ])
        .output()
        .unwrap();
    crate::common::assert_success(&out);
    let packaged: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(packaged["digest"], built["package"]["digest"]);
    assert_eq!(packaged["created"], false, "already in the store from the build");
}
