//! `renv ls` and `renv prune`: LRU eviction that never touches an entry in use.

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::common::{Workspace, assert_success, list_dir};

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
        .args(["--", "sh", "-c", "echo ready; exec sleep 30"])
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
    // `renv run` holds the lease; its command (running in the package) is found too.
    let command: u32 = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", holder.id()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut expected = vec![holder.id(), command];
    expected.sort_unstable();
    assert_eq!(held["holders"], json!(expected));
    assert_eq!(held["kind"], "package");
    assert!(held["source"].as_str().unwrap().starts_with("dir:"));

    let report = prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    assert_eq!(ids(&report["removed"]), vec![d[1].clone(), d[2].clone()]);
    let kept = &report["kept"][0];
    assert_eq!(kept["id"], d[0].as_str());
    assert!(kept["reason"].as_str().unwrap().starts_with("in use"), "{kept}");
    assert_eq!(ws.committed_packages(), vec![d[0].clone()]);
    // The command inherited the lease: killing renv alone leaves it held...
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", holder.id())).unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    assert_eq!(
        ws.committed_packages(),
        vec![d[0].clone()],
        "the command still holds it"
    );
    // ...until the command is gone too.
    for pid in children.split_whitespace() {
        // SAFETY: ending the test's own grandchild.
        unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(200));
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

