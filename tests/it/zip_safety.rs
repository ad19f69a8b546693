//! A shared node's attacks on what renv stores, played against the real binary: a zip
//! swapped between hashing and unpacking.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use crate::common::{Workspace, assert_success, list_dir};

/// `renv package PATH --json` against `store`, whatever its outcome.
fn package_output(ws: &Workspace, store: &Path, path: &str) -> Output {
    ws.renv()
        .env("RENV_STORE", store)
        .args(["package", path, "--json", "--threads", "4"])
        .output()
        .unwrap()
}

/// `renv package PATH --json` against `store`, which must succeed: the digest it prints.
fn package(ws: &Workspace, store: &Path, path: &str) -> String {
    let out = package_output(ws, store, path);
    assert_success(&out);
    printed_digest(&out)
}

fn printed_digest(out: &Output) -> String {
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    printed["digest"].as_str().unwrap().to_string()
}

/// Every zip alias in `store`: (digest of the zip's bytes, package it vouches for).
fn aliases(store: &Path) -> Vec<(String, String)> {
    let meta = store.join("store-v1/meta");
    list_dir(&meta)
        .into_iter()
        .filter_map(|name| {
            let zip = name.strip_prefix("zip-")?.strip_suffix(".json")?.to_string();
            let alias: Value = serde_json::from_slice(&std::fs::read(meta.join(&name)).unwrap()).unwrap();
            Some((zip, alias["package"].as_str().unwrap().to_string()))
        })
        .collect()
}

fn zip_digest(path: &Path) -> String {
    renv::digest::Digest::of(&std::fs::read(path).unwrap()).to_string()
}

/// `p.zip` is a symlink flipped between two zips as fast as a thread can rename, while
/// `renv` stores it again and again, each time in a fresh store. Every alias recorded
/// must vouch for what the zip with those bytes unpacks to alone: renv opened the old
/// path once to hash and again (per thread) to unpack, and stored B's tree as A's.
#[test]
fn a_zip_swapped_while_it_is_stored_never_aliases_the_other_tree() {
    let ws = Workspace::new();
    // Same names and sizes, different bytes, a few hundred files: the unpack takes a while.
    for (dir, tag) in [("a", 'A'), ("b", 'B')] {
        for i in 0..400 {
            let body = format!("{tag} {i:04}\n").repeat(40);
            ws.write(&format!("{dir}/d{:02}/f{i:03}.txt", i % 20), body);
        }
        ws.package_zip(dir, &format!("{dir}.zip"));
    }
    let reference = ws.path("reference");
    let expected: Vec<(String, String)> = ["a.zip", "b.zip"]
        .iter()
        .map(|zip| (zip_digest(&ws.path(zip)), package(&ws, &reference, zip)))
        .collect();
    assert_ne!(expected[0].1, expected[1].1);
    let mut reference_aliases = aliases(&reference);
    reference_aliases.sort();
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(reference_aliases, sorted, "each zip alone gets its own alias");

    std::os::unix::fs::symlink("a.zip", ws.path("p.zip")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, dir) = (Arc::clone(&stop), ws.dir.path().to_path_buf());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let target = if swaps.is_multiple_of(2) { "b.zip" } else { "a.zip" };
                let _ = std::fs::remove_file(dir.join("p.next"));
                if std::os::unix::fs::symlink(target, dir.join("p.next")).is_ok()
                    && std::fs::rename(dir.join("p.next"), dir.join("p.zip")).is_ok()
                {
                    swaps += 1;
                }
            }
            swaps
        })
    };
    // Nothing in this loop may panic: the swapper must be stopped.
    let runs: Vec<(PathBuf, Output)> = (0..40)
        .map(|run| {
            let store = ws.path(&format!("stores/{run}"));
            let out = package_output(&ws, &store, "p.zip");
            (store, out)
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 40, "the link was swapped throughout ({swaps} swaps)");

    // What matters first: no alias vouches for another zip's tree (a failed run too).
    for (store, _) in &runs {
        for (zip, package) in aliases(store) {
            let want = expected
                .iter()
                .find(|(digest, _)| *digest == zip)
                .unwrap_or_else(|| panic!("{}: an alias for bytes of neither zip: {zip}", store.display()));
            assert_eq!(
                package,
                want.1,
                "{}: zip {zip} is aliased to another tree",
                store.display()
            );
        }
    }
    // And every run stored one of the two trees, the one it aliased.
    for (store, out) in &runs {
        assert_success(out);
        let found = aliases(store);
        assert_eq!(
            found.len(),
            1,
            "{}: one zip, one alias: {found:?}",
            store.display()
        );
        assert_eq!(printed_digest(out), found[0].1, "{}", store.display());
    }
}
