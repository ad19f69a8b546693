//! Many processes asking for the same new entry at once: one entry, every one succeeds.

use std::process::{Child, Stdio};

use serde_json::{Value, json};

use crate::common::{Workspace, write_many};

fn run_all(ws: &Workspace, spec: &std::path::Path, n: usize) -> Vec<Value> {
    let children: Vec<Child> = (0..n)
        .map(|_| {
            ws.renv()
                .args(["build", "--json"])
                .arg(spec)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            crate::common::assert_success(&out);
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect()
}

fn check_one_entry(ws: &Workspace, results: &[Value]) {
    let first = &results[0];
    for r in results {
        assert_eq!(r["env_id"], first["env_id"]);
        assert_eq!(r["working_dir"], first["working_dir"]);
    }
    let created = results.iter().filter(|r| r["package"]["created"] == true).count();
    assert_eq!(created, 1, "exactly one process builds the entry");
    assert_eq!(ws.committed_packages().len(), 1);
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}

#[test]
fn sixteen_builds_of_one_new_tree_make_one_entry() {
    let ws = Workspace::new();
    write_many(&ws.path("proj"), 400, 8192);
    let spec = ws.spec("env.json", &json!({"working_dir": "proj"}));
    let results = run_all(&ws, &spec, 16);
    check_one_entry(&ws, &results);
}

#[test]
fn sixteen_builds_of_one_new_zip_unpack_it_once() {
    let ws = Workspace::new();
    write_many(&ws.path("proj"), 400, 8192);
    ws.package_zip("proj", "proj.zip");
    let spec = ws.spec("env.json", &json!({"working_dir": "proj.zip"}));
    let results = run_all(&ws, &spec, 16);
    check_one_entry(&ws, &results);
    let unpacked = results
        .iter()
        .filter(|r| r["timings_ms"].get("unpack").is_some())
        .count();
    assert_eq!(unpacked, 1, "the zip is unpacked once");
}