#[test]
fn verify_finds_tampering_and_repair_removes_it() {
    let ws = Workspace::new();
    let d = three_packages(&ws);
    let verify = |extra: &[&str]| {
        let out = ws.renv().args(["verify", "--json"]).args(extra).output().unwrap();
        (
            out.status.code(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        )
    };
    let (code, report) = verify(&[]);
    assert_eq!((code, report["checked"].as_u64()), (Some(0), Some(3)));
    // Tamper with one entry's file (the store made it read-only; root can still write).
    let file = ws.store_v1("pkgs").join(&d[1]).join("data");
    std::fs::write(&file, "tampered").unwrap();
    let (code, report) = verify(&[]);
    assert_eq!(code, Some(1));
    assert_eq!(report["problems"][0]["id"], d[1].as_str());
    assert!(
        report["problems"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("not to its name")
    );
    assert_eq!(
        ws.committed_packages().len(),
        3,
        "without --repair nothing is removed"
    );
    let (code, report) = verify(&["--repair"]);
    assert_eq!(
        (code, report["problems"][0]["repaired"].as_bool()),
        (Some(0), Some(true))
    );
    assert_eq!(ws.committed_packages().len(), 2);
    // The next request rebuilds it from the source.
    assert_eq!(ws.build(&ws.path("p1.json"))["package"]["created"], true);
}

/// Builds and prunes SIGKILLed at random points, over and over: after each, every
/// committed entry still matches its digest, and a build then succeeds and leaves nothing.
#[test]
fn crash_loop_keeps_the_store_consistent() {
    let ws = Workspace::new();
    for t in 0..3 {
        crate::common::write_many(&ws.path(&format!("t{t}")), 150 + 50 * t, 4096);
        ws.spec(&format!("t{t}.json"), &json!({"working_dir": format!("t{t}")}));
    }
    ws.package_zip("t0", "t0.zip");
    ws.spec("zip.json", &json!({"working_dir": "t0.zip"}));
    // And a virtualenv, so installs are killed too.
    crate::common::wheelhouse(&ws.path("wheels"), &[("tinypkg", "1.0", "VERSION = '1.0'\n")]);
    ws.spec("env.json", &json!({"working_dir": "t1", "pip": ["tinypkg==1.0"]}));
    let wheels = ws.path("wheels").display().to_string();
    let index = ["--no-index", "--find-links", wheels.as_str()];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..50 {
        let spec = ["t0.json", "t1.json", "t2.json", "zip.json", "env.json"][(next() % 5) as usize];
        let mut victims = vec![
            ws.renv()
                .args(["build", "--json"])
                .args(index)
                .arg(ws.path(spec))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ];
        if i % 3 == 0 {
            let mut prune = ws.renv();
            prune
                .args(["prune", "--max-size", "0", "--min-age", "0s"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            victims.push(prune.spawn().unwrap());
        }
        std::thread::sleep(Duration::from_micros(next() % 60_000));
        for mut v in victims {
            let _ = v.kill();
            v.wait().unwrap();
        }
        let out = ws.renv().args(["verify", "--json"]).output().unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            report["problems"].as_array().unwrap().is_empty(),
            "iteration {i}: {report}"
        );
        // The marker is written last: it never vouches for a tree that is not there. (A
        // tree without its marker, from a kill between the publish and the marker, is
        // garbage that is never served and that the next prune removes.)
        for marker in list_dir(&ws.store_v1("meta")) {
            if let Some(pkg) = marker.strip_prefix("pkg-").and_then(|m| m.strip_suffix(".json")) {
                assert!(
                    ws.store_v1("pkgs").join(pkg).is_dir(),
                    "iteration {i}: the marker of {pkg} without its tree"
                );
            }
        }
    }
    for spec in ["t0.json", "t1.json", "t2.json", "zip.json", "env.json"] {
        let built = ws.build_with(&ws.path(spec), &index);
        assert!(std::path::Path::new(built["working_dir"].as_str().unwrap()).is_dir());
    }
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}

/// A real full disk: a 2 MiB tmpfs store (the suite runs as root, so it can mount one).
#[test]
fn a_full_disk_fails_the_build_cleanly_and_keeps_everything_else() {
    let ws = Workspace::new();
    let mountpoint = ws.path("small");
    let _mount = crate::common::TmpfsMount::new(&mountpoint, "2m");
    let store = mountpoint.join("store");
    let store_arg = store.to_str().unwrap();
    ws.write("tiny/x", "tiny");
    for i in 0..40 {
        ws.write(&format!("big/f{i}"), vec![i as u8; 100_000]);
    }
    let tiny = ws.build_with(
        &ws.spec("tiny.json", &json!({"working_dir": "tiny"})),
        &["--store", store_arg],
    );
    let (code, stderr) = ws.build_fails(
        &ws.spec("big.json", &json!({"working_dir": "big"})),
        &["--store", store_arg],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("copying") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    ws.package_zip("big", "big.zip");
    let (_, stderr) = ws.build_fails(
        &ws.spec("bigzip.json", &json!({"working_dir": "big.zip"})),
        &["--store", store_arg],
    );
    assert!(
        stderr.contains("unpacking") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    let v1 = store.join("store-v1");
    assert!(crate::common::list_dir(&v1.join("staging")).is_empty());
    assert!(crate::common::list_dir(&v1.join("trash")).is_empty());
    let verify = ws.renv().args(["verify", "--store", store_arg]).output().unwrap();
    assert_success(&verify);
    assert!(std::path::Path::new(tiny["working_dir"].as_str().unwrap()).is_dir());
}

#[test]
fn verify_finds_a_truncated_file_in_an_env() {
    let ws = Workspace::new();
    crate::common::wheelhouse(&ws.path("wheels"), &[("tinypkg", "1.0", "VERSION = '1.0'\n")]);
    let flags = ["--no-index", "--find-links", ws.path("wheels").to_str().unwrap()].map(String::from);
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let built = ws.build_with(&ws.spec("env.json", &json!({"pip": ["tinypkg==1.0"]})), &extra);
    let verify = || ws.renv().args(["verify", "--json"]).output().unwrap();
    assert_success(&verify());
    let init = std::process::Command::new(built["python"].as_str().unwrap())
        .args(["-c", "import tinypkg; print(tinypkg.__file__)"])
        .output()
        .unwrap();
    let init = String::from_utf8(init.stdout).unwrap().trim().to_string();
    std::fs::write(&init, "VERS").unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["problems"][0]["kind"], "env");
    assert!(
        report["problems"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("tinypkg/__init__.py"),
        "{report}"
    );
}

/// Symlinks planted in an entry, and an entry swapped for a symlink, lead prune nowhere
/// outside the store.
#[test]
fn prune_never_follows_a_symlink_out_of_the_store() {
    let ws = Workspace::new();
    let d = three_packages(&ws);
    ws.write("outside/sentinel", "keep me");
    ws.write("outside/dir/inner", "keep me too");
    // A symlink inside a committed entry (root can write into the sealed tree).
    let planted = ws.store_v1("pkgs").join(&d[0]).join("escape");
    crate::common::set_mode(&ws.store_v1("pkgs").join(&d[0]), 0o755);
    std::os::unix::fs::symlink(ws.path("outside"), &planted).unwrap();
    // And an entry replaced by a symlink to an outside directory.
    let swapped = ws.store_v1("pkgs").join(&d[1]);
    crate::common::set_mode(&swapped, 0o755);
    std::fs::remove_dir_all(&swapped).unwrap();
    std::os::unix::fs::symlink(ws.path("outside/dir"), &swapped).unwrap();

    prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    assert!(ws.committed_packages().is_empty());
    assert_eq!(
        std::fs::read_to_string(ws.path("outside/sentinel")).unwrap(),
        "keep me"
    );
    assert_eq!(
        std::fs::read_to_string(ws.path("outside/dir/inner")).unwrap(),
        "keep me too"
    );
    assert!(ws.leftovers().is_empty());
}

/// The installer's cache is pruned only while no build uses it.
#[test]
fn the_uv_cache_is_pruned_only_when_no_build_uses_it() {
    let ws = Workspace::new();
    crate::common::wheelhouse(&ws.path("wheels"), &[("tinypkg", "1.0", "VERSION = '1.0'\n")]);
    let flags = ["--no-index", "--find-links", ws.path("wheels").to_str().unwrap()].map(String::from);
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    ws.build_with(&ws.spec("env.json", &json!({"pip": ["tinypkg==1.0"]})), &extra);
    assert_eq!(prune(&ws, &[])["uv_cache"], "pruned");
    let building = std::fs::File::create(ws.store_v1("locks").join("uv-cache.lock")).unwrap();
    building.lock_shared().unwrap();
    assert_eq!(prune(&ws, &[])["uv_cache"], "skipped: a build is using it");
    // The env itself is untouched by either.
    assert_eq!(crate::common::list_dir(&ws.store_v1("envs")).len(), 1);
}

#[test]
fn old_logs_are_pruned_and_recent_ones_kept() {
    let ws = Workspace::new();
    three_packages(&ws);
    let logs = ws.store_v1("logs");
    let old = ws.write("store/store-v1/logs/workers/w000001.stdout", "old");
    let recent = ws.write("store/store-v1/logs/env-abc.log", "recent");
    let week_ago = SystemTime::now() - Duration::from_secs(8 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(week_ago)
        .unwrap();
    let report = prune(&ws, &[]);
    assert_eq!(report["logs_removed"], 1);
    assert!(!old.exists() && recent.exists());
    assert!(logs.join("workers").is_dir());
}

/// `verify` checks an env against what was built, not only against its wheels' RECORD
/// files (which whoever changes the env can rewrite): an added `.pth`, a file rewritten
/// together with its RECORD line, a mode made writable, and an unreadable marker are each
/// reported.
#[test]
fn verify_checks_envs_against_their_build_record() {
    use sha2::Digest as _;
    let ws = Workspace::new();
    crate::common::wheelhouse(&ws.path("wheels"), &[("tinypkg", "1.0", "VERSION = '1.0'\n")]);
    let flags = ["--no-index", "--find-links", ws.path("wheels").to_str().unwrap()].map(String::from);
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let built = ws.build_with(&ws.spec("env.json", &json!({"pip": ["tinypkg==1.0"]})), &extra);
    let venv = std::path::PathBuf::from(built["venv"]["path"].as_str().unwrap());
    let problem = || {
        let out = ws.renv().args(["verify", "--json"]).output().unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        match out.status.code() {
            Some(0) => None,
            _ => Some(report["problems"][0]["problem"].as_str().unwrap().to_string()),
        }
    };
    assert_eq!(problem(), None);
    let site = std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("site-packages");

    let pth = site.join("zz-planted.pth");
    std::fs::write(&pth, "import os\n").unwrap();
    let found = problem().unwrap();
    assert!(found.contains("zz-planted.pth was added"), "{found}");
    std::fs::remove_file(&pth).unwrap();

    let init = site.join("tinypkg/__init__.py");
    crate::common::set_mode(&init, 0o644);
    let found = problem().unwrap();
    assert!(
        found.contains("tinypkg/__init__.py has mode 644, built as 444"),
        "{found}"
    );
    crate::common::set_mode(&init, 0o444);

    // The module and its RECORD line rewritten to agree, as a careful attacker would.
    let planted = b"VERSION = '6.6'\n";
    std::fs::write(&init, planted).unwrap();
    let dist = std::fs::read_dir(&site)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("tinypkg-"))
        .unwrap()
        .path();
    let record = std::fs::read_to_string(dist.join("RECORD")).unwrap();
    let hash = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        sha2::Sha256::digest(planted),
    );
    let forged: String = record
        .lines()
        .map(|l| match l.starts_with("tinypkg/__init__.py,") {
            true => format!("tinypkg/__init__.py,sha256={hash},{}\n", planted.len()),
            false => format!("{l}\n"),
        })
        .collect();
    assert_ne!(forged, record);
    std::fs::write(dist.join("RECORD"), &forged).unwrap();
    let found = problem().unwrap();
    assert!(found.contains("RECORD"), "{found}");

    let marker = ws
        .store_v1("meta")
        .join(format!("env-{}.json", built["venv"]["key"].as_str().unwrap()));
    std::fs::write(&marker, "{not json").unwrap();
    let found = problem().unwrap();
    assert!(found.contains("its marker is not a valid marker"), "{found}");
}

/// Processes renv did not start and that hold no lease still keep what they use, as
/// Nix's runtime roots do: one whose working directory is in a package, one with a file of
/// another open, one naming a third in its environment (as a Ray worker started in an env
/// names it in `PATH` and `VIRTUAL_ENV`), here run as another user. `renv ls` lists them;
/// `prune --max-size 0` keeps exactly those, and removes them once the processes end.
#[test]
fn entries_used_by_processes_renv_did_not_start_are_kept() {
    let ws = Workspace::new();
    let digests = three_packages(&ws);
    ws.write("p3/data", "unused");
    let unused = ws.build(&ws.spec("p3.json", &json!({"working_dir": "p3"})))["package"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let path = |digest: &str| ws.store_v1("pkgs").join(digest);
    let mut in_cwd = std::process::Command::new("sleep")
        .arg("300")
        .current_dir(path(&digests[0]))
        .spawn()
        .unwrap();
    let mut with_open_file = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 3<{}/data; exec sleep 300",
            path(&digests[1]).display()
        ))
        .current_dir("/")
        .spawn()
        .unwrap();
    let mut named_in_env = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "300"])
        .env(
            "PATH",
            format!("{}/bin:/usr/bin:/bin", path(&digests[2]).display()),
        )
        .current_dir("/")
        .spawn()
        .unwrap();
    // The open file is opened by the shell before it becomes sleep: wait for it.
    crate::common::wait_for(
        || {
            std::fs::read_dir(format!("/proc/{}/fd", with_open_file.id()))
                .ok()?
                .filter_map(Result::ok)
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(path(&digests[1]))))
                .then_some(())
        },
        "the shell to open the file",
    );

    let out = ws.renv().args(["ls", "--json"]).output().unwrap();
    assert_success(&out);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let holders = |digest: &str| -> Vec<u64> {
        listed["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == digest)
            .unwrap()["holders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect()
    };
    assert_eq!(holders(&digests[0]), vec![in_cwd.id() as u64]);
    assert_eq!(holders(&digests[1]), vec![with_open_file.id() as u64]);
    assert_eq!(holders(&digests[2]), vec![named_in_env.id() as u64]);
    assert!(holders(&unused).is_empty());

    let report = prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    assert_eq!(ids(&report["removed"]), vec![unused.clone()]);
    for digest in &digests {
        assert!(
            path(digest).is_dir(),
            "{digest} was removed while a process used it"
        );
    }

    for child in [&mut in_cwd, &mut with_open_file, &mut named_in_env] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let report = prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    let mut removed = ids(&report["removed"]);
    removed.sort();
    let mut expected = digests.clone();
    expected.sort();
    assert_eq!(removed, expected);
}

/// A tenant may move into its bytecode cache a directory it can write but whose files the
/// sticky bit keeps it from removing: another user's world-writable drop box inside a
/// directory the tenant may write. Prune, as root, must not remove those files for it.
#[test]
fn prune_leaves_alone_another_users_directory_moved_into_a_bytecode_cache() {
    use std::os::unix::fs::chown;
    let ws = Workspace::new();
    ws.write("p/data", "x");
    ws.build(&ws.spec("p.json", &json!({"working_dir": "p"})));
    for dir in [ws.dir.path().to_path_buf(), ws.store(), ws.store_v1("")] {
        crate::common::set_mode(&dir, 0o711);
    }
    let cache = ws.store_v1("pycache/1000");
    std::fs::create_dir(&cache).unwrap();
    chown(&cache, Some(1000), Some(1000)).unwrap();
    crate::common::set_mode(&cache, 0o700);
    // uid 1001's drop box, in a directory uid 1000 may write.
    let shared = ws.path("shared");
    std::fs::create_dir(&shared).unwrap();
    chown(&shared, Some(1000), Some(1000)).unwrap();
    let drop_box = shared.join("drop");
    std::fs::create_dir(&drop_box).unwrap();
    chown(&drop_box, Some(1001), Some(1001)).unwrap();
    crate::common::set_mode(&drop_box, 0o1777);
    let victim = drop_box.join("victims.pyc");
    std::fs::write(&victim, "uid 1001's\n").unwrap();
    chown(&victim, Some(1001), Some(1001)).unwrap();
    let status = std::process::Command::new("touch")
        .args(["-a", "-d", "30 days ago"])
        .arg(&victim)
        .status()
        .unwrap();
    assert!(status.success());
    let as_tenant = |script: &str| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(&cache)
            .arg(&drop_box)
            .status()
            .unwrap()
            .success()
    };
    assert!(!as_tenant("rm -f \"$2/victims.pyc\""), "the sticky bit keeps it");
    assert!(as_tenant(
        "mkdir \"$1/.renv-by-content\" && mv \"$2\" \"$1/.renv-by-content/ab\""
    ));
    let moved = cache.join(".renv-by-content/ab/victims.pyc");
    assert!(moved.exists());

    let report = prune(&ws, &["--min-age", "0s"]);
    assert_eq!(report["bytecode_removed"], 0, "{report}");
    assert_eq!(std::fs::read_to_string(&moved).unwrap(), "uid 1001's\n");
}

