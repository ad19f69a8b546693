//! Packages that travel: remote zips (a plain http server, a local S3 API) and the shared
//! package store, with real servers on 127.0.0.1 and real daemons.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{HttpServer, S3Server, Workspace, assert_success, wait_for};
use crate::daemon::{Daemon, api_error, setup};

/// `renv package DIR -o OUT --json`'s digest.
fn package(ws: &Workspace, dir: &str, out: &Path) -> String {
    let output = ws
        .renv()
        .args(["package", dir, "--json", "-o"])
        .arg(out)
        .output()
        .unwrap();
    assert_success(&output);
    serde_json::from_slice::<Value>(&output.stdout).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn digest_of(built: &Value) -> String {
    built["package"]["digest"].as_str().unwrap().to_string()
}

#[test]
fn http_zips_are_kept_by_revision_and_fetched_again_when_they_change() {
    let ws = Workspace::new();
    let server = HttpServer::start(&ws.path("served"));
    ws.write("v1/marker.txt", "one\n");
    ws.write("v1/pkg_mod/__init__.py", "WHO = 'v1'\n");
    let v1 = package(&ws, "v1", &server.root.join("wd.zip"));
    let spec = ws.spec(
        "env.json",
        &json!({"working_dir": format!("{}/wd.zip", server.url)}),
    );

    let first = ws.build(&spec);
    assert_eq!(digest_of(&first), v1);
    assert_eq!(first["package"]["created"], true);
    let cwd = first["cwd"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(cwd).join("marker.txt")).unwrap(),
        "one\n"
    );
    assert_eq!(server.requests("GET", "/wd.zip"), 1);

    // Unchanged: one HEAD, no download.
    let again = ws.build(&spec);
    assert_eq!(
        (digest_of(&again), &again["package"]["created"]),
        (v1.clone(), &json!(false))
    );
    assert_eq!(server.requests("GET", "/wd.zip"), 1);
    assert_eq!(server.requests("HEAD", "/wd.zip"), 2);

    // Changed under the same URI (this server sends no ETag: its time and size say so).
    ws.write("v2/marker.txt", "two, longer\n");
    let v2 = package(&ws, "v2", &server.root.join("wd.zip"));
    let changed = ws.build(&spec);
    assert_eq!(digest_of(&changed), v2);
    assert_eq!(server.requests("GET", "/wd.zip"), 2);
    let cwd = changed["cwd"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(cwd).join("marker.txt")).unwrap(),
        "two, longer\n"
    );

    // py_modules too: a remote zip is used as it is (its top level on PYTHONPATH).
    ws.write("mods/remote_mod/__init__.py", "NAME = 'remote'\n");
    let output = ws
        .renv()
        .args(["package", "mods/remote_mod", "--as-module", "-o"])
        .arg(server.root.join("mod.zip"))
        .output()
        .unwrap();
    assert_success(&output);
    let spec = ws.spec(
        "mods.json",
        &json!({"py_modules": [format!("{}/mod.zip", server.url)]}),
    );
    let output = ws
        .renv()
        .arg("run")
        .arg(&spec)
        .args(["--", "python3", "-c", "import remote_mod; print(remote_mod.NAME)"])
        .output()
        .unwrap();
    assert_success(&output);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "remote");
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}

