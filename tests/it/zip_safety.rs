//! A shared node's attacks on what renv stores: a zip swapped between hashing and
//! unpacking, a zip whose central directory would cost more memory than its caps allow,
//! and a stat cache forged by another user. Each is played against the real binary.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Workspace, assert_success, list_dir, mode_of, raw_zip, set_mode};

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

/// Root builds a tree, so its stat cache is recorded. Another user who may write the
/// cache directory (a group-shared store) renames over it a cache forged from another
/// tree's: the victim's files, by their real stats, "contain" the other tree's bytes.
/// The victim's next build must hash its real files and get its real tree.
#[test]
fn a_hash_cache_forged_by_another_user_is_not_believed() {
    let ws = Workspace::new();
    // Same names and sizes: the forged digests make exactly the other tree's manifest,
    // which is in the store, so believing the cache would hand over that tree.
    for (tree, word) in [("victim", "honest"), ("other", "forged")] {
        ws.write(&format!("{tree}/main.py"), format!("print('{word}')\n"));
        ws.write(&format!("{tree}/lib/util.py"), format!("WHO = '{word}'\n"));
    }
    // Files younger than the racy margin are not cached; let them age.
    std::thread::sleep(Duration::from_millis(1100));
    let store = ws.store();
    let other = package(&ws, &store, "other");
    let real = package(&ws, &store, "victim");
    assert_eq!(real, package(&ws, &ws.path("fresh"), "victim"));
    assert_ne!(real, other);

    let hashes = ws.store_v1("cache/hashes");
    let cache_of = |tree: &str| -> PathBuf {
        let root = std::fs::canonicalize(ws.path(tree)).unwrap();
        renv::package::hash_cache::HashCache::path_for(&hashes, &root)
    };
    use renv::package::hash_cache::{decode, encode};
    let read = |path: &Path| decode(&std::fs::read(path).unwrap()).expect("a well-formed cache");
    let (victim_cache, other_cache) = (read(&cache_of("victim")), read(&cache_of("other")));
    let mut forged = victim_cache.clone();
    for entry in &mut forged {
        let other = other_cache.iter().find(|o| o.rel == entry.rel).unwrap();
        entry.digest = other.digest;
    }
    assert_ne!(forged, victim_cache, "the forgery changes the digests");
    std::fs::write(ws.path("forged.json"), encode(&forged)).unwrap();

    // For the forgery, uid 1000 may reach and write the cache directory (as a member of
    // a group-shared store could); the modes are put back before the victim's build,
    // leaving only the forged file behind.
    let opened: Vec<(PathBuf, u32)> = [
        (ws.dir.path().to_path_buf(), 0o711),
        (store.clone(), 0o711),
        (ws.store_v1(""), 0o711),
        (ws.store_v1("cache"), 0o711),
        (hashes.clone(), 0o777),
    ]
    .into_iter()
    .map(|(dir, mode)| {
        let was = mode_of(&dir);
        set_mode(&dir, mode);
        (dir, was)
    })
    .collect();
    let target = cache_of("victim");
    let out = Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups"])
        .args(["sh", "-c", r#"cp "$1" "$2.new" && mv -f "$2.new" "$2""#, "forge"])
        .arg(ws.path("forged.json"))
        .arg(&target)
        .output()
        .expect("setpriv");
    for (dir, mode) in opened {
        set_mode(&dir, mode);
    }
    assert_success(&out);
    assert_eq!(
        std::fs::metadata(&target).unwrap().uid(),
        1000,
        "the forgery is in place"
    );

    let spec = ws.spec("env.json", &json!({"working_dir": "victim"}));
    let built = ws.build(&spec);
    assert_eq!(built["package"]["digest"], real.as_str());
    let working_dir = Path::new(built["working_dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(working_dir.join("main.py")).unwrap(),
        "print('honest')\n"
    );
}