/// `count` packages of `files` small files each, packaged straight into the store, least
/// recently used first (the first was last used `count` hours ago, the last one an hour
/// ago). Returns their digests and source directories, in that order.
fn many_packages(ws: &Workspace, count: usize, files: usize) -> Vec<(String, String)> {
    let mut made = Vec::new();
    for i in 0..count {
        let dir = format!("many/p{i:03}");
        for f in 0..files {
            ws.write(&format!("{dir}/m{f:02}.py"), format!("VALUE = {}\n", i * 100 + f));
        }
        made.push((package_into_store(ws, &dir), dir));
    }
    for (age, (digest, _)) in made.iter().rev().enumerate() {
        let marker = ws.store_v1("meta").join(format!("pkg-{digest}.json"));
        let then = SystemTime::now() - Duration::from_secs(3600 * (age as u64 + 1));
        std::fs::File::options()
            .write(true)
            .open(marker)
            .unwrap()
            .set_modified(then)
            .unwrap();
    }
    made
}

/// `renv package DIR` into the store; its digest.
fn package_into_store(ws: &Workspace, dir: &str) -> String {
    let out = ws.renv().args(["package", dir]).output().unwrap();
    assert_success(&out);
    let printed = String::from_utf8(out.stdout).unwrap();
    let uri = printed.lines().next().unwrap();
    uri.strip_prefix("pkg://").unwrap().to_string()
}