#[test]
fn a_zip_unpacked_while_it_downloads_is_the_tree_a_downloaded_one_gives() {
    let ws = Workspace::new();
    let server = HttpServer::start(&ws.path("served"));
    crate::common::write_many(&ws.path("tree/sub"), 20, 10_000);
    ws.write("tree/run.sh", "#!/bin/sh\n");
    std::fs::set_permissions(
        ws.path("tree/run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("sub", ws.path("tree/link")).unwrap();
    let digest = package(&ws, "tree", &server.root.join("wd.zip"));
    let spec = ws.spec(
        "env.json",
        &json!({"working_dir": format!("{}/wd.zip", server.url)}),
    );
    let built = ws.build(&spec);
    // Committed under the digest `renv package` computed from the tree itself: same
    // files, modes and symlink. One GET: no second download into a file.
    assert_eq!(digest_of(&built), digest);
    assert_eq!(server.requests("GET", "/wd.zip"), 1);
    let timings = &built["timings_ms"];
    assert!(
        timings["download"].is_u64() && timings["unpack"].is_u64(),
        "{timings}"
    );

    // A zip whose local headers do not carry sizes (a writer that could not seek, as
    // Python's zipfile into a pipe) cannot be unpacked as it streams: it is downloaded
    // again into a file and unpacked from there.
    let script = "import io, sys, zipfile\n\
        class Pipe(io.RawIOBase):\n\
        \x20   def __init__(self, f): self.f = f\n\
        \x20   def writable(self): return True\n\
        \x20   def write(self, b): return self.f.write(b)\n\
        with open(sys.argv[1], 'wb') as f:\n\
        \x20   with zipfile.ZipFile(Pipe(f), 'w') as z:\n\
        \x20       z.writestr('piped.txt', 'through a pipe\\n')\n";
    let status = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(server.root.join("piped.zip"))
        .status()
        .unwrap();
    assert!(status.success());
    let spec = ws.spec(
        "piped.json",
        &json!({"working_dir": format!("{}/piped.zip", server.url)}),
    );
    let built = ws.build(&spec);
    let cwd = built["cwd"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(cwd).join("piped.txt")).unwrap(),
        "through a pipe\n"
    );
    assert_eq!(server.requests("GET", "/piped.zip"), 2);
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}

#[test]
fn a_download_that_breaks_off_is_retried_and_one_that_keeps_breaking_keeps_nothing() {
    let ws = Workspace::new();
    let server = HttpServer::start(&ws.path("served"));
    crate::common::write_many(&ws.path("tree"), 20, 50_000);
    package(&ws, "tree", &server.root.join("flaky.zip"));
    std::fs::copy(server.root.join("flaky.zip"), server.root.join("broken.zip")).unwrap();

    server.behave("break-once");
    let flaky = ws.spec(
        "flaky.json",
        &json!({"working_dir": format!("{}/flaky.zip", server.url)}),
    );
    let built = ws.build(&flaky);
    assert_eq!(built["package"]["created"], true);
    assert_eq!(
        server.requests("GET", "/flaky.zip"),
        2,
        "one broken download, one retry"
    );

    server.behave("break-always");
    let broken = ws.spec(
        "broken.json",
        &json!({"working_dir": format!("{}/broken.zip", server.url)}),
    );
    let (code, err) = ws.build_fails(&broken, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("working_dir") && err.contains("broken.zip"), "{err}");
    assert_eq!(
        server.requests("GET", "/broken.zip"),
        4,
        "the first try and 3 retries"
    );
    assert_eq!(ws.committed_packages().len(), 1, "nothing kept of the broken one");
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}

#[test]
fn a_redirect_is_never_followed() {
    let ws = Workspace::new();
    let allowed = HttpServer::start(&ws.path("allowed"));
    let elsewhere = HttpServer::start(&ws.path("elsewhere"));
    ws.write("tree/a.txt", "a\n");
    package(&ws, "tree", &elsewhere.root.join("wd.zip"));
    allowed.behave(&format!("redirect {}", elsewhere.url));
    let spec = ws.spec(
        "wd.json",
        &json!({"working_dir": format!("{}/wd.zip", allowed.url)}),
    );
    let (code, err) = ws.build_fails(&spec, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("302"), "{err}");
    assert_eq!(
        elsewhere.requests("HEAD", "/wd.zip") + elsewhere.requests("GET", "/wd.zip"),
        0
    );
    assert!(ws.committed_packages().is_empty());
}

#[test]
fn a_server_that_drips_bytes_cannot_hold_a_download_forever() {
    let ws = Workspace::new();
    let server = HttpServer::start(&ws.path("served"));
    crate::common::write_many(&ws.path("tree"), 4, 200_000);
    package(&ws, "tree", &server.root.join("drip.zip"));
    server.behave("drip");
    let spec = ws.spec(
        "drip.json",
        &json!({"working_dir": format!("{}/drip.zip", server.url)}),
    );
    // A byte every 300 ms never trips a 1 s read timeout; the download's deadline (1 s +
    // 1 s per 256 KiB: 4 s here) ends it.
    let (code, err) = ws.build_fails(&spec, &["--remote-idle-timeout-seconds", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("the download took more than 4 s"), "{err}");
    assert!(ws.committed_packages().is_empty());
}

#[test]
fn a_killed_download_leaves_nothing_and_the_next_one_completes() {
    let ws = Workspace::new();
    let server = HttpServer::start(&ws.path("served"));
    // ~3 MB, sent at 64 KiB every 50 ms: about 2.5 s to download.
    crate::common::write_many(&ws.path("tree"), 30, 100_000);
    let digest = package(&ws, "tree", &server.root.join("slow.zip"));
    server.behave("slow");
    let spec = ws.spec(
        "slow.json",
        &json!({"working_dir": format!("{}/slow.zip", server.url)}),
    );
    let mut child = ws
        .renv()
        .arg("build")
        .arg(&spec)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        || (server.requests("GET", "/slow.zip") == 1).then_some(()),
        "the download to start",
    );
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        ws.committed_packages().is_empty(),
        "a killed download is never an entry"
    );

    server.behave("normal");
    let built = ws.build(&spec);
    assert_eq!(
        (digest_of(&built), &built["package"]["created"]),
        (digest, &json!(true))
    );
    // The killed run's staging dir is swept by a later run.
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}

