//! A shared node's attacks on what renv stores, played against the real binary: a zip
//! swapped between hashing and unpacking, and a zip whose central directory would cost
//! more memory than its caps allow.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::common::{Workspace, assert_success, list_dir, raw_zip};

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

/// A ZIP64 archive whose end records claim `entries`; its one real file makes it
/// otherwise well formed.
fn zip_claiming(entries: u64) -> Vec<u8> {
    let zip = raw_zip::build(&[raw_zip::file("a.txt", b"a")]);
    let (body, eocd) = zip.split_at(zip.len() - 22);
    let mut out = body.to_vec();
    let end64 = out.len() as u64;
    out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
    out.extend_from_slice(&44u64.to_le_bytes());
    out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&entries.to_le_bytes());
    out.extend_from_slice(&entries.to_le_bytes());
    out.extend_from_slice(&u64::from(u32::from_le_bytes(eocd[12..16].try_into().unwrap())).to_le_bytes());
    out.extend_from_slice(&u64::from(u32::from_le_bytes(eocd[16..20].try_into().unwrap())).to_le_bytes());
    out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&end64.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&[0xff; 12]);
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn assert_nothing_stored(ws: &Workspace) {
    assert!(
        ws.committed_packages().is_empty(),
        "{:?}",
        ws.committed_packages()
    );
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
    assert!(aliases(&ws.store()).is_empty());
}

/// The entry cap holds before the central directory is parsed (parsing is what costs
/// memory: 2 M entries took 435 MB before they were counted), for a real directory over
/// the cap and for a claim of 2^32 entries alike.
#[test]
fn a_zip_declaring_more_entries_than_the_cap_is_refused_before_it_is_parsed() {
    let ws = Workspace::new();
    for i in 0..300 {
        ws.write(&format!("many/f{i:03}.txt"), format!("{i}"));
    }
    ws.package_zip("many", "many.zip");
    let spec = ws.spec("many.json", &json!({"working_dir": "many.zip"}));
    let (code, stderr) = ws.build_fails(&spec, &["--max-zip-entries", "100"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("many.zip: 300 entries, more than the limit of 100"),
        "{stderr}"
    );
    assert_nothing_stored(&ws);

    std::fs::write(ws.path("claims.zip"), zip_claiming(1 << 32)).unwrap();
    let spec = ws.spec("claims.json", &json!({"working_dir": "claims.zip"}));
    let (code, stderr) = ws.build_fails(&spec, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("claims.zip: 4294967296 entries, more than the limit of 200000"),
        "{stderr}"
    );
    assert_nothing_stored(&ws);

    // The same archive, honest about its one entry, is fine.
    std::fs::write(ws.path("honest.zip"), zip_claiming(1)).unwrap();
    let spec = ws.spec("honest.json", &json!({"working_dir": "honest.zip"}));
    assert_eq!(ws.build(&spec)["package"]["files"], 1);
}
