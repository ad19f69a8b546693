//! The store cannot be turned against whoever runs renv on it: no directory of the store
//! is followed as a symlink, and root never maintains a store someone else owns.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use serde_json::json;

use crate::common::{Workspace, assert_success, list_dir};

/// `renv <args>` on the workspace's store as `uid` (0: as root, the tests' own user).
fn renv_as(ws: &Workspace, uid: u32, args: &[&str]) -> std::process::Output {
    let mut cmd = ws.renv();
    if uid != 0 {
        let program = cmd.get_program().to_owned();
        let mut wrapped = Command::new("setpriv");
        wrapped
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ])
            .arg(program)
            .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .current_dir(ws.dir.path());
        for (k, v) in cmd.get_envs() {
            if v.is_none() {
                wrapped.env_remove(k);
            }
        }
        cmd = wrapped;
    }
    cmd.args(args).output().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A victim directory of root's with one old file in it.
fn victim(ws: &Workspace, name: &str) -> std::path::PathBuf {
    let dir = ws.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("precious.log");
    std::fs::write(&file, "root's\n").unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(400 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    dir
}

/// The store's owner (uid 1000) replaces `trash` and `logs` with symlinks to root's
/// directories and `locks/prune.lock` with a symlink to a file root would create. Root's
/// `ls`, `prune` and `verify` refuse the store, naming its owner; nothing of root's is
/// touched.
#[test]
fn root_never_maintains_a_store_someone_else_owns() {
    let ws = Workspace::new();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(ws.store()).unwrap();
    std::os::unix::fs::chown(ws.store(), Some(1000), Some(1000)).unwrap();
    ws.write("proj/main.py", "print('hi')\n");
    for dir in ["proj", "proj/main.py"] {
        std::fs::set_permissions(ws.path(dir), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let spec = ws.spec("env.json", &json!({"working_dir": "proj"}));
    std::fs::set_permissions(&spec, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_success(&renv_as(&ws, 1000, &["build", spec.to_str().unwrap()]));

    let trash_target = victim(&ws, "victim-trash");
    let logs_target = victim(&ws, "victim-logs");
    let planted = ws.path("victim-created");
    let v1 = ws.store_v1("");
    std::fs::remove_dir_all(v1.join("trash")).unwrap();
    std::fs::remove_dir_all(v1.join("logs")).unwrap();
    std::os::unix::fs::symlink(&trash_target, v1.join("trash")).unwrap();
    std::os::unix::fs::symlink(&logs_target, v1.join("logs")).unwrap();
    let _ = std::fs::remove_file(v1.join("locks/prune.lock"));
    std::os::unix::fs::symlink(&planted, v1.join("locks/prune.lock")).unwrap();

    for args in [
        &["ls"][..],
        &["prune", "--older-than", "0s"][..],
        &["verify", "--repair"][..],
        &["build", spec.to_str().unwrap()][..],
    ] {
        let out = renv_as(&ws, 0, args);
        assert!(
            !out.status.success(),
            "root's `renv {args:?}` ran on uid 1000's store"
        );
        let err = stderr(&out);
        assert!(err.contains("belongs to uid 1000"), "{args:?}: {err}");
    }
    assert_eq!(list_dir(&trash_target), ["precious.log"]);
    assert_eq!(list_dir(&logs_target), ["precious.log"]);
    assert!(
        !planted.exists(),
        "root created a file through the owner's symlink"
    );
}

/// Even its owner's renv refuses a store whose directories are symlinks or writable by
/// others, with the path and what is wrong, and touches nothing behind them.
#[test]
fn a_store_with_symlinked_or_shared_directories_is_refused() {
    let ws = Workspace::new();
    let spec = ws.spec("env.json", &json!({"env_vars": {"A": "1"}}));
    ws.build(&spec);
    let target = victim(&ws, "elsewhere");
    let trash = ws.store_v1("trash");
    std::fs::remove_dir_all(&trash).unwrap();
    std::os::unix::fs::symlink(&target, &trash).unwrap();
    let out = renv_as(&ws, 0, &["ls"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("trash is a symlink"), "{}", stderr(&out));
    assert_eq!(list_dir(&target), ["precious.log"]);

    std::fs::remove_file(&trash).unwrap();
    std::fs::create_dir(&trash).unwrap();
    assert_success(&renv_as(&ws, 0, &["ls"]));
    std::fs::set_permissions(ws.store_v1("meta"), std::fs::Permissions::from_mode(0o775)).unwrap();
    let out = renv_as(&ws, 0, &["ls"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("meta is writable by others (mode 775)"),
        "{}",
        stderr(&out)
    );
}

/// A new store is its owner's alone: `store-v1` is 0700, so no one else even looks in
/// (the daemon opens it to its callers, and only them, with an ACL).
#[test]
fn a_new_store_is_private_to_its_owner() {
    let ws = Workspace::new();
    let spec = ws.spec("env.json", &json!({"env_vars": {"A": "1"}}));
    ws.build(&spec);
    let meta = std::fs::metadata(ws.store_v1("")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o700);
    let out = Command::new("setpriv")
        .args([
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "sh",
            "-c",
            "ls \"$1\"/envs",
            "sh",
        ])
        .arg(ws.store_v1(""))
        .output()
        .unwrap();
    assert!(!out.status.success(), "another user listed the store");
    // What a daemon's callers are let reach, they reach by name only; the rest is the
    // owner's (markers and build logs say what others asked for).
    for (dir, mode) in [
        ("envs", 0o711),
        ("pkgs", 0o711),
        ("meta", 0o700),
        ("cache", 0o700),
        ("trash", 0o700),
    ] {
        assert_eq!(crate::common::mode_of(&ws.store_v1(dir)), mode, "{dir}");
    }
}

/// A store is reached only through directories of root or its owner: one inside another
/// user's directory could be swapped for theirs while root works in it.
#[test]
fn a_store_inside_another_users_directory_is_refused() {
    let ws = Workspace::new();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let theirs = ws.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(1000), Some(1000)).unwrap();
    let out = ws
        .renv()
        .args(["ls", "--store"])
        .arg(theirs.join("store"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("theirs belongs to uid 1000"),
        "{}",
        stderr(&out)
    );
    assert!(list_dir(&theirs).is_empty(), "nothing was created in it");
    // A path through root's own symlink (as /var/run → /run) is judged by where it leads.
    std::fs::create_dir(ws.path("real")).unwrap();
    std::os::unix::fs::symlink(ws.path("real"), ws.path("link")).unwrap();
    let out = ws
        .renv()
        .args(["ls", "--store"])
        .arg(ws.path("link/store"))
        .output()
        .unwrap();
    assert_success(&out);
}