#[test]
fn the_daemon_fetches_allowed_s3_zips_once_per_revision() {
    let ws = setup();
    let s3 = S3Server::start(&ws, "cluster");
    ws.write("v1/marker.txt", "one\n");
    package(&ws, "v1", &ws.path("v1.zip"));
    s3.put("team/wd.zip", &ws.path("v1.zip"));
    let daemon = Daemon::try_start_with(
        &ws,
        "run/renv.sock",
        &["--allow-remote", "s3://cluster/team/"],
        &s3.env(),
    )
    .unwrap();
    let spec = json!({"working_dir": "s3://cluster/team/wd.zip"});

    // 20 first requests at once: one download, one env.
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|_| scope.spawn(|| daemon.post("/v1/envs", &json!({"runtime_env": spec})).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let env_id = &answers[0]["env_id"];
    assert!(answers.iter().all(|a| &a["env_id"] == env_id), "{answers:?}");
    assert_eq!(s3.downloads("team/wd.zip"), 1);
    assert_eq!(daemon.metric("renv_remote_downloads_total"), 1.0);
    let cwd = answers[0]["cwd"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(cwd).join("marker.txt")).unwrap(),
        "one\n"
    );

    // Unchanged: no download. Overwritten (a new ETag): fetched again, a new env.
    daemon.post("/v1/envs", &json!({"runtime_env": spec})).unwrap();
    assert_eq!(s3.downloads("team/wd.zip"), 1);
    ws.write("v2/marker.txt", "two\n");
    package(&ws, "v2", &ws.path("v2.zip"));
    s3.put("team/wd.zip", &ws.path("v2.zip"));
    let changed = daemon.post("/v1/envs", &json!({"runtime_env": spec})).unwrap();
    assert_ne!(&changed["env_id"], env_id);
    assert_eq!(s3.downloads("team/wd.zip"), 2);
    assert_eq!(daemon.metric("renv_remote_downloads_total"), 2.0);
    let cwd = changed["cwd"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(cwd).join("marker.txt")).unwrap(),
        "two\n"
    );

    // Anything outside the allowed prefix is refused before a request leaves the node.
    s3.put("other/wd.zip", &ws.path("v1.zip"));
    for (spec, field) in [
        (json!({"working_dir": "s3://cluster/other/wd.zip"}), "working_dir"),
        (
            json!({"working_dir": "s3://cluster/team-b/wd.zip"}),
            "working_dir",
        ),
        (
            json!({"py_modules": ["https://example.com/team/m.zip"]}),
            "py_modules",
        ),
    ] {
        let (status, _, got_field, message) =
            api_error(daemon.post("/v1/envs", &json!({"runtime_env": spec})));
        assert_eq!((status, got_field.as_deref()), (400, Some(field)), "{message}");
        assert!(message.contains("--allow-remote"), "{message}");
    }
    assert_eq!(s3.downloads("other/wd.zip"), 0);

    // A missing object names the entry.
    let (status, _, field, message) = api_error(daemon.post(
        "/v1/envs",
        &json!({"runtime_env": {"working_dir": "s3://cluster/team/missing.zip"}}),
    ));
    assert_eq!(
        (status, field.as_deref()),
        (400, Some("working_dir")),
        "{message}"
    );
    assert!(message.contains("s3://cluster/team/missing.zip"), "{message}");
}