/// Prune removes many entries at once, on several threads: an entry leased (a shared lock
/// on its lock file, as `renv run` holds one) and an entry a process works in, both in the
/// middle of the LRU order, are kept, and every other entry goes, whole, with nothing left
/// in staging or trash.
#[test]
fn entries_in_use_among_many_removed_at_once_are_kept() {
    let ws = Workspace::new();
    // Enough that prune removes on threads of its own.
    let made = many_packages(&ws, 80, 2);
    let (leased, worked_in) = (&made[37].0, &made[52].0);
    let lease = std::fs::File::create(ws.store_v1("locks").join(format!("pkg-{leased}.lock"))).unwrap();
    lease.lock_shared().unwrap();
    let mut worker = std::process::Command::new("sleep")
        .arg("300")
        .current_dir(ws.store_v1("pkgs").join(worked_in))
        .spawn()
        .unwrap();

    let report = prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    worker.kill().unwrap();
    worker.wait().unwrap();
    let expected: Vec<String> = made
        .iter()
        .map(|(digest, _)| digest.clone())
        .filter(|d| d != leased && d != worked_in)
        .collect();
    assert_eq!(ids(&report["removed"]), expected, "in LRU order");
    let mut kept = ids(&report["kept"]);
    kept.sort();
    let mut in_use = vec![leased.clone(), worked_in.clone()];
    in_use.sort();
    assert_eq!(kept, in_use);
    for decision in report["kept"].as_array().unwrap() {
        assert!(
            decision["reason"].as_str().unwrap().starts_with("in use"),
            "{decision}"
        );
    }
    let mut committed = ws.committed_packages();
    committed.sort();
    assert_eq!(committed, in_use);
    let markers = crate::common::list_dir(&ws.store_v1("meta"));
    assert_eq!(markers.len(), 2, "{markers:?}");
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
    let out = ws.renv().args(["verify", "--json"]).output().unwrap();
    let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            verified["checked"].as_u64(),
            verified["problems"].as_array().map(Vec::len)
        ),
        (Some(2), Some(0)),
        "{verified}"
    );
}

