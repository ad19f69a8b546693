//! `renv package -o` zips: reproducible, standard, and round-trip to the same digest.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::common::{Workspace, assert_success, set_mode, tree_listing, write_many};

fn write_project(ws: &Workspace) {
    ws.write("proj/main.py", "print('main')\n");
    ws.write("proj/pkg/__init__.py", "");
    ws.write("proj/pkg/mod.py", "VALUE = 42\n");
    ws.write("proj/bin/tool", "#!/bin/sh\necho tool\n");
    set_mode(&ws.path("proj/bin/tool"), 0o755);
    std::fs::create_dir_all(ws.path("proj/empty")).unwrap();
    std::os::unix::fs::symlink("pkg/mod.py", ws.path("proj/link.py")).unwrap();
    write_many(&ws.path("proj/data"), 40, 3000);
}

fn package_zip(ws: &Workspace, out: &str, extra: &[&str]) -> Value {
    let result = ws
        .renv()
        .args(["package", "proj", "-o", out, "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert_success(&result);
    serde_json::from_slice(&result.stdout).unwrap()
}

#[test]
fn zips_are_byte_identical_and_readable_by_standard_tools() {
    let ws = Workspace::new();
    write_project(&ws);
    let first = package_zip(&ws, "one.zip", &[]);
    // Touch every file: timestamps must not leak into the zip.
    for entry in std::fs::read_dir(ws.path("proj/data")).unwrap() {
        for file in std::fs::read_dir(entry.unwrap().path()).unwrap() {
            let f = std::fs::File::options()
                .write(true)
                .open(file.unwrap().path())
                .unwrap();
            f.set_modified(std::time::SystemTime::now()).unwrap();
        }
    }
    let second = package_zip(&ws, "two.zip", &["--threads", "1"]);
    assert_eq!(first["digest"], second["digest"]);
    assert_eq!(
        std::fs::read(ws.path("one.zip")).unwrap(),
        std::fs::read(ws.path("two.zip")).unwrap()
    );
    assert_eq!(
        first["uri"],
        format!("pkg://{}", first["digest"].as_str().unwrap())
    );
    assert_eq!(first["files"], 44);

    // Info-ZIP's unzip tests it and restores the tree, exec bit and symlink included.
    let test = Command::new("unzip")
        .args(["-tq"])
        .arg(ws.path("one.zip"))
        .output()
        .unwrap();
    assert!(test.status.success(), "{}", String::from_utf8_lossy(&test.stdout));
    let out = ws.path("unzipped");
    let unzip = Command::new("unzip")
        .arg("-q")
        .arg(ws.path("one.zip"))
        .arg("-d")
        .arg(&out)
        .output()
        .unwrap();
    assert!(unzip.status.success());
    assert_eq!(tree_listing(&out), tree_listing(&ws.path("proj")));
    assert_eq!(
        std::fs::metadata(out.join("bin/tool")).unwrap().mode() & 0o111,
        0o111
    );

    // Python's zipfile reads it too.
    let py = Command::new("python3")
        .args(["-c", "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None; print(len(z.namelist()))"])
        .arg(ws.path("one.zip"))
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let names: usize = String::from_utf8(py.stdout).unwrap().trim().parse().unwrap();
    assert_eq!(names, tree_listing(&ws.path("proj")).len());
}

#[test]
fn a_zip_unpacks_to_the_same_digest_as_its_directory_and_is_unpacked_once() {
    let ws = Workspace::new();
    write_project(&ws);
    let packaged = package_zip(&ws, "proj.zip", &["--compression", "deflated"]);
    let digest = packaged["digest"].as_str().unwrap();

    let from_zip = ws.build(&ws.spec("zip.json", &json!({"working_dir": "proj.zip"})));
    assert_eq!(from_zip["package"]["digest"], digest);
    assert_eq!(from_zip["package"]["created"], true);
    assert!(from_zip["timings_ms"]["unpack"].is_u64());
    let wd = Path::new(from_zip["working_dir"].as_str().unwrap());
    assert_eq!(tree_listing(wd), tree_listing(&ws.path("proj")));
    let inode = std::fs::metadata(wd).unwrap().ino();

    // The same zip again, by file:// URI: recognized by its bytes, not unpacked again.
    let uri = format!("file://{}", ws.path("proj.zip").display());
    let again = ws.build(&ws.spec("uri.json", &json!({"working_dir": uri})));
    assert_eq!(again["package"]["digest"], digest);
    assert_eq!(again["package"]["created"], false);
    assert!(
        again["timings_ms"].get("unpack").is_none(),
        "{}",
        again["timings_ms"]
    );
    assert_eq!(std::fs::metadata(wd).unwrap().ino(), inode);

    // The directory itself maps to the same entry without copying.
    let from_dir = ws.build(&ws.spec("dir.json", &json!({"working_dir": "proj"})));
    assert_eq!(from_dir["package"]["digest"], digest);
    assert_eq!(from_dir["package"]["created"], false);
    assert!(from_dir["timings_ms"].get("copy").is_none());

    // And pkg://<digest> names it.
    let by_digest = ws.build(&ws.spec("pkg.json", &json!({"working_dir": format!("pkg://{digest}")})));
    assert_eq!(by_digest["working_dir"], from_zip["working_dir"]);
    assert_eq!(ws.committed_packages(), vec![digest.to_string()]);
    assert!(ws.leftovers().is_empty());
}

/// `renv package ZIP` names a zip by the digest of what it unpacks to (what the daemon
/// checks an upload against), and re-packs it reproducibly; a hostile zip is refused.
#[test]
fn packaging_a_zip_gives_its_directorys_digest() {
    let ws = Workspace::new();
    write_project(&ws);
    let from_dir = package_zip(&ws, "proj.zip", &["--compression", "deflated"]);
    let result = ws
        .renv()
        .args(["package", "proj.zip", "-o", "again.zip", "--json"])
        .output()
        .unwrap();
    assert_success(&result);
    let from_zip: Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(from_zip["digest"], from_dir["digest"]);
    assert_eq!(from_zip["files"], from_dir["files"]);
    let stored = package_zip(&ws, "stored.zip", &[]);
    assert_eq!(
        std::fs::read(ws.path("again.zip")).unwrap(),
        std::fs::read(ws.path("stored.zip")).unwrap()
    );
    assert_eq!(stored["digest"], from_dir["digest"]);

    let with_excludes = ws
        .renv()
        .args(["package", "proj.zip", "--exclude", "data"])
        .output()
        .unwrap();
    assert_eq!(with_excludes.status.code(), Some(2));

    let evil = crate::common::raw_zip::build(&[crate::common::raw_zip::file("../evil.txt", b"evil")]);
    ws.write("evil.zip", evil);
    let refused = ws.renv().args(["package", "evil.zip"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("evil.txt"));
    assert!(!ws.path("evil.txt").exists());
    assert!(ws.committed_packages().is_empty());
}

#[test]
fn unknown_package_digest_is_a_clear_error() {
    let ws = Workspace::new();
    let digest = "ab".repeat(32);
    let spec = ws.spec("pkg.json", &json!({"working_dir": format!("pkg://{digest}")}));
    let (code, stderr) = ws.build_fails(&spec, &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&format!("pkg://{digest} is not in the store")),
        "{stderr}"
    );
}

#[test]
fn package_without_output_puts_the_tree_in_the_store() {
    let ws = Workspace::new();
    write_project(&ws);
    let out = ws.renv().args(["package", "proj"]).output().unwrap();
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let uri = text.lines().next().unwrap();
    assert!(uri.starts_with("pkg://"), "{text}");
    let built = ws.build(&ws.spec("pkg.json", &json!({"working_dir": uri})));
    assert_eq!(built["package"]["uri"], uri);
}

/// A new zip (other bytes) of a tree that is committed and in use is recognized without
/// waiting for the users' leases to end.
#[test]
fn a_new_zip_of_a_leased_package_does_not_wait_for_its_users() {
    let ws = Workspace::new();
    write_project(&ws);
    let deflated = package_zip(&ws, "deflated.zip", &["--compression", "deflated"]);
    let stored = package_zip(&ws, "stored.zip", &["--compression", "stored"]);
    assert_eq!(deflated["digest"], stored["digest"], "one tree");
    assert_ne!(
        std::fs::read(ws.path("deflated.zip")).unwrap(),
        std::fs::read(ws.path("stored.zip")).unwrap(),
        "two zips"
    );
    let first = ws.spec("first.json", &json!({"working_dir": "deflated.zip"}));
    let ready = ws.path("ready");
    /// Stops `renv run` (which forwards the SIGTERM to its command), even if the test fails.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(self.0.id().to_string()).status();
            let _ = self.0.wait();
        }
    }
    let user = Stop(
        ws.renv()
            .arg("run")
            .arg(&first)
            .args(["--", "sh", "-c", &format!("touch {}; sleep 60", ready.display())])
            .spawn()
            .unwrap(),
    );
    let start = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "renv run did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = ws.spec(
        "second.json",
        &json!({"working_dir": "stored.zip", "config": {"setup_timeout_seconds": 5}}),
    );
    let built = ws.build(&second);
    drop(user);
    assert_eq!(built["package"]["digest"], deflated["digest"]);
    assert_eq!(built["package"]["created"], false);
}