/// Two nodes (two daemons, two stores) sharing `remote`: an upload to one is used on the
/// other; a tampered object is refused; prune never touches the remote.
fn shared_remote_between_two_daemons(
    ws: &Workspace,
    remote: &str,
    env: &[(&str, String)],
    exists: &dyn Fn(&str) -> bool,
) {
    ws.write("proj/main.py", "print('shared')\n");
    let digest = package(ws, "proj", &ws.path("proj.zip"));
    let node_a = Daemon::try_start_with(ws, "a/renv.sock", &["--remote", remote], env).unwrap();
    let zip = std::fs::read(ws.path("proj.zip")).unwrap();
    let mut body = std::io::Cursor::new(zip.clone());
    let uploaded = node_a
        .client()
        .send(
            "PUT",
            &format!("/v1/packages/{digest}"),
            Some(("application/zip", zip.len() as u64, &mut body)),
        )
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(
        (&uploaded["created"], &uploaded["pushed"]),
        (&json!(true), &json!(true))
    );
    assert!(exists(&format!("pkgs/{digest}.zip")));
    assert_eq!(node_a.metric("renv_remote_uploads_total"), 1.0);

    let other_store = ws.path("store-b");
    let node_b = Daemon::try_start_with(
        ws,
        "b/renv.sock",
        &["--remote", remote, "--store", other_store.to_str().unwrap()],
        env,
    )
    .unwrap();
    let spec = json!({"working_dir": format!("pkg://{digest}")});
    let built = node_b.post("/v1/envs", &json!({"runtime_env": spec})).unwrap();
    assert_eq!(built["created"], true);
    assert_eq!(node_b.metric("renv_remote_downloads_total"), 1.0);
    let cwd = built["cwd"].as_str().unwrap();
    assert!(cwd.starts_with(other_store.to_str().unwrap()), "{cwd}");
    assert_eq!(
        std::fs::read_to_string(Path::new(cwd).join("main.py")).unwrap(),
        "print('shared')\n"
    );

    // Node B's prune removes its own copy; the remote keeps the package.
    node_b
        .client()
        .json(
            "DELETE",
            &format!("/v1/envs/{}", built["env_id"].as_str().unwrap()),
            None,
        )
        .unwrap();
    let out = ws
        .renv()
        .args(["prune", "--older-than", "0s", "--min-age", "0s", "--store"])
        .arg(&other_store)
        .output()
        .unwrap();
    assert_success(&out);
    assert!(exists(&format!("pkgs/{digest}.zip")));
}

#[test]
fn a_file_remote_carries_packages_between_nodes_and_refuses_tampering() {
    let ws = setup();
    let shared = ws.path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let remote = format!("file://{}", shared.display());
    shared_remote_between_two_daemons(&ws, &remote, &[], &|key| shared.join(key).exists());

    // A tampered object: another package's zip under this digest's name.
    ws.write("wanted/a.txt", "wanted\n");
    let wanted = package(&ws, "wanted", &ws.path("wanted.zip"));
    ws.write("evil/a.txt", "evil\n");
    package(&ws, "evil", &shared.join(format!("pkgs/{wanted}.zip")));
    let node = Daemon::try_start_with(&ws, "c/renv.sock", &["--remote", &remote], &[]).unwrap();
    let before = ws.committed_packages();
    let (status, _, field, message) = api_error(node.post(
        "/v1/envs",
        &json!({"runtime_env": {"working_dir": format!("pkg://{wanted}")}}),
    ));
    assert_eq!(
        (status, field.as_deref()),
        (400, Some("working_dir")),
        "{message}"
    );
    assert!(
        message.contains(&wanted) && message.contains("nothing was kept"),
        "{message}"
    );
    assert_eq!(ws.committed_packages(), before);

    // Whoever can write the shared directory cannot make the daemon follow a symlink or
    // block on a FIFO there: only regular files are read.
    ws.write("linked/a.txt", "linked\n");
    let linked = package(&ws, "linked", &ws.path("linked.zip"));
    std::os::unix::fs::symlink(ws.path("linked.zip"), shared.join(format!("pkgs/{linked}.zip"))).unwrap();
    ws.write("piped/a.txt", "piped\n");
    let piped = package(&ws, "piped", &ws.path("piped.zip"));
    let fifo = shared.join(format!("pkgs/{piped}.zip"));
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for (digest, why) in [(&linked, "symlink"), (&piped, "not a regular file")] {
        let (status, _, field, message) = api_error(node.post(
            "/v1/envs",
            &json!({"runtime_env": {"working_dir": format!("pkg://{digest}")}}),
        ));
        assert_eq!(
            (status, field.as_deref()),
            (502, Some("working_dir")),
            "{message}"
        );
        assert!(message.contains(why), "{message}");
    }
    assert_eq!(ws.committed_packages(), before);

    // Not in the remote either: a 404 that says where renv looked.
    let absent = "0".repeat(64);
    let (status, _, _, message) = api_error(node.post(
        "/v1/envs",
        &json!({"runtime_env": {"working_dir": format!("pkg://{absent}")}}),
    ));
    assert_eq!(status, 404, "{message}");
    assert!(message.contains(&remote), "{message}");
}