/// A prune SIGKILLed while it is removing many entries at once leaves no half entry: each
/// entry is whole and served (its marker there, its tree matching its digest) or not
/// served at all (no marker); what the prune had in trash goes with the next renv command,
/// and a removed entry is built again on request.
#[test]
fn a_prune_killed_mid_way_leaves_whole_entries_or_none() {
    let ws = Workspace::new();
    let count = 120;
    let made = many_packages(&ws, count, 20);
    let mut interrupted = 0;
    for attempt in 0..6 {
        // Everything back in the store (a package again where the last attempt removed it).
        for (digest, dir) in &made {
            if !ws.store_v1("meta").join(format!("pkg-{digest}.json")).exists() {
                assert_eq!(&package_into_store(&ws, dir), digest);
            }
        }
        let mut pruning = ws
            .renv()
            .args(["prune", "--max-size", "0", "--min-age", "0s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Killed once it has begun removing, later at each attempt.
        let markers = |ws: &Workspace| crate::common::list_dir(&ws.store_v1("meta")).len();
        while markers(&ws) >= count - attempt * 5 && pruning.try_wait().unwrap().is_none() {
            std::thread::yield_now();
        }
        pruning.kill().unwrap();
        pruning.wait().unwrap();
        let left = markers(&ws);
        if left > 0 && left < count {
            interrupted += 1;
        }
        // Every entry with a marker is whole; every tree without one is never served.
        for (digest, _) in &made {
            let marker = ws.store_v1("meta").join(format!("pkg-{digest}.json"));
            let tree = ws.store_v1("pkgs").join(digest);
            assert!(
                !marker.exists() || tree.is_dir(),
                "attempt {attempt}: {digest} has a marker but no tree"
            );
        }
        let out = ws.renv().args(["verify", "--json"]).output().unwrap();
        let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            verified["checked"].as_u64(),
            Some(left as u64),
            "attempt {attempt}: {verified}"
        );
        assert!(
            verified["problems"].as_array().unwrap().is_empty(),
            "attempt {attempt}: {verified}"
        );
        // `verify` opened the store: what the killed prune had in trash is gone.
        assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
    }
    assert!(interrupted > 0, "no attempt stopped the prune mid-way");
    // A removed entry comes back on request; a whole prune leaves nothing behind.
    let (digest, dir) = &made[0];
    assert_eq!(&package_into_store(&ws, dir), digest);
    prune(&ws, &["--max-size", "0", "--min-age", "0s"]);
    assert!(ws.committed_packages().is_empty());
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}
