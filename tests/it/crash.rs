//! A build killed with SIGKILL mid-copy leaves nothing that is ever served; the next
//! build sweeps it and succeeds.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{Workspace, list_dir, tree_listing, write_many};

/// Waits until a staging directory has content, then SIGKILLs the build.
fn kill_mid_copy(ws: &Workspace, spec: &std::path::Path) -> bool {
    let mut child = ws
        .renv()
        .args(["build", "--json", "--threads", "1"])
        .arg(spec)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let staging = ws.store_v1("staging");
    let start = Instant::now();
    loop {
        let copying = list_dir(&staging)
            .iter()
            .filter(|name| !name.ends_with(".lock"))
            .any(|name| {
                tree_listing(&staging.join(name))
                    .iter()
                    .any(|p| p.ends_with(".dat"))
            });
        if copying {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn sigkill_mid_copy_then_a_clean_build() {
    let ws = Workspace::new();
    write_many(&ws.path("proj"), 3000, 16 << 10);
    let spec = ws.spec("env.json", &json!({"working_dir": "proj"}));

    assert!(
        kill_mid_copy(&ws, &spec),
        "the build finished before it could be killed"
    );
    // The killed build left a staging dir behind, and nothing committed.
    assert!(!ws.leftovers().is_empty());
    assert!(ws.committed_packages().is_empty());
    assert!(list_dir(&ws.store_v1("meta")).is_empty());

    let built = ws.build(&spec);
    assert_eq!(built["package"]["created"], true);
    assert!(ws.leftovers().is_empty(), "swept: {:?}", ws.leftovers());
    assert_eq!(ws.committed_packages().len(), 1);
    let wd = std::path::Path::new(built["working_dir"].as_str().unwrap());
    assert_eq!(tree_listing(wd), tree_listing(&ws.path("proj")));
}

#[test]
fn sigkill_mid_unpack_then_a_clean_build() {
    let ws = Workspace::new();
    write_many(&ws.path("proj"), 3000, 16 << 10);
    ws.package_zip("proj", "proj.zip");
    let spec = ws.spec("env.json", &json!({"working_dir": "proj.zip"}));

    assert!(
        kill_mid_copy(&ws, &spec),
        "the build finished before it could be killed"
    );
    assert!(ws.committed_packages().is_empty());
    let built = ws.build(&spec);
    assert_eq!(built["package"]["created"], true);
    assert!(ws.leftovers().is_empty(), "swept: {:?}", ws.leftovers());
    let wd = std::path::Path::new(built["working_dir"].as_str().unwrap());
    assert_eq!(tree_listing(wd), tree_listing(&ws.path("proj")));
}

/// A sweep at startup takes only dead builders' staging dirs, never a live one's.
#[test]
fn a_sweep_leaves_a_live_build_alone() {
    let ws = Workspace::new();
    write_many(&ws.path("proj"), 3000, 16 << 10);
    let spec = ws.spec("env.json", &json!({"working_dir": "proj"}));
    let other = ws.spec("other.json", &json!({"env_vars": {"A": "1"}}));
    let slow = ws
        .renv()
        .args(["build", "--json", "--threads", "1"])
        .arg(&spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let staging = ws.store_v1("staging");
    let start = Instant::now();
    while !list_dir(&staging).iter().any(|n| !n.ends_with(".lock")) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the build never staged"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Several processes open (and so sweep) the store while the build is staging.
    for _ in 0..5 {
        ws.build(&other);
    }
    let out = slow.wait_with_output().unwrap();
    crate::common::assert_success(&out);
    let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let wd = std::path::Path::new(built["working_dir"].as_str().unwrap());
    assert_eq!(tree_listing(wd), tree_listing(&ws.path("proj")));
    assert!(ws.leftovers().is_empty());
}