#[test]
fn an_s3_remote_carries_packages_and_package_push_sends_each_once() {
    let ws = setup();
    let s3 = S3Server::start(&ws, "cluster");
    let remote = "s3://cluster/renv";
    shared_remote_between_two_daemons(&ws, remote, &s3.env(), &|key| {
        s3.list("renv/").contains(&format!("renv/{key}"))
    });

    ws.write("pushed/run.py", "print('pushed')\n");
    let push = || {
        let out = ws
            .renv()
            .envs(s3.env())
            .args(["package", "pushed", "--push", "--json", "--remote", remote])
            .output()
            .unwrap();
        assert_success(&out);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let first = push();
    let digest = first["digest"].as_str().unwrap();
    assert_eq!(first["pushed"], true);
    assert_eq!(first["uri"], format!("pkg://{digest}"));
    let second = push();
    assert_eq!(second["pushed"], false, "present already: nothing sent again");
    assert!(s3.list("renv/pkgs/").contains(&format!("renv/pkgs/{digest}.zip")));

    // `renv build` on a third store fetches it.
    let spec = ws.spec("pushed.json", &json!({"working_dir": format!("pkg://{digest}")}));
    let out = ws
        .renv()
        .envs(s3.env())
        .arg("build")
        .arg(&spec)
        .args(["--json", "--remote", remote, "--store"])
        .arg(ws.path("store-c"))
        .output()
        .unwrap();
    assert_success(&out);
    let built: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(digest_of(&built), digest);

    // Without --remote, --push is refused naming the flag.
    let out = ws.renv().args(["package", "pushed", "--push"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--remote"));
}

/// Users who push to a `file://` remote can write it; the root daemon pushing an upload
/// there must not write through a symlink they planted (here `pkgs` pointing at a
/// root-only directory), nor read through one.
#[test]
fn a_push_to_a_file_remote_never_writes_through_a_planted_symlink() {
    let ws = setup();
    let shared = ws.path("shared");
    let elsewhere = ws.path("root-only");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, shared.join("pkgs")).unwrap();
    ws.write("proj/main.py", "print('mine')\n");
    let digest = package(&ws, "proj", &ws.path("proj.zip"));
    let remote = format!("file://{}", shared.display());
    let daemon = Daemon::try_start_with(&ws, "run/renv.sock", &["--remote", &remote], &[]).unwrap();
    let zip = std::fs::read(ws.path("proj.zip")).unwrap();
    let mut body = std::io::Cursor::new(zip.clone());
    let answer = daemon
        .client()
        .send(
            "PUT",
            &format!("/v1/packages/{digest}"),
            Some(("application/zip", zip.len() as u64, &mut body)),
        )
        .unwrap()
        .into_json();
    let (status, kind, _, message) = api_error(answer);
    assert_eq!((status, kind.as_str()), (502, "remote_unavailable"), "{message}");
    assert!(message.contains("symlink"), "{message}");
    assert!(
        std::fs::read_dir(&elsewhere).unwrap().next().is_none(),
        "written through the symlink"
    );
    // Once the remote is sound again, the next upload pushes.
    std::fs::remove_file(shared.join("pkgs")).unwrap();
    let mut body = std::io::Cursor::new(zip.clone());
    let answer = daemon
        .client()
        .send(
            "PUT",
            &format!("/v1/packages/{digest}"),
            Some(("application/zip", zip.len() as u64, &mut body)),
        )
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(answer["pushed"], true);
    assert!(shared.join(format!("pkgs/{digest}.zip")).is_file());
}

/// Each build holds a blocking thread (here, a download from a slow server): one caller may
/// have only `--max-builds-per-uid` of them in flight; more are answered 429 at once, and
/// other callers (root here) are not held up.
#[test]
fn one_caller_cannot_hold_every_build_slot() {
    use std::os::unix::fs::PermissionsExt;
    let ws = setup();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = HttpServer::start(&ws.path("served"));
    crate::common::write_many(&ws.path("tree"), 20, 100_000);
    // One tree at three URIs: the two slow downloads also race to commit one package, and
    // the second must find it committed (and leased by the first's env), not wait for it.
    for name in ["a", "b", "c"] {
        package(&ws, "tree", &server.root.join(format!("{name}.zip")));
    }
    server.behave("slow");
    let allowed = format!("{}/", server.url);
    let daemon = Daemon::try_start_with(
        &ws,
        "run/renv.sock",
        &[
            "--allow-remote",
            &allowed,
            "--allow-uid",
            "1000",
            "--max-builds-per-uid",
            "2",
        ],
        &[],
    )
    .unwrap();
    std::fs::set_permissions(
        daemon.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let request = |name: &str| json!({"runtime_env": {"working_dir": format!("{}/{name}.zip", server.url)}});
    let socket = daemon.socket.clone();
    std::thread::scope(|scope| {
        let slow: Vec<_> = ["a", "b"]
            .map(|name| {
                let (socket, body) = (&socket, request(name));
                scope.spawn(move || crate::daemon::as_user(socket, 1000, "POST", "/v1/envs", Some(&body)))
            })
            .into_iter()
            .collect();
        wait_for(
            || (server.requests("GET", "/a.zip") + server.requests("GET", "/b.zip") == 2).then_some(()),
            "both slow downloads to start",
        );
        let (status, answer) = crate::daemon::as_user(&socket, 1000, "POST", "/v1/envs", Some(&request("c")));
        assert_eq!(
            (status, answer["error"]["kind"].as_str()),
            (429, Some("too_many")),
            "{answer}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--max-builds-per-uid")
        );
        // Another caller builds meanwhile.
        let root = daemon
            .post("/v1/envs", &json!({"runtime_env": {"env_vars": {"X": "1"}}}))
            .unwrap();
        assert!(root["env_id"].is_string(), "{root}");
        for handle in slow {
            let (status, answer) = handle.join().unwrap();
            assert_eq!(status, 200, "{answer}");
        }
    });
    // The slots are given back when the builds end.
    let (status, answer) = crate::daemon::as_user(&socket, 1000, "POST", "/v1/envs", Some(&request("c")));
    assert_eq!(status, 200, "{answer}");
}

/// A certificate authority and a certificate for 127.0.0.1 it signed, made with `openssl`:
/// (CA certificate, server certificate, server key).
fn test_ca(ws: &Workspace) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = ws.path("tls");
    std::fs::create_dir_all(&dir).unwrap();
    ws.write(
        "tls/server.ext",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    let script = "set -e
        ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
        openssl req -x509 $ec -keyout ca.key -out ca.pem -days 2 -subj '/CN=renv test CA' \\
            -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign'
        openssl req $ec -keyout server.key -out server.csr -subj '/CN=127.0.0.1'
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \\
            -days 2 -extfile server.ext";
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_success(&out);
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

/// https with renv's own TLS stack (rustls): a server whose CA the fetching process
/// trusts (here through `SSL_CERT_FILE`) is fetched from; one it does not is refused.
#[test]
fn https_zips_are_fetched_only_from_servers_the_system_trusts() {
    let ws = Workspace::new();
    let (ca, cert, key) = test_ca(&ws);
    let server = HttpServer::start_tls(&ws.path("served"), &cert, &key);
    assert!(server.url.starts_with("https://"));
    ws.write("tree/a.txt", "over tls\n");
    let digest = package(&ws, "tree", &server.root.join("wd.zip"));
    let spec = ws.spec(
        "wd.json",
        &json!({"working_dir": format!("{}/wd.zip", server.url)}),
    );

    // Trusting only another CA (the server's own certificate is no CA).
    let out = ws
        .renv()
        .env("SSL_CERT_FILE", &cert)
        .arg("build")
        .arg(&spec)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "fetched from a server whose CA is not trusted"
    );
    assert!(ws.committed_packages().is_empty());

    let out = ws
        .renv()
        .env("SSL_CERT_FILE", &ca)
        .args(["build", "--json"])
        .arg(&spec)
        .output()
        .unwrap();
    assert_success(&out);
    let built: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(digest_of(&built), digest);
}
