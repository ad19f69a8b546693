//! Package digests: stable for the same content, different for any real change; symlink
//! and special-file handling in the walker.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Workspace, assert_success, mode_of, set_mode};

fn package(ws: &Workspace, dir: &str, extra: &[&str]) -> Value {
    let out = ws
        .renv()
        .args(["package", dir, "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn digest(ws: &Workspace, dir: &str) -> String {
    package(ws, dir, &[])["digest"].as_str().unwrap().to_string()
}

fn write_project(ws: &Workspace, root: &str, reversed: bool) {
    let mut files = vec![
        ("main.py", "print('main')\n"),
        ("lib/util.py", "X = 1\n"),
        ("lib/deep/data.txt", "data\n"),
        ("run.sh", "#!/bin/sh\n"),
    ];
    if reversed {
        files.reverse();
    }
    for (path, body) in files {
        ws.write(&format!("{root}/{path}"), body);
    }
    std::fs::create_dir_all(ws.path(&format!("{root}/empty"))).unwrap();
    set_mode(&ws.path(&format!("{root}/run.sh")), 0o755);
}

#[test]
fn same_content_same_digest_anywhere_anyhow() {
    let ws = Workspace::new();
    write_project(&ws, "a", false);
    let base = digest(&ws, "a");

    // Another location, written in another order.
    write_project(&ws, "elsewhere/b", true);
    assert_eq!(digest(&ws, "elsewhere/b"), base);

    // mtimes do not matter.
    let f = std::fs::File::options()
        .write(true)
        .open(ws.path("a/main.py"))
        .unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1234))
        .unwrap();
    assert_eq!(digest(&ws, "a"), base);

    // Nor does the thread count.
    for threads in ["1", "7"] {
        assert_eq!(package(&ws, "a", &["--threads", threads])["digest"], base);
    }

    // A tree rebuilt from scratch in the same place.
    std::fs::remove_dir_all(ws.path("a")).unwrap();
    write_project(&ws, "a", true);
    assert_eq!(digest(&ws, "a"), base);
}

/// A new tree is hashed as it is copied into staging, so the store learns its name only
/// once it is copied: a tree the store holds already, found at a new place (no stat cache
/// there), keeps the stored entry and leaves nothing behind.
#[test]
fn a_new_tree_equal_to_a_stored_one_leaves_no_copy_behind() {
    let ws = Workspace::new();
    write_project(&ws, "a", false);
    let first = ws.build(&ws.spec("a.json", &json!({"working_dir": "a"})));
    assert_eq!(first["package"]["created"], true);
    write_project(&ws, "elsewhere/b", true);
    let second = ws.build(&ws.spec("b.json", &json!({"working_dir": "elsewhere/b"})));
    assert_eq!(second["package"]["digest"], first["package"]["digest"]);
    assert_eq!(second["package"]["created"], false);
    assert_eq!(second["working_dir"], first["working_dir"]);
    assert_eq!(ws.committed_packages().len(), 1);
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}

#[test]
fn content_name_and_exec_bit_each_change_the_digest() {
    let ws = Workspace::new();
    write_project(&ws, "a", false);
    let base = digest(&ws, "a");

    ws.write("a/main.py", "print('changed')\n");
    let content = digest(&ws, "a");
    assert_ne!(content, base);
    ws.write("a/main.py", "print('main')\n");
    assert_eq!(digest(&ws, "a"), base);

    std::fs::rename(ws.path("a/main.py"), ws.path("a/main2.py")).unwrap();
    assert_ne!(digest(&ws, "a"), base);
    std::fs::rename(ws.path("a/main2.py"), ws.path("a/main.py")).unwrap();

    set_mode(&ws.path("a/main.py"), 0o755);
    assert_ne!(digest(&ws, "a"), base);
    set_mode(&ws.path("a/main.py"), 0o644);
    assert_eq!(digest(&ws, "a"), base);

    std::fs::create_dir(ws.path("a/another-empty")).unwrap();
    assert_ne!(digest(&ws, "a"), base);
}

#[test]
fn inside_symlinks_are_kept_and_entries_are_read_only() {
    let ws = Workspace::new();
    write_project(&ws, "a", false);
    std::os::unix::fs::symlink("lib/util.py", ws.path("a/util_link.py")).unwrap();
    std::os::unix::fs::symlink("../main.py", ws.path("a/lib/main_link.py")).unwrap();
    let spec = ws.spec("env.json", &json!({"working_dir": "a"}));
    let built = ws.build(&spec);
    let wd = Path::new(built["working_dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_link(wd.join("util_link.py")).unwrap(),
        Path::new("lib/util.py")
    );
    assert_eq!(
        std::fs::read_to_string(wd.join("lib/main_link.py")).unwrap(),
        "print('main')\n"
    );
    assert_eq!(mode_of(&wd.join("main.py")), 0o444);
    assert_eq!(mode_of(&wd.join("run.sh")), 0o555);
    assert_eq!(mode_of(&wd.join("lib")), 0o555);
    assert_eq!(mode_of(wd), 0o555);
}

#[test]
fn symlinks_leaving_the_tree_are_errors_naming_the_path() {
    for (name, target) in [
        ("up", "../outside.txt"),
        ("abs", "/etc/passwd"),
        ("trick", "c/.."),
    ] {
        let ws = Workspace::new();
        write_project(&ws, "a", false);
        ws.write("outside.txt", "secret");
        std::os::unix::fs::symlink(target, ws.path(&format!("a/{name}"))).unwrap();
        let spec = ws.spec("env.json", &json!({"working_dir": "a"}));
        let (code, stderr) = ws.build_fails(&spec, &[]);
        assert_eq!(code, 2);
        assert!(
            stderr.contains(&format!("a/{name}: symlink to")) && stderr.contains("leaves the working_dir"),
            "{stderr}"
        );
        assert!(ws.committed_packages().is_empty());
        assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
    }
}

#[test]
fn fifos_and_sockets_are_errors_and_never_block() {
    let ws = Workspace::new();
    write_project(&ws, "a", false);
    let fifo = ws.path("a/lib/pipe");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    let spec = ws.spec("env.json", &json!({"working_dir": "a"}));

    let start = Instant::now();
    let mut child = ws
        .renv()
        .args(["build", "--json"])
        .arg(&spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("renv blocked on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lib/pipe: a FIFO cannot be packaged"), "{stderr}");

    std::fs::remove_file(&fifo).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(ws.path("a/sock")).unwrap();
    let (code, stderr) = ws.build_fails(&spec, &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("a/sock: a socket cannot be packaged"), "{stderr}");
}

/// The stat cache may skip reading unchanged files, but never hides an edit: not one
/// that keeps the size and puts the old mtime back, since ctime still moves.
#[test]
fn the_hash_cache_never_hides_an_edit() {
    let ws = Workspace::new();
    write_project(&ws, "a", false);
    // Files younger than the racy margin are not cached; let them age.
    std::thread::sleep(Duration::from_millis(1100));
    let base = digest(&ws, "a");
    let caches = crate::common::list_dir(&ws.store_v1("cache/hashes"));
    assert_eq!(caches.len(), 1, "the scan recorded its digests");
    assert_eq!(digest(&ws, "a"), base, "a cached rescan agrees");

    let path = ws.path("a/main.py");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    ws.write("a/main.py", "print('MAIN')\n"); // same size
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_ne!(digest(&ws, "a"), base);
}
