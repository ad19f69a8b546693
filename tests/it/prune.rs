//! `renv ls` and `renv prune`: LRU eviction that never touches an entry in use.

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::common::{Workspace, assert_success};

/// Three packages, last used 3 days, 2 days and 1 day ago.
fn three_packages(ws: &Workspace) -> Vec<String> {
    let mut digests = Vec::new();
    for (i, days) in [(0, 3), (1, 2), (2, 1)] {
        ws.write(&format!("p{i}/data"), vec![b'x'; 1000 * (i + 1)]);
        let built = ws.build(&ws.spec(&format!("p{i}.json"), &json!({"working_dir": format!("p{i}")})));
        let digest = built["package"]["digest"].as_str().unwrap().to_string();
        let marker = ws.store_v1("meta").join(format!("pkg-{digest}.json"));
        let then = SystemTime::now() - Duration::from_secs(days * 86_400);
        std::fs::File::options()
            .write(true)
            .open(marker)
            .unwrap()
            .set_modified(then)
            .unwrap();
        digests.push(digest);
    }
    digests
}

fn prune(ws: &Workspace, args: &[&str]) -> Value {
    let out = ws.renv().args(["prune", "--json"]).args(args).output().unwrap();
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn prune_evicts_least_recently_used_first() {
    let ws = Workspace::new();
    let d = three_packages(&ws);
    // Over a 4000-byte budget (6000 in all): the two least recently used go.
    let dry = prune(&ws, &["--max-size", "4000", "--min-age", "0s", "--dry-run"]);
    assert_eq!(ids(&dry["removed"]), vec![d[0].clone(), d[1].clone()]);
    assert_eq!(ws.committed_packages().len(), 3, "a dry run removes nothing");
    let report = prune(&ws, &["--max-size", "4000", "--min-age", "0s"]);
    assert_eq!(ids(&report["removed"]), vec![d[0].clone(), d[1].clone()]);
    assert_eq!(report["bytes_freed"], 3000);
    assert_eq!(ws.committed_packages(), vec![d[2].clone()]);
    assert!(ws.leftovers().is_empty());
    // What was pruned is rebuilt on the next request.
    let again = ws.build(&ws.path("p0.json"));
    assert_eq!(again["package"]["created"], true);
}

#[test]
fn older_than_and_min_age() {
    let ws = Workspace::new();
    let d = three_packages(&ws);
    let report = prune(&ws, &["--older-than", "36h", "--min-age", "0s"]);
    assert_eq!(ids(&report["removed"]), vec![d[0].clone(), d[1].clone()]);
    // Everything is younger than the default --min-age: nothing goes, and it says why.
    let ws = Workspace::new();
    three_packages(&ws);
    let report = prune(&ws, &["--max-size", "0"]);
    assert!(report["removed"].as_array().unwrap().is_empty());
    assert!(
        report["kept"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["reason"] == "younger than --min-age")
    );
}

#[test]
fn a_future_timestamp_does_not_make_an_entry_immortal() {
    let ws = Workspace::new();
    let d = three_packages(&ws);
    let marker = ws.store_v1("meta").join(format!("pkg-{}.json", d[2]));
    let future = SystemTime::now() + Duration::from_secs(365 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(marker)
        .unwrap()
        .set_modified(future)
        .unwrap();
    prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    assert!(ws.committed_packages().is_empty());
}

#[test]
fn entries_in_use_are_kept_and_listed_with_their_holders() {
    let ws = Workspace::new();
    let d = three_packages(&ws);
    let mut holder = ws
        .renv()
        .args(["run"])
        .arg(ws.path("p0.json"))
        .args(["--", "sh", "-c", "echo ready; sleep 30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();

    let ls = ws.renv().args(["ls", "--json"]).output().unwrap();
    assert_success(&ls);
    let ls: Value = serde_json::from_slice(&ls.stdout).unwrap();
    let held = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == d[0].as_str())
        .unwrap();
    assert_eq!(held["holders"], json!([holder.id()]));
    assert_eq!(held["kind"], "package");
    assert!(held["source"].as_str().unwrap().starts_with("dir:"));

    let report = prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    assert_eq!(ids(&report["removed"]), vec![d[1].clone(), d[2].clone()]);
    let kept = &report["kept"][0];
    assert_eq!(kept["id"], d[0].as_str());
    assert!(kept["reason"].as_str().unwrap().starts_with("in use"), "{kept}");
    assert_eq!(ws.committed_packages(), vec![d[0].clone()]);
    holder.kill().unwrap();
    holder.wait().unwrap();
    prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    assert!(
        ws.committed_packages().is_empty(),
        "the lease went with its holder"
    );
}

#[test]
fn a_second_prune_says_one_is_already_running() {
    let ws = Workspace::new();
    three_packages(&ws);
    let lock = std::fs::File::create(ws.store_v1("locks").join("prune.lock")).unwrap();
    lock.lock().unwrap();
    let out = ws
        .renv()
        .args(["prune", "--max-size", "0", "--min-age", "0s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another renv prune is already running"));
    assert_eq!(ws.committed_packages().len(), 3);
}
