//! `py_modules`, with Ray's semantics: a local directory importable by its name, a zip
//! and a `pkg://` package as they are, all on `PYTHONPATH` after the working_dir; a wheel
//! installed into the env.

use serde_json::{Value, json};

use crate::common::{HttpServer, Workspace, assert_success, wheelhouse};

const DELTA: &str = "delta-1.0-py3-none-any.whl";

#[test]
fn wheels_are_installed_into_the_env_and_known_by_their_content() {
    let ws = Workspace::new();
    wheelhouse(&ws.path("w1"), &[("delta", "1.0", "V = 'one'\n")]);
    wheelhouse(&ws.path("w2"), &[("delta", "1.0", "V = 'two, rebuilt'\n")]);
    let run = |spec: &std::path::Path| {
        let out = ws
            .renv()
            .arg("run")
            .arg(spec)
            .args([
                "--",
                "python",
                "-c",
                "import delta, sys; print(delta.V, sys.prefix != sys.base_prefix)",
            ])
            .output()
            .unwrap();
        assert_success(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    // A wheel alone makes an env to install it into.
    let one = ws.spec("one.json", &json!({"py_modules": [format!("w1/{DELTA}")]}));
    assert_eq!(run(&one), "one True\n");
    let built = ws.build(&one);
    assert_eq!(built["package"], Value::Null, "a wheel is not put on PYTHONPATH");
    // The same file name with other bytes is another env.
    let two = ws.spec("two.json", &json!({"py_modules": [format!("w2/{DELTA}")]}));
    assert_eq!(run(&two), "two, rebuilt True\n");
    assert_ne!(ws.build(&two)["env_id"], built["env_id"]);
    // From a remote, once per revision, beside a requirement-free pip field.
    let server = HttpServer::start(&ws.path("served"));
    std::fs::copy(ws.path(&format!("w1/{DELTA}")), server.root.join(DELTA)).unwrap();
    let remote = ws.spec(
        "remote.json",
        &json!({"py_modules": [format!("{}/{DELTA}", server.url)]}),
    );
    assert_eq!(run(&remote), "one True\n");
    assert_eq!(
        ws.build(&remote)["env_id"],
        built["env_id"],
        "same bytes, same env"
    );
    assert_eq!(server.requests("GET", &format!("/{DELTA}")), 1);
    // Not a working_dir.
    let bad = ws.spec("bad.json", &json!({"working_dir": format!("w1/{DELTA}")}));
    let (code, err) = ws.build_fails(&bad, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("working_dir: a wheel cannot be the working_dir"),
        "{err}"
    );
}

const IMPORT_ALL: &str = "import sys, alpha, beta, gamma; print(alpha.V, beta.V, gamma.V); \
     print([p.rsplit('/', 1)[-1][:8] for p in sys.path[1:5]])";

/// Three modules: a directory (`mods/alpha`, with a file the excludes drop), a zip
/// holding `beta/`, and a stored package holding `gamma/`; returns its `pkg://` URI.
fn modules(ws: &Workspace) -> String {
    ws.write("wd/main.py", "");
    ws.write("mods/alpha/__init__.py", "V = 'a'\n");
    ws.write("mods/alpha/scratch.tmp", "dropped");
    ws.write("zsrc/beta/__init__.py", "V = 'b'\n");
    ws.package_zip("zsrc", "beta.zip");
    ws.write("gsrc/gamma/__init__.py", "V = 'g'\n");
    let out = ws.renv().args(["package", "gsrc", "--json"]).output().unwrap();
    assert_success(&out);
    let stored: Value = serde_json::from_slice(&out.stdout).unwrap();
    format!("pkg://{}", stored["digest"].as_str().unwrap())
}

#[test]
fn a_directory_a_zip_and_a_package_are_each_importable() {
    let ws = Workspace::new();
    let gamma = modules(&ws);
    let spec = ws.spec(
        "env.json",
        &json!({"working_dir": "wd", "py_modules": ["mods/alpha", "beta.zip", gamma], "excludes": ["*.tmp"]}),
    );
    let out = ws
        .renv()
        .args(["run"])
        .arg(&spec)
        .args(["--", "python3", "-c", IMPORT_ALL])
        .output()
        .unwrap();
    assert_success(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("a b g"));
    let built = ws.build(&spec);
    let python_path = built["env"]["PYTHONPATH"].as_str().unwrap();
    let entries: Vec<&str> = python_path.split(':').collect();
    assert_eq!(entries.len(), 4, "{python_path}");
    assert_eq!(
        entries[0],
        built["working_dir"].as_str().unwrap(),
        "the working_dir first"
    );
    // The directory is packaged under its own name, without what the excludes drop.
    let alpha = std::path::Path::new(entries[1]);
    assert_eq!(crate::common::list_dir(alpha), ["alpha"]);
    assert_eq!(crate::common::list_dir(&alpha.join("alpha")), ["__init__.py"]);
    // The same modules in another order are another env.
    let swapped = ws.spec(
        "swapped.json",
        &json!({"working_dir": "wd", "py_modules": ["beta.zip", "mods/alpha", gamma], "excludes": ["*.tmp"]}),
    );
    assert_ne!(ws.build(&swapped)["env_id"], built["env_id"]);
}

#[test]
fn bad_py_modules_are_refused_naming_the_entry() {
    let ws = Workspace::new();
    for (modules, expected) in [
        (json!("mods"), "py_modules: expected a list of strings"),
        (json!(["ok", 3]), "py_modules[1]: expected a string"),
        (json!(["x.whl"]), "py_modules[0]: expected a wheel file name"),
        (
            json!(["s3://bucket/m.whl"]),
            "py_modules[0]: expected a wheel file name",
        ),
        (
            json!(["pkg://nothex/delta-1.0-py3-none-any.whl"]),
            "py_modules[0]: expected pkg://<64 lowercase hex digits>/<file>.whl",
        ),
        (
            json!(["pkg://abc"]),
            "py_modules[0]: expected pkg://<64 lowercase hex digits>",
        ),
    ] {
        let spec = ws.spec("bad.json", &json!({"py_modules": modules}));
        let (code, err) = ws.build_fails(&spec, &[]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(expected), "{expected:?} not in {err}");
    }
    let spec = ws.spec("missing.json", &json!({"py_modules": ["nowhere"]}));
    let (code, err) = ws.build_fails(&spec, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("nowhere"), "{err}");
}

/// The job CLI packages local modules itself and the daemon gets `pkg://` URIs; the
/// daemon refuses a local path outright (it never reads a client's files).
#[test]
fn a_job_gets_its_local_modules_through_the_daemon() {
    let ws = Workspace::new();
    let gamma = modules(&ws);
    wheelhouse(&ws.path("wheels"), &[("delta", "1.0", "V = 'd'\n")]);
    let socket = ws.path("renv.sock");
    let mut daemon = ws
        .renv()
        .args(["daemon", "--gpus", "none", "--socket"])
        .arg(&socket)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "daemon did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let runtime_env = json!({
        "working_dir": "wd",
        "py_modules": ["mods/alpha", "beta.zip", gamma, format!("wheels/{DELTA}")],
        "excludes": ["*.tmp"],
    });
    let out = ws
        .renv()
        .env("RENV_SOCKET", &socket)
        .args([
            "submit",
            "--runtime-env-json",
            &runtime_env.to_string(),
            "--",
            "python",
            "-c",
            &format!("{IMPORT_ALL}; import delta; print(delta.V)"),
        ])
        .output()
        .unwrap();
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("a b g\n") && stdout.ends_with("d\n"),
        "{stdout}"
    );

    let client = renv::client::Client::new(&socket);
    let local = json!({"runtime_env": {"py_modules": ["mods/alpha"]}});
    match client.json("POST", "/v1/envs", Some(&local)) {
        Err(renv::client::ClientError::Api { status, message, .. }) => {
            assert_eq!(status, 400);
            assert!(
                message.contains("py_modules[0]") && message.contains("local path"),
                "{message}"
            );
        }
        other => panic!("a local py_module was accepted: {other:?}"),
    }
    let missing =
        json!({"runtime_env": {"py_modules": [gamma.clone(), format!("pkg://{}", "a".repeat(64))]}});
    match client.json("POST", "/v1/envs", Some(&missing)) {
        Err(renv::client::ClientError::Api { status, field, .. }) => {
            assert_eq!((status, field.as_deref()), (404, Some("py_modules[1]")));
        }
        other => panic!("a missing package was accepted: {other:?}"),
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// A tenant's wheel uploaded as `pkg://<digest>/<file>.whl` is installed by a real build
/// user (who can read the stored file) into that caller's env.
#[test]
fn a_stored_wheel_installs_under_a_build_user() {
    use std::os::unix::fs::PermissionsExt;
    const BUILDER: u32 = 1093;
    let ws = crate::daemon::setup();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    wheelhouse(&ws.path("w/delta"), &[("delta", "1.0", "V = 'wheel ok'\n")]);
    ws.package_zip("w/delta", "delta.zip");
    let out = ws.renv().args(["package", "w/delta", "--json"]).output().unwrap();
    assert_success(&out);
    let digest = serde_json::from_slice::<Value>(&out.stdout).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let python = crate::common::shared_python().to_str().unwrap();
    let daemon = crate::daemon::Daemon::start(
        &ws,
        &[
            "--gpus",
            "none",
            "--allow-uid",
            "1000",
            "--python",
            python,
            "--build-user",
            &BUILDER.to_string(),
        ],
    );
    std::fs::set_permissions(
        daemon.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let zip = std::fs::read(ws.path("delta.zip")).unwrap();
    let mut body = std::io::Cursor::new(zip.clone());
    daemon
        .client()
        .send(
            "PUT",
            &format!("/v1/packages/{digest}"),
            Some(("application/zip", zip.len() as u64, &mut body)),
        )
        .unwrap();
    let env = json!({"py_modules": [format!("pkg://{digest}/{DELTA}")]});
    let out = crate::daemon::python_as(&daemon, 1000, &env, "import delta; print(delta.V)");
    assert_eq!(out.trim(), "wheel ok");
}
