//! A real daemon on a socket in a temp dir, driven over HTTP (renv's client and curl).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use renv::client::{Client, ClientError};
use serde_json::{Value, json};

use crate::common::{Workspace, assert_success, list_dir, wheelhouse};

pub(crate) struct Daemon {
    child: Option<Child>,
    pub(crate) socket: PathBuf,
}

impl Daemon {
    pub(crate) fn start(ws: &Workspace, extra: &[&str]) -> Daemon {
        Self::try_start(ws, extra).expect("daemon started")
    }

    fn try_start(ws: &Workspace, extra: &[&str]) -> Result<Daemon, String> {
        Self::try_start_with(ws, "run/renv.sock", extra, &[])
    }

    /// A daemon on the socket `socket` (relative to the workspace), with more variables
    /// in its environment.
    pub(crate) fn try_start_with(
        ws: &Workspace,
        socket: &str,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Result<Daemon, String> {
        let socket = ws.path(socket);
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let mut child = ws
            .renv()
            .envs(env.iter().map(|(k, v)| (*k, v)))
            .args(["daemon", "--socket"])
            .arg(&socket)
            .args(["--find-links"])
            .arg(ws.path("wheels"))
            .args(["--no-index", "--stop-grace-seconds", "2"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        // Answering, not just connectable: a daemon killed a moment ago may have left its
        // listener in a child not yet exec'd (it holds copies of the descriptors), which
        // takes a connection and then resets it.
        let answers = || {
            UnixStream::connect(&socket).is_ok() && Client::new(&socket).json("GET", "/healthz", None).is_ok()
        };
        while !answers() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                return Err(format!("{status}: {err}"));
            }
            assert!(start.elapsed() < Duration::from_secs(30), "daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Daemon {
            child: Some(child),
            socket,
        })
    }

    pub(crate) fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    pub(crate) fn get(&self, path: &str) -> Value {
        self.client().json("GET", path, None).unwrap()
    }

    /// A value from `/metrics`.
    pub(crate) fn metric(&self, name: &str) -> f64 {
        let mut text = String::new();
        self.client()
            .send("GET", "/metrics", None)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
            .parse()
            .unwrap()
    }

    pub(crate) fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.client().json("POST", path, Some(body))
    }

    /// SIGKILL: the daemon dies at whatever it was doing; its workers live on.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub(crate) fn shutdown(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    /// The daemon still answers `/healthz` and a cached env request.
    fn assert_healthy(&self, spec: &Value) {
        assert_eq!(self.get("/healthz")["ok"], true);
        // (With a build user, envs are per caller: root's may be new.)
        self.post("/v1/envs", &json!({"runtime_env": spec})).unwrap();
        let env = self.post("/v1/envs", &json!({"runtime_env": spec})).unwrap();
        assert_eq!(env["created"], false);
        self.client()
            .json(
                "DELETE",
                &format!("/v1/envs/{}", env["env_id"].as_str().unwrap()),
                None,
            )
            .unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn setup() -> Workspace {
    let ws = Workspace::new();
    wheelhouse(&ws.path("wheels"), &[("tinypkg", "1.0", "VERSION = '1.0'\n")]);
    ws
}

pub(crate) fn api_error(result: Result<Value, ClientError>) -> (u16, String, Option<String>, String) {
    match result {
        Err(ClientError::Api {
            status,
            kind,
            field,
            message,
        }) => (status, kind, field, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[test]
fn get_or_create_takes_references_and_release_gives_them_back() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &[]);
    let spec = json!({"pip": ["tinypkg==1.0"], "env_vars": {"A": "1"}});
    let first = daemon
        .post("/v1/envs", &json!({"runtime_env": spec, "ref": "job-1"}))
        .unwrap();
    assert_eq!(first["created"], true);
    assert!(first["python"].as_str().unwrap().contains("/store-v1/envs/"));
    assert_eq!(first["env"]["A"], "1");
    let id = first["env_id"].as_str().unwrap().to_string();
    let second = daemon
        .post(
            "/v1/envs",
            &json!({"runtime_env": {"env_vars": {"A": "1"}, "pip": {"packages": ["tinypkg==1.0"]}}}),
        )
        .unwrap();
    assert_eq!(second["env_id"], id, "another spelling, the same env");
    assert_eq!(second["created"], false);
    let listed = daemon.get("/v1/envs");
    assert_eq!(listed["envs"][0]["refs"], 2);
    assert_eq!(listed["envs"][0]["ref_tags"], json!(["job-1"]));
    assert!(
        listed["envs"][0]["venv_bytes"].as_u64().unwrap() > 1000,
        "{listed}"
    );
    assert!(listed["envs"][0]["last_used"].as_f64().unwrap() > 0.0);

    // Keep-alive: several requests on one connection.
    let mut session = daemon.client().session().unwrap();
    for _ in 0..3 {
        assert_eq!(
            session.json("GET", "/v1/envs", None).unwrap()["envs"][0]["refs"],
            2
        );
        assert_eq!(session.json("GET", "/healthz", None).unwrap()["ok"], true);
    }
    let client = daemon.client();
    assert_eq!(
        client.json("DELETE", &format!("/v1/envs/{id}"), None).unwrap()["refs"],
        1
    );
    assert_eq!(
        client.json("DELETE", &format!("/v1/envs/{id}"), None).unwrap()["refs"],
        0
    );
    let (status, kind, _, _) = api_error(client.json("DELETE", &format!("/v1/envs/{id}"), None));
    assert_eq!((status, kind.as_str()), (409, "conflict"));

    let (status, kind, field, message) =
        api_error(daemon.post("/v1/envs", &json!({"runtime_env": {"env_vars": {"FOO": 1}}})));
    assert_eq!(
        (status, kind.as_str(), field.as_deref()),
        (400, "bad_spec", Some("env_vars.FOO"))
    );
    assert_eq!(message, "expected a string, got 1");
    let (status, _, field, message) =
        api_error(daemon.post("/v1/envs", &json!({"runtime_env": {"working_dir": "./"}})));
    assert_eq!((status, field.as_deref()), (400, Some("working_dir")));
    assert!(message.contains("never reads a client's files"), "{message}");
    let (status, kind, ..) = api_error(daemon.post(
        "/v1/envs",
        &json!({"runtime_env": {"working_dir": format!("pkg://{}", "0".repeat(64))}}),
    ));
    assert_eq!((status, kind.as_str()), (404, "not_found"));
}

/// A request's exact text is remembered for the fast path once answered, also when it
/// spells an env first built from another spelling; that memory answers nothing the slow
/// path would not: the same bytes from another caller get that caller's own env and
/// checks, what is checked per request is checked every time, and an env gone from the
/// store is built again. References taken together (their commits shared) are all saved.
#[test]
fn a_remembered_request_text_answers_only_what_the_slow_path_would() {
    let ws = setup();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = ["--gpus", "none", "--allow-uid", "1000"];
    let mut daemon = Daemon::start(&ws, &args);
    let open_socket_dir = |daemon: &Daemon| {
        std::fs::set_permissions(
            daemon.socket.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap()
    };
    open_socket_dir(&daemon);
    let first = json!({"runtime_env": {"pip": ["tinypkg==1.0"]}});
    let other = json!({"runtime_env": {"pip": {"packages": ["tinypkg==1.0"]}}});
    let built = daemon.post("/v1/envs", &first).unwrap();
    assert_eq!(built["created"], true);
    let id = built["env_id"].as_str().unwrap().to_string();
    // Found by its canonical form once, by its text after.
    for _ in 0..3 {
        let again = daemon.post("/v1/envs", &other).unwrap();
        assert_eq!(
            (again["env_id"].as_str(), &again["created"]),
            (Some(id.as_str()), &json!(false))
        );
    }

    // The same bytes from another caller: the same env (the daemon's installers run as
    // itself here: envs are shared), its own reference, its own answer.
    let (status, theirs) = as_user(&daemon.socket, 1000, "POST", "/v1/envs", Some(&other));
    assert_eq!(status, 200, "{theirs}");
    assert_eq!(
        (&theirs["env_id"], &theirs["created"]),
        (&built["env_id"], &json!(false))
    );
    let cache = |answer: &Value| answer["env"]["PYTHONPYCACHEPREFIX"].as_str().unwrap().to_string();
    assert_ne!(cache(&theirs), cache(&built), "a bytecode cache of its own");
    let (_, listed) = as_user(&daemon.socket, 1000, "GET", "/v1/envs", None);
    assert_eq!(listed["envs"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["envs"][0]["refs"], 1);
    // ... and its own checks: a file only the daemon's user and root may name.
    ws.write("proj/main.py", "print('hi')\n");
    ws.package_zip("proj", "p.zip");
    let zip = json!({"runtime_env": {"working_dir": format!("file://{}", ws.path("p.zip").display())}});
    daemon.post("/v1/envs", &zip).unwrap();
    daemon.post("/v1/envs", &zip).unwrap();
    let (status, refused) = as_user(&daemon.socket, 1000, "POST", "/v1/envs", Some(&zip));
    assert_eq!(
        (status, &refused["error"]["kind"]),
        (403, &json!("forbidden")),
        "{refused}"
    );
    // What is checked per request is checked with remembered bytes too.
    let long_tag = json!({"runtime_env": other["runtime_env"], "ref": "x".repeat(300)});
    let (status, kind, field, _) = api_error(daemon.post("/v1/envs", &long_tag));
    assert_eq!(
        (status, kind.as_str(), field.as_deref()),
        (400, "bad_request", Some("ref"))
    );

    // Many references at once: all answered, all saved (a kill -9 loses none).
    let answered: usize = std::thread::scope(|s| {
        let threads: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    let client = daemon.client();
                    (0..20)
                        .filter(|_| client.json("POST", "/v1/envs", Some(&other)).is_ok())
                        .count()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    assert_eq!(answered, 320);
    assert!(daemon.metric("renv_state_commits_total") <= daemon.metric("renv_state_writes_total"));
    daemon.kill9();
    daemon = Daemon::start(&ws, &args);
    open_socket_dir(&daemon);
    let refs_of = |daemon: &Daemon, id: &str| -> u64 {
        daemon.get("/v1/envs")["envs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|env| env["env_id"] == id)
            .map_or(0, |env| env["refs"].as_u64().unwrap())
    };
    assert_eq!(refs_of(&daemon, &id), 1 + 3 + 320 + 1, "root's, and uid 1000's");

    // Remembered again (the restarted daemon remembers nothing); then every reference
    // given back and the env pruned from the store: the remembered text builds it again.
    assert_eq!(daemon.post("/v1/envs", &other).unwrap()["created"], false);
    let client = daemon.client();
    for _ in 0..325 {
        client.json("DELETE", &format!("/v1/envs/{id}"), None).unwrap();
    }
    let release = format!("/v1/envs/{id}");
    assert_eq!(as_user(&daemon.socket, 1000, "DELETE", &release, None).0, 200);
    let venv = Path::new(built["python"].as_str().unwrap())
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let pruned = ws
        .renv()
        .args(["prune", "--json", "--max-size", "0", "--min-age", "0s"])
        .output()
        .unwrap();
    assert_success(&pruned);
    assert!(!venv.exists(), "{}", String::from_utf8_lossy(&pruned.stdout));
    for expected_created in [true, false] {
        let again = daemon.post("/v1/envs", &other).unwrap();
        assert_eq!(again["env_id"], id.as_str());
        assert_eq!(again["created"], expected_created);
        assert!(Path::new(again["python"].as_str().unwrap()).exists());
    }
    assert_eq!(refs_of(&daemon, &id), 2);
}

/// With a build user, envs are per caller, and so is what the fast path remembers: the
/// same bytes, remembered for one caller, are another's own env.
#[test]
fn remembered_request_texts_are_per_caller_with_a_build_user() {
    const BUILDER: u32 = 1094;
    let ws = setup();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let python = crate::common::shared_python().to_str().unwrap();
    let daemon = Daemon::start(
        &ws,
        &[
            "--gpus",
            "none",
            "--allow-uid",
            "1000",
            "--allow-uid",
            "1001",
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
    let first = json!({"runtime_env": {"pip": ["tinypkg==1.0"]}});
    let other = json!({"runtime_env": {"pip": {"packages": ["tinypkg==1.0"]}}});
    let post = |uid: u32, body: &Value| {
        let (status, answer) = as_user(&daemon.socket, uid, "POST", "/v1/envs", Some(body));
        assert_eq!(status, 200, "{answer}");
        answer
    };
    let mine = post(1000, &first)["env_id"].clone();
    for _ in 0..3 {
        assert_eq!(post(1000, &other)["env_id"], mine);
    }
    let theirs = post(1001, &other);
    assert_ne!(theirs["env_id"], mine, "another caller's own env");
    assert_eq!(theirs["created"], true);
    assert_eq!(post(1001, &other)["env_id"], theirs["env_id"]);
    assert_eq!(post(1000, &other)["env_id"], mine);
}

#[test]
fn fifty_concurrent_requests_share_one_build_and_one_failure() {
    let ws = setup();
    let (counting, calls) = crate::common::counting_uv(&ws);
    let daemon = Daemon::start(&ws, &["--uv", counting.to_str().unwrap()]);
    let ask = |spec: Value| -> Vec<Result<Value, ClientError>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..50)
                .map(|_| s.spawn(|| daemon.post("/v1/envs", &json!({"runtime_env": spec}))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let results = ask(json!({"pip": ["tinypkg==1.0"]}));
    let ids: Vec<&Value> = results.iter().map(|r| &r.as_ref().unwrap()["env_id"]).collect();
    assert!(ids.iter().all(|id| *id == ids[0]));
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(crate::common::builds(&log), 1, "{log}");
    assert_eq!(daemon.get("/v1/envs")["envs"][0]["refs"], 50);

    // One failure reaches every waiter, and is not remembered.
    let results = ask(json!({"pip": ["late-package==1.0"]}));
    let messages: Vec<String> = results.into_iter().map(|r| api_error(r).3).collect();
    assert!(
        messages
            .iter()
            .all(|m| m == &messages[0] && m.contains("late-package")),
        "{}",
        messages[0]
    );
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(
        crate::common::builds(&log),
        2,
        "one more build for the failure: {log}"
    );
    wheelhouse(&ws.path("wheels"), &[("late-package", "1.0", "")]);
    daemon
        .post(
            "/v1/envs",
            &json!({"runtime_env": {"pip": ["late-package==1.0"]}}),
        )
        .unwrap();

    // Different specs (their env_vars differ) that need one env share its failing build
    // too, instead of each waiter building it again.
    let builds_before = crate::common::builds(&std::fs::read_to_string(&calls).unwrap());
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let spec = json!({"pip": ["never-package==1.0"], "env_vars": {"N": i.to_string()}});
                let daemon = &daemon;
                s.spawn(move || daemon.post("/v1/envs", &json!({"runtime_env": spec})))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        results
            .into_iter()
            .all(|r| api_error(r).3.contains("never-package"))
    );
    let log = std::fs::read_to_string(&calls).unwrap();
    let builds = crate::common::builds(&log) - builds_before;
    assert!(
        builds < 4,
        "8 requests for one failing env made {builds} builds: {log}"
    );
}

#[test]
fn package_uploads_are_verified_and_capped() {
    let ws = setup();
    ws.write("proj/main.py", "print('main')\n");
    let out = ws
        .renv()
        .args(["package", "proj", "-o", "proj.zip", "--json"])
        .output()
        .unwrap();
    assert_success(&out);
    let digest = serde_json::from_slice::<Value>(&out.stdout).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let daemon = Daemon::start(&ws, &["--max-unpacked-bytes", "100000"]);
    let client = daemon.client();
    let put = |digest: &str, bytes: &[u8]| {
        let mut body = std::io::Cursor::new(bytes.to_vec());
        client
            .send(
                "PUT",
                &format!("/v1/packages/{digest}"),
                Some(("application/zip", bytes.len() as u64, &mut body)),
            )
            .unwrap()
            .into_json()
    };
    assert_eq!(
        client
            .send("HEAD", &format!("/v1/packages/{digest}"), None)
            .unwrap()
            .status,
        404
    );
    let zip = std::fs::read(ws.path("proj.zip")).unwrap();
    let wrong = "ab".repeat(32);
    let (status, _, field, message) = api_error(put(&wrong, &zip));
    assert_eq!((status, field.as_deref()), (400, Some("digest")));
    assert!(message.contains(&digest), "{message}");
    assert!(
        ws.committed_packages().is_empty(),
        "a mismatched upload keeps nothing"
    );
    let (status, kind, ..) = api_error(put(&digest, &vec![0u8; 200_000]));
    assert_eq!((status, kind.as_str()), (413, "too_large"));
    assert_eq!(put(&digest, &zip).unwrap()["created"], true);
    assert_eq!(
        client
            .send("HEAD", &format!("/v1/packages/{digest}"), None)
            .unwrap()
            .status,
        200
    );
    let env = daemon
        .post(
            "/v1/envs",
            &json!({"runtime_env": {"working_dir": format!("pkg://{digest}")}}),
        )
        .unwrap();
    assert!(env["cwd"].as_str().unwrap().ends_with(&digest));
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}

#[test]
fn the_socket_is_private_and_other_users_are_refused() {
    let ws = setup();
    let mut daemon = Daemon::start(&ws, &[]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&daemon.socket), 0o600);
    // Open the file permissions up by hand: SO_PEERCRED must still turn `nobody` away.
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        daemon.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = daemon.socket.clone();
    let as_nobody = |method: &str, path: &str, body: &str| -> String {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "curl",
                "-s",
                "--unix-socket",
            ])
            .arg(&socket)
            .args(["-X", method, "-d", body, &format!("http://renv{path}")])
            .output()
            .expect("setpriv");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let answer = as_nobody("POST", "/v1/envs", r#"{"runtime_env": {"env_vars": {"A": "1"}}}"#);
    assert!(answer.contains("\"forbidden\""), "{answer}");
    assert!(
        daemon.get("/v1/envs")["envs"].as_array().unwrap().is_empty(),
        "nothing changed"
    );
    daemon.shutdown();
    assert!(!daemon.socket.exists(), "the socket goes with the daemon");

    // Allowed users and groups connect with no chmod: the daemon grants exactly them
    // access (a POSIX ACL), and everyone else still cannot even connect.
    let daemon = Daemon::start(&ws, &["--allow-uid", "65534", "--allow-gid", "65534"]);
    assert_eq!(mode(&daemon.socket), 0o660, "group bits show the ACL's mask");
    assert!(as_nobody("GET", "/healthz", "").contains("\"ok\":true"));
    let out = Command::new("setpriv")
        .args([
            "--reuid=1001",
            "--regid=1001",
            "--clear-groups",
            "curl",
            "-s",
            "--unix-socket",
        ])
        .arg(&daemon.socket)
        .arg("http://renv/healthz")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "uid 1001 is not allowed to connect"
    );
}

#[test]
fn unsafe_socket_locations_are_refused() {
    let ws = setup();
    std::fs::create_dir_all(ws.path("run")).unwrap();
    std::fs::set_permissions(ws.path("run"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = Daemon::try_start(&ws, &[]).err().expect("refused");
    assert!(err.contains("others can write"), "{err}");
    std::fs::set_permissions(ws.path("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(ws.path("run/renv.sock"), "not a socket").unwrap();
    let err = Daemon::try_start(&ws, &[]).err().expect("refused");
    assert!(err.contains("not a socket"), "{err}");
    std::fs::remove_file(ws.path("run/renv.sock")).unwrap();
    let first = Daemon::start(&ws, &[]);
    // (A store of its own: one store has one daemon anyway.)
    let second = ws
        .renv()
        .args(["daemon", "--gpus", "none", "--store"])
        .arg(ws.path("other-store"))
        .arg("--socket")
        .arg(&first.socket)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serving"));
    first.assert_healthy(&json!({"env_vars": {"A": "1"}}));
}

/// The whole of a worker's stdout or stderr so far.
pub(crate) fn logs(daemon: &Daemon, id: &str, stream: &str) -> String {
    let mut out = String::new();
    let path = format!("/v1/workers/{id}/logs?stream={stream}");
    daemon
        .client()
        .send("GET", &path, None)
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

pub(crate) fn wait_for_end(daemon: &Daemon, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let info = daemon.get(&format!("/v1/workers/{id}"));
        if info["state"] != "running" {
            return info;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "worker {id} never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn start_worker(daemon: &Daemon, body: Value) -> Result<Value, ClientError> {
    daemon.post("/v1/workers", &body)
}

#[test]
fn workers_report_exits_signals_stops_and_logs() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &["--gpus", "none"]);
    let env = json!({"env_vars": {"GREETING": "hello"}});
    let w = start_worker(&daemon, json!({"runtime_env": env, "argv": ["sh", "-c", "echo $GREETING; echo oops >&2; exit 3"], "name": "three"})).unwrap();
    let id = w["worker_id"].as_str().unwrap();
    let info = wait_for_end(&daemon, id);
    assert_eq!(
        (info["state"].as_str(), info["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );
    assert_eq!(info["name"], "three");
    assert_eq!(
        logs(&daemon, id, "stdout"),
        "hello
"
    );
    assert_eq!(
        logs(&daemon, id, "stderr"),
        "oops
"
    );

    let w = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["sh", "-c", "kill -9 $$"]}),
    )
    .unwrap();
    let info = wait_for_end(&daemon, w["worker_id"].as_str().unwrap());
    assert_eq!(
        (info["state"].as_str(), info["signal"].as_i64()),
        (Some("failed"), Some(9))
    );

    let ok = start_worker(&daemon, json!({"runtime_env": env, "argv": ["true"]})).unwrap();
    assert_eq!(
        wait_for_end(&daemon, ok["worker_id"].as_str().unwrap())["state"],
        "succeeded"
    );

    // Stop: SIGTERM to the whole group (a grandchild too), and follow streams to the end.
    let w = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["sh", "-c", "sleep 60 & echo started; wait"]}),
    )
    .unwrap();
    let id = w["worker_id"].as_str().unwrap().to_string();
    let follower = {
        let client = daemon.client();
        let id = id.clone();
        std::thread::spawn(move || {
            let mut out = String::new();
            client
                .send("GET", &format!("/v1/workers/{id}/logs?follow=true"), None)
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            out
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let stopped = daemon
        .client()
        .json("DELETE", &format!("/v1/workers/{id}"), None)
        .unwrap();
    assert_eq!(stopped["worker_id"], id.as_str());
    let info = wait_for_end(&daemon, &id);
    assert_eq!(
        (info["state"].as_str(), info["signal"].as_i64()),
        (Some("stopped"), Some(15))
    );
    assert_eq!(follower.join().unwrap(), "started\n");
    let (status, ..) = api_error(daemon.client().json("DELETE", &format!("/v1/workers/{id}"), None));
    assert_eq!(status, 409);
    let (status, ..) = api_error(daemon.client().json("GET", "/v1/workers/nope", None));
    assert_eq!(status, 404);
    assert_eq!(daemon.get("/v1/workers")["workers"].as_array().unwrap().len(), 4);
}

#[test]
fn gpus_are_allocated_exclusively_and_freed() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &["--gpus", "0,1,2,3"]);
    let env = json!({"env_vars": {"X": "1"}});
    let cuda = r#"echo "[$CUDA_VISIBLE_DEVICES] $CUDA_DEVICE_ORDER"; sleep 1"#;
    let a = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["sh", "-c", cuda], "num_gpus": 2}),
    )
    .unwrap();
    let b = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["sh", "-c", cuda], "num_gpus": 2}),
    )
    .unwrap();
    let (ga, gb): (Vec<u64>, Vec<u64>) = (
        serde_json::from_value(a["gpus"].clone()).unwrap(),
        serde_json::from_value(b["gpus"].clone()).unwrap(),
    );
    assert_eq!(ga.len() + gb.len(), 4);
    assert!(
        ga.iter().all(|g| !gb.contains(g)),
        "disjoint while both run: {ga:?} {gb:?}"
    );
    let (status, kind, field, message) = api_error(start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["true"], "num_gpus": 1}),
    ));
    assert_eq!(
        (status, kind.as_str(), field.as_deref()),
        (503, "busy", Some("num_gpus"))
    );
    assert!(message.contains("0 of 4 GPUs are free"), "{message}");
    let (status, _, field, _) = api_error(start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["true"], "gpus": [9]}),
    ));
    assert_eq!((status, field.as_deref()), (400, Some("gpus")));

    for w in [&a, &b] {
        let id = w["worker_id"].as_str().unwrap();
        wait_for_end(&daemon, id);
        let out = logs(&daemon, id, "stdout");
        let ids: Vec<String> = w["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(
            out.trim(),
            format!("[{}] PCI_BUS_ID", ids.join(",")),
            "what the worker saw"
        );
    }
    let c = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["sh", "-c", cuda], "num_gpus": 4}),
    )
    .unwrap();
    assert_eq!(c["gpus"], json!([0, 1, 2, 3]), "freed after exit");
    let none = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["sh", "-c", "echo \"[${CUDA_VISIBLE_DEVICES-unset}]\""]}),
    )
    .unwrap();
    let id = none["worker_id"].as_str().unwrap();
    wait_for_end(&daemon, id);
    let out = logs(&daemon, id, "stdout");
    assert_eq!(
        out, "[]\n",
        "no GPUs: an empty CUDA_VISIBLE_DEVICES, not the daemon's"
    );
}

#[test]
fn hostile_clients_do_not_take_the_daemon_down() {
    let ws = setup();
    let daemon = Daemon::start(
        &ws,
        &["--max-json-bytes", "10000", "--header-timeout-seconds", "2"],
    );
    let spec = json!({"pip": ["tinypkg==1.0"]});
    daemon.post("/v1/envs", &json!({"runtime_env": spec})).unwrap();

    // Malformed HTTP.
    let mut raw = UnixStream::connect(&daemon.socket).unwrap();
    raw.write_all(b"\x00\x01GARBAGE / NOT-HTTP\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    daemon.assert_healthy(&spec);

    // Malformed JSON, unknown fields, oversized bodies.
    let client = daemon.client();
    let raw_post = |body: &[u8]| {
        let mut cursor = std::io::Cursor::new(body.to_vec());
        client
            .send(
                "POST",
                "/v1/envs",
                Some(("application/json", body.len() as u64, &mut cursor)),
            )
            .unwrap()
            .into_json()
    };
    let (status, kind, ..) = api_error(raw_post(b"{not json"));
    assert_eq!((status, kind.as_str()), (400, "bad_json"));
    let (status, kind, ..) = api_error(raw_post(br#"{"runtime_env": {}, "surprise": 1}"#));
    assert_eq!((status, kind.as_str()), (400, "bad_json"));
    let big = format!(
        r#"{{"runtime_env": {{"env_vars": {{"A": "{}"}}}}}}"#,
        "x".repeat(20_000)
    );
    let (status, kind, ..) = api_error(raw_post(big.as_bytes()));
    assert_eq!((status, kind.as_str()), (413, "too_large"));
    daemon.assert_healthy(&spec);

    // Many idle connections, and one that sends half a request and stalls: served around,
    // and the stalled one is dropped after the header timeout.
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&daemon.socket).unwrap())
        .collect();
    let mut stalled = UnixStream::connect(&daemon.socket).unwrap();
    stalled
        .write_all(b"POST /v1/envs HTTP/1.1\r\nContent-Le")
        .unwrap();
    daemon.assert_healthy(&spec);
    drop(idle);
    daemon.assert_healthy(&spec);
    stalled.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the stalled client was dropped"
    );
}

#[test]
fn submit_runs_a_job_with_a_working_dir_and_a_package() {
    let ws = setup();
    ws.write("proj/script.py", "import os, sys, tinypkg\nprint('tinypkg', tinypkg.VERSION, 'gpus', repr(os.environ['CUDA_VISIBLE_DEVICES']), os.environ['TF_WARNINGS'])\nprint('to stderr', file=sys.stderr)\nsys.exit(int(os.environ.get('CODE', '0')))\n");
    ws.write("proj/debug.log", "excluded");
    let daemon = Daemon::start(&ws, &["--gpus", "0,1"]);
    let submit = |code: &str, extra: &[&str]| {
        ws.renv()
            .env("RENV_SOCKET", &daemon.socket)
            .args(["submit", "--working-dir", "proj", "--runtime-env-json"])
            .arg(format!(r#"{{"pip": ["tinypkg==1.0"], "excludes": ["*.log"], "env_vars": {{"TF_WARNINGS": "none", "CODE": "{code}"}}}}"#))
            .args(extra)
            .args(["--", "python", "script.py"])
            .output()
            .unwrap()
    };
    let out = submit("0", &["--gpus", "0", "--name", "first"]);
    assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "tinypkg 1.0 gpus '0' none\n"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("to stderr") && stderr.contains("succeeded (exit code 0)"),
        "{stderr}"
    );
    let pkgs = ws.committed_packages();
    assert_eq!(pkgs.len(), 1);
    assert!(!list_dir(&ws.store_v1("pkgs").join(&pkgs[0])).contains(&"debug.log".to_string()));

    let out = submit("5", &["--num-gpus", "2"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "the job's exit status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "tinypkg 1.0 gpus '0,1' none\n"
    );

    let out = submit("0", &["--no-wait"]);
    assert_success(&out);
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let info = wait_for_end(&daemon, &id);
    assert_eq!(info["state"], "succeeded");
    let ps = ws
        .renv()
        .env("RENV_SOCKET", &daemon.socket)
        .arg("ps")
        .output()
        .unwrap();
    assert_success(&ps);
    assert!(String::from_utf8_lossy(&ps.stdout).contains("first"));
    let logs = ws
        .renv()
        .env("RENV_SOCKET", &daemon.socket)
        .args(["logs", &id])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout),
        "tinypkg 1.0 gpus '' none\n"
    );

    // The daemon's errors, as it phrased them.
    let out = ws
        .renv()
        .env("RENV_SOCKET", &daemon.socket)
        .args([
            "submit",
            "--runtime-env-json",
            r#"{"env_vars": {"CUDA_VISIBLE_DEVICES": "0"}}"#,
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("env_vars.CUDA_VISIBLE_DEVICES: is managed by renv")
    );
}

#[test]
fn workers_lease_their_env_and_shutdown_stops_them() {
    let ws = setup();
    let mut daemon = Daemon::start(&ws, &["--gpus", "none"]);
    let w = start_worker(
        &daemon,
        json!({"runtime_env": {"pip": ["tinypkg==1.0"]}, "argv": ["sleep", "60"]}),
    )
    .unwrap();
    let pid = w["pid"].as_i64().unwrap() as i32;
    let envs = daemon.get("/v1/envs");
    assert_eq!(envs["envs"][0]["workers"], 1);
    assert_eq!(envs["envs"][0]["refs"], 0);
    let key = list_dir(&ws.store_v1("envs")).pop().unwrap();
    let lock = std::fs::File::options()
        .write(true)
        .open(ws.store_v1("locks").join(format!("env-{key}.lock")))
        .unwrap();
    assert!(lock.try_lock().is_err(), "a running worker leases its env");

    let status = daemon.shutdown();
    assert!(status.success(), "{status}");
    assert!(!daemon.socket.exists());
    // SAFETY: probing a pid with signal 0.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
    assert!(!alive, "the worker was stopped with the daemon");
    assert!(lock.try_lock().is_ok(), "and its lease went with it");
}

/// An upload with no length (chunked) is capped on the bytes actually received.
#[test]
fn a_chunked_upload_is_capped_on_bytes_received() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &["--max-unpacked-bytes", "100000"]);
    let digest = "cd".repeat(32);
    let mut raw = UnixStream::connect(&daemon.socket).unwrap();
    write!(raw, "PUT /v1/packages/{digest} HTTP/1.1\r\nHost: renv\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    let chunk = vec![b'z'; 10_000];
    for _ in 0..30 {
        if write!(raw, "{:x}\r\n", chunk.len())
            .and_then(|()| raw.write_all(&chunk))
            .and_then(|()| raw.write_all(b"\r\n"))
            .is_err()
        {
            break; // the daemon answered and closed early
        }
    }
    let _ = raw.write_all(b"0\r\n\r\n");
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
    daemon.assert_healthy(&json!({"env_vars": {"A": "1"}}));
}

/// Out of file descriptors, the accept loop backs off and recovers.
#[test]
fn running_out_of_file_descriptors_is_survived() {
    let ws = setup();
    let socket = ws.path("run/renv.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let mut child = Command::new("prlimit")
        .args(["--nofile=64:64", "--"])
        .arg(env!("CARGO_BIN_EXE_renv"))
        .args(["daemon", "--gpus", "none", "--build-user", "root", "--socket"])
        .arg(&socket)
        .env("RENV_STORE", ws.store())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    let daemon = Daemon {
        child: None,
        socket: socket.clone(),
    };
    let flood: Vec<UnixStream> = (0..150)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    drop(flood);
    let start = Instant::now();
    loop {
        if let Ok(v) = daemon.client().json("GET", "/healthz", None) {
            assert_eq!(v["ok"], true);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the daemon did not recover"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.assert_healthy(&json!({"env_vars": {"A": "1"}}));
    let _ = child.kill();
    let _ = child.wait();
}

/// A client that gives up mid-build cancels only its own wait: the build goes on and the
/// next request for the same env joins it rather than starting another.
#[test]
fn a_disconnecting_waiter_does_not_cancel_the_build() {
    let ws = setup();
    let calls = ws.path("uv-calls.log");
    let slow = format!(
        "#!/bin/sh\necho \"$1 $2 $3\" >> {}\n[ \"$1\" = pip ] && sleep 1\nexec {} \"$@\"\n",
        calls.display(),
        crate::common::uv().display()
    );
    let slow_uv = ws.write("slow-uv", slow);
    crate::common::set_mode(&slow_uv, 0o755);
    let daemon = Daemon::start(&ws, &["--uv", slow_uv.to_str().unwrap()]);
    let body = json!({"runtime_env": {"pip": ["tinypkg==1.0"]}}).to_string();
    let mut quitter = UnixStream::connect(&daemon.socket).unwrap();
    write!(
        quitter,
        "POST /v1/envs HTTP/1.1\r\nHost: renv\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(quitter);
    let env = daemon
        .post("/v1/envs", &json!({"runtime_env": {"pip": ["tinypkg==1.0"]}}))
        .unwrap();
    assert!(env["python"].as_str().unwrap().contains("/envs/"));
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(crate::common::builds(&log), 1, "{log}");
}

/// With `--max-concurrent-builds 1` builds run one at a time, in the order they were asked
/// for: a wrapper uv logs when each of its runs starts and ends (an install takes 0.2 s more,
/// so builds let run together would overlap), and no run starts before the one before it
/// ended. A request for a spec whose build waits for the slot joins that build, and every
/// request gets its env.
#[test]
fn builds_wait_for_a_slot_in_the_order_they_came() {
    let ws = Workspace::new();
    let names: Vec<String> = (0..5).map(|i| format!("queuedpkg{i}")).collect();
    let wheels: Vec<(&str, &str, &str)> = names.iter().map(|n| (n.as_str(), "1.0", "")).collect();
    wheelhouse(&ws.path("wheels"), &wheels);
    let log = ws.path("uv-runs.log");
    let script = format!(
        "#!/bin/sh\necho \"start $*\" >> {log}\n[ \"$1\" = pip ] && sleep 0.2\n{uv} \"$@\"\nrc=$?\necho end >> {log}\nexit $rc\n",
        log = log.display(),
        uv = crate::common::uv().display()
    );
    let uv = ws.write("timed-uv", script);
    crate::common::set_mode(&uv, 0o755);
    let daemon = Daemon::start(
        &ws,
        &["--uv", uv.to_str().unwrap(), "--max-concurrent-builds", "1"],
    );
    let request = |name: &str| json!({"runtime_env": {"pip": [format!("{name}==1.0")]}});
    let answers: Vec<(Value, Value)> = std::thread::scope(|scope| {
        let mut asked = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let first = scope.spawn(|| daemon.post("/v1/envs", &request(name)).unwrap());
            // In line before the next one comes: the first holds the slot, the rest wait.
            let (running, waiting) = (1.0, i as f64);
            crate::common::wait_for(
                || {
                    (daemon.metric("renv_builds_running") == running
                        && daemon.metric("renv_builds_waiting") == waiting)
                        .then_some(())
                },
                &format!("the build of {name} to be in line"),
            );
            // The same spec again, while its build runs or waits: it joins that build.
            let again = scope.spawn(|| daemon.post("/v1/envs", &request(name)).unwrap());
            asked.push((first, again));
        }
        asked
            .into_iter()
            .map(|(first, again)| (first.join().unwrap(), again.join().unwrap()))
            .collect()
    });
    for ((first, again), name) in answers.iter().zip(&names) {
        assert_eq!(first["env_id"], again["env_id"], "{name}");
        // Both got the build's answer: a later request would have found the env made.
        assert_eq!(
            (&first["created"], &again["created"]),
            (&json!(true), &json!(true)),
            "{name}"
        );
    }
    assert_eq!(daemon.metric("renv_builds_total"), 5.0);
    assert_eq!(
        (
            daemon.metric("renv_builds_running"),
            daemon.metric("renv_builds_waiting")
        ),
        (0.0, 0.0)
    );
    let runs = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = runs.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let expected = if i % 2 == 0 { "start " } else { "end" };
        assert!(
            line.starts_with(expected),
            "line {i}: two uv runs at once:\n{runs}"
        );
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("start pip install --offline"))
            .count(),
        5,
        "{runs}"
    );
    // Built in the order they were asked for.
    let mut order: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("start pip install"))
        .filter_map(|l| {
            names
                .iter()
                .find(|n| l.contains(&format!("{n}==")))
                .map(String::as_str)
        })
        .collect();
    order.dedup();
    assert_eq!(
        order,
        names.iter().map(String::as_str).collect::<Vec<_>>(),
        "{runs}"
    );
}

/// With --max-store-size the daemon prunes released entries itself, never referenced ones.
#[test]
fn the_daemon_keeps_the_store_under_its_budget() {
    let ws = setup();
    for name in ["a", "b"] {
        ws.write(&format!("{name}/data"), name.repeat(5000));
        ws.package_zip(name, &format!("{name}.zip"));
    }
    let daemon = Daemon::start(&ws, &["--max-store-size", "1000", "--gc-min-age", "0s"]);
    let env = |name: &str| json!({"runtime_env": {"working_dir": format!("file://{}", ws.path(&format!("{name}.zip")).display())}});
    let a = daemon.post("/v1/envs", &env("a")).unwrap();
    daemon
        .client()
        .json(
            "DELETE",
            &format!("/v1/envs/{}", a["env_id"].as_str().unwrap()),
            None,
        )
        .unwrap();
    let b = daemon.post("/v1/envs", &env("b")).unwrap();
    let a_dir = std::path::PathBuf::from(a["working_dir"].as_str().unwrap());
    let b_dir = std::path::PathBuf::from(b["working_dir"].as_str().unwrap());
    let start = Instant::now();
    while a_dir.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the released entry was never collected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b_dir.exists(), "the referenced entry is kept");
    // And the released one comes back on request.
    let again = daemon.post("/v1/envs", &env("a")).unwrap();
    assert!(std::path::Path::new(again["working_dir"].as_str().unwrap()).exists());
}

/// The store's disk fills up mid-request: that request fails naming the step, nothing is
/// left in staging, and the daemon goes on serving.
#[test]
fn a_full_disk_fails_one_request_and_the_daemon_keeps_serving() {
    let ws = setup();
    let _mount = crate::common::TmpfsMount::new(&ws.path("small"), "2m");
    for i in 0..40 {
        ws.write(&format!("big/f{i}"), vec![i as u8; 100_000]);
    }
    ws.write("tiny/x", "tiny");
    ws.package_zip("big", "big.zip");
    ws.package_zip("tiny", "tiny.zip");
    let store = ws.path("small/store");
    let daemon = Daemon::start(&ws, &["--store", store.to_str().unwrap()]);
    let zip_env =
        |name: &str| json!({"runtime_env": {"working_dir": format!("file://{}", ws.path(name).display())}});
    let (status, _, _, message) = api_error(daemon.post("/v1/envs", &zip_env("big.zip")));
    assert_eq!(status, 500, "{message}");
    assert!(
        message.contains("unpacking") && message.contains("No space left on device"),
        "{message}"
    );
    let tiny = daemon.post("/v1/envs", &zip_env("tiny.zip")).unwrap();
    assert!(std::path::Path::new(tiny["working_dir"].as_str().unwrap()).is_dir());
    assert_eq!(daemon.get("/healthz")["ok"], true);
    assert!(list_dir(&store.join("store-v1/staging")).is_empty());
    assert!(list_dir(&store.join("store-v1/trash")).is_empty());
}

/// A worker's env outlives the daemon: if the daemon dies, a prune still cannot take the
/// entries out from under the running worker (its saved record holds them, and its
/// supervisor's lease); once the worker ends, its supervisor records that, and they go.
#[test]
fn a_workers_lease_outlives_the_daemon() {
    let ws = setup();
    ws.write("proj/x", "x");
    ws.package_zip("proj", "proj.zip");
    let mut daemon = Daemon::start(&ws, &["--gpus", "none"]);
    let env = json!({"working_dir": format!("file://{}", ws.path("proj.zip").display())});
    let w = start_worker(&daemon, json!({"runtime_env": env, "argv": ["sleep", "30"]})).unwrap();
    let pid = w["pid"].as_i64().unwrap() as i32;
    let mut child = daemon.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL: no clean shutdown, no stopping of workers
    child.wait().unwrap();

    let prune = || {
        let out = ws
            .renv()
            .args(["prune", "--json", "--max-size", "0", "--min-age", "0s"])
            .output()
            .unwrap();
        assert_success(&out);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let report = prune();
    assert!(report["removed"].as_array().unwrap().is_empty(), "{report}");
    let reason = report["kept"][0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("held by the daemon's saved state") && reason.contains("worker w000001"),
        "{report}"
    );
    // SAFETY: ending the orphaned worker we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let start = Instant::now();
    loop {
        let removed = prune()["removed"].as_array().unwrap().len();
        if removed == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the worker's end was never recorded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that waits for the socket file to appear (the SDK, the Ray plugin, scripts)
/// can connect at once: the daemon listens before the name exists.
#[test]
fn the_socket_appears_only_once_it_accepts_connections() {
    let ws = setup();
    let socket = ws.path("run/renv.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    for _ in 0..10 {
        let mut child = ws
            .renv()
            .args(["daemon", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while socket.symlink_metadata().is_err() {
            if child.try_wait().unwrap().is_some() {
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("the daemon exited: {err}");
            }
            assert!(start.elapsed() < Duration::from_secs(30), "daemon did not start");
            std::thread::sleep(Duration::from_micros(200));
        }
        UnixStream::connect(&socket).expect("the socket accepts as soon as it exists");
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        child.wait().unwrap();
        assert!(
            socket.symlink_metadata().is_err(),
            "a clean stop removes the socket"
        );
        assert_eq!(
            list_dir(socket.parent().unwrap()),
            Vec::<String>::new(),
            "no staged socket names are left behind"
        );
    }
}

/// An HTTP request to the daemon as another user (`setpriv` to `uid`, no groups): the
/// answer's status and JSON body.
pub(crate) fn as_user(
    socket: &Path,
    uid: u32,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
    ])
    .args(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket"])
    .arg(socket)
    .args(["-X", method, &format!("http://renv{path}")]);
    if let Some(body) = body {
        cmd.args(["-d", &body.to_string()]);
    }
    let out = cmd.output().expect("setpriv");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no answer as uid {uid}: {text:?}"));
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A caller let in by a supplementary group (`--allow-gid`) is known by the groups the
/// kernel saw when it connected: it is admitted, and its worker runs with exactly those
/// groups; the same uid without the group is refused.
#[test]
fn a_callers_supplementary_groups_are_the_ones_it_connected_with() {
    let ws = setup();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Daemon::start(&ws, &["--gpus", "none", "--allow-gid", "2345"]);
    std::fs::set_permissions(
        daemon.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let post_as = |groups: &str| -> (u16, String) {
        let body = json!({"runtime_env": {"env_vars": {"G": "1"}}, "argv": ["id", "-G"]});
        let out = Command::new("setpriv")
            .args(["--reuid=1001", "--regid=1001", groups])
            .args(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&daemon.socket)
            .args(["-X", "POST", "-d", &body.to_string(), "http://renv/v1/workers"])
            .output()
            .expect("setpriv");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.parse().unwrap_or(0), body.to_string())
    };
    let (status, body) = post_as("--groups=2345,2346");
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["worker_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(wait_for_end(&daemon, &id)["state"], "succeeded");
    assert_eq!(logs(&daemon, &id, "stdout").trim(), "1001 2345 2346");
    // The socket opened to everyone: only the daemon's admission stands in the way.
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (status, body) = post_as("--clear-groups");
    assert_eq!(status, 403, "{body}");
}

/// The uid is the boundary: a caller's workers run as that caller, its logs are its own,
/// and it can neither see nor touch another user's workers, logs or references.
#[test]
fn callers_act_as_themselves_and_see_only_their_own() {
    let ws = setup();
    // Only the socket's directory is opened up (as an operator's /run/renv would be).
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Daemon::start(
        &ws,
        &["--gpus", "none", "--allow-uid", "1000", "--allow-uid", "1001"],
    );
    std::fs::set_permissions(
        daemon.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let socket = daemon.socket.clone();
    let secret = ws.write("secret", "root only\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    // uid 1000's worker runs as uid 1000, with uid 1000's rights only.
    let env = json!({"env_vars": {"TENANT": "a"}});
    let script = format!(
        "id -u; id -g; id -G; cat {} || echo refused; [ \"$(cut -d' ' -f6 /proc/$$/stat)\" = $$ ] && echo own-session; \
         echo ${{RENV_STORE:-no-daemon-env}}; echo $HOME",
        secret.display()
    );
    let (status, w) = as_user(
        &socket,
        1000,
        "POST",
        "/v1/workers",
        Some(&json!({"runtime_env": env, "argv": ["sh", "-c", script]})),
    );
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["uid"], 1000);
    let id = w["worker_id"].as_str().unwrap().to_string();
    let (_, done) = as_user(&socket, 1000, "GET", &format!("/v1/workers/{id}?wait=true"), None);
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = logs(&daemon, &id, "stdout");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..6],
        ["1000", "1000", "1000", "refused", "own-session", "no-daemon-env"],
        "uid, gid, groups; the secret stays unread; a session of its own (no terminal of the \
         daemon's); none of the daemon's environment"
    );
    assert_ne!(
        lines[6],
        std::env::var("HOME").unwrap(),
        "its own HOME, not the daemon's"
    );
    let log = Path::new(w["stdout_log"].as_str().unwrap());
    let meta = std::fs::metadata(log).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (1000, 0o600),
        "the log is the caller's alone"
    );
    // Logs are found by name, never listed; spares waiting to become someone's log are private.
    let logs_dir = log.parent().unwrap();
    assert_eq!(std::fs::metadata(logs_dir).unwrap().mode() & 0o777, 0o711);
    for spare in std::fs::read_dir(logs_dir).unwrap().filter_map(Result::ok) {
        if spare.file_name().to_string_lossy().starts_with(".spare-") {
            assert_eq!(spare.metadata().unwrap().mode() & 0o777, 0o600);
        }
    }
    assert_eq!(
        std::fs::metadata(ws.store_v1("locks")).unwrap().mode() & 0o777,
        0o700
    );
    // A zip the daemon can read but uid 1000 cannot is not read for it, however spelled.
    ws.package_zip("wheels", "private.zip");
    let private = ws.path("private.zip");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let spec =
        json!({"runtime_env": {"working_dir": format!("file://{}", private.display())}, "argv": ["ls"]});
    let (status, answer) = as_user(&socket, 1000, "POST", "/v1/workers", Some(&spec));
    assert_eq!(
        (status, answer["error"]["kind"].as_str()),
        (403, Some("forbidden")),
        "{answer}"
    );
    let escaped = r#"{"runtime_env": {"working_dir": "\u0066ile://PATH"}, "argv": ["ls"]}"#
        .replace("PATH", &private.display().to_string());
    let escaped: Value = serde_json::from_str(&escaped).unwrap();
    assert_eq!(
        as_user(&socket, 1000, "POST", "/v1/workers", Some(&escaped)).0,
        403
    );

    // Root's worker and reference are invisible and untouchable for uid 1001.
    let root_env = daemon
        .post(
            "/v1/envs",
            &json!({"runtime_env": {"env_vars": {"TENANT": "root"}}, "ref": "mine"}),
        )
        .unwrap();
    let root_env_id = root_env["env_id"].as_str().unwrap();
    let root_worker = start_worker(&daemon, json!({"env_id": root_env_id, "argv": ["sleep", "30"]})).unwrap();
    let root_id = root_worker["worker_id"].as_str().unwrap();
    assert_eq!(root_worker["uid"], 0);
    let (_, listed) = as_user(&socket, 1001, "GET", "/v1/workers", None);
    assert_eq!(
        listed["workers"],
        json!([]),
        "uid 1001 sees no one else's workers"
    );
    for (method, path) in [
        ("GET", format!("/v1/workers/{root_id}")),
        ("GET", format!("/v1/workers/{root_id}/logs")),
        ("DELETE", format!("/v1/workers/{root_id}")),
        ("DELETE", format!("/v1/envs/{root_env_id}")),
    ] {
        let (status, answer) = as_user(&socket, 1001, method, &path, None);
        assert_eq!(status, 404, "{method} {path}: {answer}");
    }
    let (status, answer) = as_user(
        &socket,
        1001,
        "POST",
        "/v1/workers",
        Some(&json!({"env_id": root_env_id, "argv": ["env"]})),
    );
    assert_eq!(
        status, 404,
        "another user's env (and its env_vars) is not lent by id: {answer}"
    );
    let (_, envs) = as_user(&socket, 1001, "GET", "/v1/envs", None);
    assert_eq!(envs["envs"], json!([]));
    assert_eq!(
        daemon.get(&format!("/v1/workers/{root_id}"))["state"],
        "running",
        "nothing was stopped"
    );

    // References are per caller: uid 1001 takes and releases its own on the same env, and
    // cannot release root's.
    let (status, _) = as_user(
        &socket,
        1001,
        "POST",
        "/v1/envs",
        Some(&json!({"runtime_env": {"env_vars": {"TENANT": "root"}}, "ref": "theirs"})),
    );
    assert_eq!(status, 200);
    let (_, envs) = as_user(&socket, 1001, "GET", "/v1/envs", None);
    assert_eq!(
        (
            envs["envs"][0]["refs"].clone(),
            envs["envs"][0]["ref_tags"].clone()
        ),
        (json!(1), json!(["theirs"]))
    );
    let release = format!("/v1/envs/{root_env_id}");
    assert_eq!(as_user(&socket, 1001, "DELETE", &release, None).0, 200);
    assert_eq!(
        as_user(&socket, 1001, "DELETE", &release, None).0,
        404,
        "its reference gone, the env is not its to see"
    );
    let all = daemon.get("/v1/envs");
    let root_view = all["envs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["env_id"] == root_env_id)
        .unwrap()
        .clone();
    assert_eq!(
        (root_view["refs"].clone(), root_view["ref_tags"].clone()),
        (json!(1), json!(["mine"]))
    );

    // Root sees everyone's workers.
    let everyone = daemon.get("/v1/workers");
    let owners: Vec<&Value> = everyone["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| &w["uid"])
        .collect();
    assert!(
        owners.contains(&&json!(1000)) && owners.contains(&&json!(0)),
        "{everyone}"
    );
    daemon
        .client()
        .json("DELETE", &format!("/v1/workers/{root_id}"), None)
        .unwrap();
}

/// A daemon that is not root cannot give another user's worker that user's identity, so
/// it refuses rather than lend its own rights; its own user and root still run workers
/// (as the daemon's user).
#[test]
fn a_daemon_without_root_never_lends_its_rights() {
    let ws = setup();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = ws.path("owner");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(1000), Some(1000)).unwrap();
    let socket = home.join("renv.sock");
    let mut child = ws
        .renv()
        .env("RENV_STORE", home.join("store"))
        .env("HOME", &home)
        .current_dir(&home)
        .args(["daemon", "--gpus", "none", "--allow-uid", "1001", "--socket"])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_as(1000);
    let start = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the daemon exited");
        assert!(start.elapsed() < Duration::from_secs(30), "daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let worker = json!({"runtime_env": {"env_vars": {"A": "1"}}, "argv": ["id", "-u"]});
    let (status, answer) = as_user(&socket, 1001, "POST", "/v1/workers", Some(&worker));
    assert_eq!(
        (status, answer["error"]["kind"].as_str()),
        (403, Some("forbidden")),
        "{answer}"
    );
    let (_, listed) = as_user(&socket, 1001, "GET", "/v1/workers", None);
    assert_eq!(listed["workers"], json!([]), "nothing was started");
    let own = Client::new(&socket)
        .json("POST", "/v1/workers", Some(&worker))
        .unwrap();
    assert_eq!(own["uid"], 0, "root asked");
    let id = own["worker_id"].as_str().unwrap();
    Client::new(&socket)
        .json("GET", &format!("/v1/workers/{id}?wait=true"), None)
        .unwrap();
    let mut out = String::new();
    Client::new(&socket)
        .send("GET", &format!("/v1/workers/{id}/logs"), None)
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(
        out, "1000\n",
        "it runs with the daemon's rights, less than its caller's"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawning a command as another user, with no supplementary groups.
trait SpawnAs {
    fn spawn_as(&mut self, uid: u32) -> Child;
}

impl SpawnAs for Command {
    fn spawn_as(&mut self, uid: u32) -> Child {
        use std::os::unix::process::CommandExt;
        self.uid(uid).gid(uid).spawn().unwrap()
    }
}

/// A requirements file is the client's: the daemon refuses a path (it would read it with
/// its own rights), and `renv submit` reads the file itself and sends the list.
#[test]
fn requirements_files_are_read_by_the_client_never_by_the_daemon() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &["--gpus", "none"]);
    let secret = ws.write("secret.txt", "root-only-line==1.0\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    for spec in [json!({"pip": secret}), json!({"uv": {"packages": secret}})] {
        let (status, _, field, message) = api_error(daemon.post("/v1/envs", &json!({"runtime_env": spec})));
        assert_eq!(status, 400);
        assert!(matches!(field.as_deref(), Some("pip" | "uv")), "{field:?}");
        assert!(
            message.contains("requirements file") && !message.contains("root-only-line"),
            "{message}"
        );
    }
    assert!(daemon.get("/v1/envs")["envs"].as_array().unwrap().is_empty());

    ws.write("reqs.txt", "# pinned\ntinypkg==1.0\n");
    let out = ws
        .renv()
        .env("RENV_SOCKET", &daemon.socket)
        .args(["submit", "--runtime-env-json", r#"{"pip": "reqs.txt"}"#])
        .args(["--", "python", "-c", "import tinypkg; print(tinypkg.VERSION)"])
        .output()
        .unwrap();
    assert_success(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1.0\n");
}

/// The `id` field of every object in the list `list` of an API answer.
fn ids_in(answer: &Value, list: &str, id: &str) -> Vec<String> {
    answer[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item[id].as_str().unwrap().to_string())
        .collect()
}

/// What a request leaves behind is bounded: labels are capped, ended workers and envs
/// nothing holds are forgotten beyond their limits, and a stalled upload is dropped with
/// nothing kept.
#[test]
fn memory_and_time_a_request_can_take_are_bounded() {
    let ws = setup();
    let daemon = Daemon::start(
        &ws,
        &[
            "--gpus",
            "none",
            "--max-ended-workers",
            "3",
            "--max-idle-envs",
            "2",
            "--header-timeout-seconds",
            "1",
        ],
    );
    let long = "x".repeat(300);
    let (status, _, field, _) = api_error(daemon.post(
        "/v1/envs",
        &json!({"runtime_env": {"env_vars": {"A": "1"}}, "ref": long}),
    ));
    assert_eq!((status, field.as_deref()), (400, Some("ref")));
    let (status, _, field, _) = api_error(start_worker(
        &daemon,
        json!({"runtime_env": {}, "argv": ["true"], "name": long}),
    ));
    assert_eq!((status, field.as_deref()), (400, Some("name")));

    // Six ended workers, three remembered: the newest.
    let mut ids = Vec::new();
    for _ in 0..6 {
        let w = start_worker(&daemon, json!({"runtime_env": {}, "argv": ["true"]})).unwrap();
        let id = w["worker_id"].as_str().unwrap().to_string();
        wait_for_end(&daemon, &id);
        ids.push(id);
    }
    let listed = ids_in(&daemon.get("/v1/workers"), "workers", "worker_id");
    assert_eq!(listed, ids[3..].to_vec());

    // Five envs taken and released: the least recently used idle ones are forgotten, and
    // asking again finds the env in the store.
    let mut env_ids = Vec::new();
    for i in 0..5 {
        let env = daemon
            .post(
                "/v1/envs",
                &json!({"runtime_env": {"env_vars": {"N": i.to_string()}}}),
            )
            .unwrap();
        let id = env["env_id"].as_str().unwrap().to_string();
        daemon
            .client()
            .json("DELETE", &format!("/v1/envs/{id}"), None)
            .unwrap();
        env_ids.push(id);
    }
    let known = ids_in(&daemon.get("/v1/envs"), "envs", "env_id");
    assert!(known.len() <= 3 && !known.contains(&env_ids[0]), "{known:?}");
    let again = daemon
        .post("/v1/envs", &json!({"runtime_env": {"env_vars": {"N": "0"}}}))
        .unwrap();
    assert_eq!(again["env_id"], env_ids[0].as_str());

    // An upload that stalls after a few bytes is dropped, and leaves nothing behind.
    let digest = "0".repeat(64);
    let mut stalled = UnixStream::connect(&daemon.socket).unwrap();
    stalled
        .write_all(
            format!(
                "PUT /v1/packages/{digest} HTTP/1.1\r\nHost: renv\r\nContent-Length: 100000\r\n\r\nPK\x03\x04"
            )
            .as_bytes(),
        )
        .unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = Vec::new();
    let _ = stalled.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("nothing received"),
        "{answer}"
    );
    assert_eq!(ws.leftovers(), Vec::<String>::new());
    assert_eq!(daemon.get("/healthz")["ok"], true);
}

/// Another process holding an entry's lock (a build, a prune, or a tenant with a file
/// descriptor) stalls only the requests that need that entry, never the event loop.
#[test]
fn a_held_entry_lock_never_freezes_the_daemon() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &["--gpus", "none"]);
    let spec = json!({"pip": ["tinypkg==1.0"]});
    let env = daemon.post("/v1/envs", &json!({"runtime_env": spec})).unwrap();
    let env_id = env["env_id"].as_str().unwrap().to_string();
    daemon
        .client()
        .json("DELETE", &format!("/v1/envs/{env_id}"), None)
        .unwrap();
    let key = Path::new(env["venv"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let lock = ws.store_v1("locks").join(format!("env-{key}.lock"));
    let locked = ws.path("locked");
    let mut locker = Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); \
             open(sys.argv[2], 'w').close(); time.sleep(8)",
        ])
        .arg(&lock)
        .arg(&locked)
        .spawn()
        .unwrap();
    while !locked.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::scope(|s| {
        // This request needs the env's lease, so it waits for the lock...
        let waiting = s.spawn(|| start_worker(&daemon, json!({"env_id": env_id, "argv": ["true"]})));
        std::thread::sleep(Duration::from_millis(300));
        // ...and everything else is served meanwhile.
        assert_eq!(daemon.get("/healthz")["ok"], true);
        daemon
            .post("/v1/envs", &json!({"runtime_env": {"env_vars": {"B": "2"}}}))
            .unwrap();
        assert!(
            daemon.get("/v1/workers")["workers"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert!(
            locker.try_wait().unwrap().is_none(),
            "all of that was answered while the lock was still held"
        );
        locker.wait().unwrap();
        let worker = waiting.join().unwrap().unwrap();
        assert_eq!(
            wait_for_end(&daemon, worker["worker_id"].as_str().unwrap())["state"],
            "succeeded"
        );
    });
}

/// Command lines of the live processes that run `sleep <secs>`.
fn sleeping(secs: &str) -> Vec<u32> {
    live_processes(|_, cmdline| cmdline == format!("sleep\0{secs}\0").as_bytes())
}

/// The pids of processes that are not zombies (a killed orphan stays one until its
/// parent, perhaps a container's init, reaps it) and that `matches` (its
/// `/proc/<pid>/status` and `cmdline`).
fn live_processes(matches: impl Fn(&str, &[u8]) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            !status.lines().any(|l| l.starts_with("State:\tZ"))
                && !status.is_empty()
                && matches(&status, &cmdline)
        })
        .collect()
}

/// A worker is its whole process tree: stopping one that ignores SIGTERM in a child and
/// starts another in a new session leaves nothing running, and its GPU is free only then.
/// A leader that exits takes what it left running with it.
#[test]
fn a_stopped_worker_leaves_nothing_behind() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &["--gpus", "0"]);
    let mut metrics = String::new();
    daemon
        .client()
        .send("GET", "/metrics", None)
        .unwrap()
        .read_to_string(&mut metrics)
        .unwrap();
    // Part of the set-up, not a reason to test less: the test machines mount cgroup v2.
    assert!(
        metrics.contains("renv_worker_cgroups 1"),
        "the daemon gives each worker a cgroup here:\n{metrics}"
    );
    let script = "(trap '' TERM; exec sleep 311) & setsid sleep 312 & echo started; wait";
    let w = start_worker(
        &daemon,
        json!({"runtime_env": {}, "argv": ["sh", "-c", script], "num_gpus": 1}),
    )
    .unwrap();
    let id = w["worker_id"].as_str().unwrap();
    let start = Instant::now();
    while sleeping("311").is_empty() || sleeping("312").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the worker's children did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, ..) = api_error(start_worker(
        &daemon,
        json!({"runtime_env": {}, "argv": ["true"], "num_gpus": 1}),
    ));
    assert_eq!(status, 503, "its GPU is taken");
    let (status, _, field, _) = api_error(start_worker(
        &daemon,
        json!({"runtime_env": {}, "argv": ["true"], "gpus": [0]}),
    ));
    assert_eq!(
        (status, field.as_deref()),
        (503, Some("gpus")),
        "not lent by naming it either"
    );
    daemon
        .client()
        .json("DELETE", &format!("/v1/workers/{id}"), None)
        .unwrap();
    assert_eq!(wait_for_end(&daemon, id)["state"], "stopped");
    assert_eq!(
        sleeping("311"),
        Vec::<u32>::new(),
        "the child that ignored SIGTERM is gone"
    );
    assert_eq!(
        sleeping("312"),
        Vec::<u32>::new(),
        "the child in its own session is gone"
    );
    let again = start_worker(
        &daemon,
        json!({"runtime_env": {}, "argv": ["true"], "num_gpus": 1}),
    )
    .unwrap();
    assert_eq!(again["gpus"], json!([0]), "the GPU is back");
    wait_for_end(&daemon, again["worker_id"].as_str().unwrap());

    // A leader that exits takes its leftovers with it.
    let w = start_worker(
        &daemon,
        json!({"runtime_env": {}, "argv": ["sh", "-c", "sleep 313 & setsid sleep 314 & exit 0"]}),
    )
    .unwrap();
    assert_eq!(
        wait_for_end(&daemon, w["worker_id"].as_str().unwrap())["state"],
        "succeeded"
    );
    assert_eq!(sleeping("313"), Vec::<u32>::new());
    assert_eq!(sleeping("314"), Vec::<u32>::new());
}

/// A worker of `uid` running `python -c code` in `runtime_env`; its stdout once it ended.
pub(crate) fn python_as(daemon: &Daemon, uid: u32, runtime_env: &Value, code: &str) -> String {
    let body = json!({"runtime_env": runtime_env, "argv": ["python", "-c", code]});
    let (status, w) = as_user(&daemon.socket, uid, "POST", "/v1/workers", Some(&body));
    assert_eq!(status, 200, "{w}");
    let id = w["worker_id"].as_str().unwrap().to_string();
    let (_, done) = as_user(
        &daemon.socket,
        uid,
        "GET",
        &format!("/v1/workers/{id}?wait=true"),
        None,
    );
    assert_eq!(
        done["state"],
        "succeeded",
        "{done}: {}",
        logs(daemon, &id, "stderr")
    );
    logs(daemon, &id, "stdout")
}

/// Bytecode is per user: a tenant's forged bytecode for the standard library's `json`,
/// which its own workers do load, never runs in another tenant's worker, and no tenant
/// can write into another's cache.
#[test]
fn one_tenants_bytecode_never_runs_in_anothers_worker() {
    let ws = setup();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let python = crate::common::shared_python().to_str().unwrap();
    let daemon = Daemon::start(
        &ws,
        &[
            "--gpus",
            "none",
            "--allow-uid",
            "1000",
            "--allow-uid",
            "1001",
            "--python",
            python,
        ],
    );
    std::fs::set_permissions(
        daemon.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let env = json!({"pip": ["tinypkg==1.0"]});
    let victim_cache = python_as(
        &daemon,
        1001,
        &env,
        "import os; print(os.environ['PYTHONPYCACHEPREFIX'])",
    );
    let victim_cache = victim_cache.trim();
    assert_eq!(
        Path::new(victim_cache),
        ws.store_v1("pycache/1001").canonicalize().unwrap()
    );

    // The attacker compiles its own json (the real one, plus a line) into its cache, with
    // the header of the real source's mtime and size, so Python takes it as up to date.
    let forge = format!(
        "import os, importlib.util, importlib._bootstrap_external as ext\n\
         src = importlib.util.find_spec('json').origin\n\
         st = os.stat(src)\n\
         code = compile(\"print('PLANTED')\\n\" + open(src).read(), src, 'exec')\n\
         pyc = importlib.util.cache_from_source(src)\n\
         os.makedirs(os.path.dirname(pyc), exist_ok=True)\n\
         open(pyc, 'wb').write(ext._code_to_timestamp_pyc(code, st.st_mtime, st.st_size))\n\
         try:\n    open({victim:?} + '/planted', 'w')\nexcept PermissionError:\n    print('refused')\n",
        victim = victim_cache
    );
    assert_eq!(python_as(&daemon, 1000, &env, &forge).trim(), "refused");
    assert_eq!(
        python_as(&daemon, 1000, &env, "import json").trim(),
        "PLANTED",
        "the forgery works where it was planted: in the attacker's own cache"
    );
    assert_eq!(
        python_as(&daemon, 1001, &env, "import json; print('clean')").trim(),
        "clean",
        "another tenant's worker never loads it"
    );
    // The same with bytecode keyed by source content (the store's modules): planted in
    // the attacker's cache under the digest of tinypkg's real source, it runs for the
    // attacker alone.
    let forge_by_content = "import importlib.util, os, sys, marshal, _imp, importlib._bootstrap_external as ext\n\
         from _blake2 import blake2b\n\
         src = importlib.util.find_spec('tinypkg').origin\n\
         data = open(src, 'rb').read()\n\
         key = blake2b(data, digest_size=16).hexdigest()\n\
         code = compile(b\"print('PLANTED BY CONTENT')\\n\" + data, src, 'exec')\n\
         d = os.path.join(sys.pycache_prefix, '.renv-by-content', key[:2])\n\
         os.makedirs(d, exist_ok=True)\n\
         head = ext.MAGIC_NUMBER + (3).to_bytes(4, 'little') + _imp.source_hash(ext._RAW_MAGIC_NUMBER, data)\n\
         open(os.path.join(d, key[2:] + '.' + sys.implementation.cache_tag + '.pyc'), 'wb').write(head + marshal.dumps(code))\n";
    python_as(&daemon, 1000, &env, forge_by_content);
    assert_eq!(
        python_as(&daemon, 1000, &env, "import tinypkg").trim(),
        "PLANTED BY CONTENT",
        "the forgery works where it was planted"
    );
    assert_eq!(
        python_as(&daemon, 1001, &env, "import tinypkg; print('clean')").trim(),
        "clean",
        "another tenant's worker never loads it"
    );
    let meta = std::fs::metadata(victim_cache).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o777), (1001, 0o700));
    daemon.assert_healthy(&env);
}

/// Installers never run as root: with `--build-user`, every uv step runs as that user,
/// what it leaves running is killed when the build ends, and the env it made is the store
/// owner's and sealed: the build user can change nothing in it, not even through the
/// files its own cache shares with the env.
#[test]
fn installers_run_as_the_build_user_and_what_they_make_is_sealed() {
    use std::os::unix::fs::MetadataExt;
    const BUILDER: u32 = 1090;
    let ws = setup();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A uv that says who runs it, and leaves a process behind as an sdist's build could.
    let record = ws.write("uv-calls", "");
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o666)).unwrap();
    let wrapper = ws.write(
        "uv-wrapper",
        format!(
            "#!/bin/sh\necho \"$(id -u) $1\" >> {record}\n\
             [ \"$1\" = venv ] && setsid sleep 300 >/dev/null 2>&1 < /dev/null &\n\
             if [ \"$1\" = venv ]; then for a; do last=$a; done; stat -c 'staging %a %u' \"${{last%/*}}\" >> {record}; fi\n\
             exec {uv} \"$@\"\n",
            record = record.display(),
            uv = crate::common::uv().display()
        ),
    );
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let python = crate::common::shared_python().to_str().unwrap();
    let daemon = Daemon::start(
        &ws,
        &[
            "--gpus",
            "none",
            "--allow-uid",
            "1000",
            "--python",
            python,
            "--uv",
            wrapper.to_str().unwrap(),
            "--build-user",
            &BUILDER.to_string(),
        ],
    );
    std::fs::set_permissions(
        daemon.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let env = json!({"pip": ["tinypkg==1.0"]});
    let out = python_as(
        &daemon,
        1000,
        &env,
        "import tinypkg, sys; print(tinypkg.VERSION); print(tinypkg.__file__)",
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("1.0"));
    let module = Path::new(lines.next().unwrap()).to_path_buf();

    let calls = std::fs::read_to_string(&record).unwrap();
    let steps: Vec<&str> = calls
        .lines()
        .filter(|l| l.ends_with(" venv") || l.ends_with(" pip"))
        .collect();
    assert!(steps.len() >= 2, "{calls}");
    assert!(
        calls.contains(&format!("staging 700 {BUILDER}\n")),
        "the build's staging dir is the build user's alone while it builds: {calls}"
    );
    assert!(
        steps.iter().all(|l| l.starts_with(&format!("{BUILDER} "))),
        "every install step ran as the build user: {calls}"
    );
    assert_eq!(
        live_processes_of(BUILDER),
        Vec::<u32>::new(),
        "the build's leftovers were killed"
    );

    let meta = std::fs::metadata(&module).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7222),
        (0, 0),
        "sealed, the store owner's"
    );
    // The build user's cache stays writable by it, so nothing in the env shares an inode
    // with it; the cache itself is root's again (0700) between builds.
    assert_eq!(meta.nlink(), 1, "copied from the build user's cache, not linked");
    let cache = std::fs::symlink_metadata(ws.store_v1(&format!("uv-cache-{BUILDER}-for-1000"))).unwrap();
    assert_eq!((cache.uid(), cache.mode() & 0o777), (0, 0o700));
    {
        let target = module.to_str().unwrap();
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={BUILDER}"),
                &format!("--regid={BUILDER}"),
                "--clear-groups",
            ])
            .args(["sh", "-c", "echo 'print(\"PLANTED\")' >> \"$1\"", "sh", target])
            .output()
            .unwrap();
        assert!(!out.status.success(), "the build user wrote {target}");
    }
    assert_eq!(
        python_as(&daemon, 1000, &env, "import tinypkg; print(tinypkg.VERSION)").trim(),
        "1.0"
    );
    daemon.assert_healthy(&env);
}

/// A root daemon must be told who installers run as, and refuses a build user that is
/// also a caller (its processes are killed after every build).
#[test]
fn a_root_daemon_needs_a_build_user_of_its_own() {
    let ws = setup();
    let err = Daemon::try_start(&ws, &["--gpus", "none", "--build-user", ""]).err();
    assert!(err.is_some_and(|e| e.contains("--build-user")));
    let mut cmd = ws.renv();
    cmd.env_remove("RENV_BUILD_USER")
        .args(["daemon", "--gpus", "none", "--socket"])
        .arg(ws.path("s.sock"));
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass --build-user USER"),
        "{out:?}"
    );
    let err = Daemon::try_start(
        &ws,
        &["--gpus", "none", "--allow-uid", "1002", "--build-user", "1002"],
    )
    .err()
    .unwrap();
    assert!(err.contains("also an allowed caller"), "{err}");
    let err = Daemon::try_start(
        &ws,
        &["--gpus", "none", "--allow-gid", "1002", "--build-user", "1002"],
    )
    .err()
    .unwrap();
    assert!(err.contains("also an allowed caller"), "{err}");
}

/// The live processes of `uid`.
fn live_processes_of(uid: u32) -> Vec<u32> {
    let line = format!("Uid:\t{uid}\t");
    live_processes(|status, _| status.lines().any(|l| l.starts_with(&line)))
}

/// A `file://` zip is looked at again on every request: rewritten under the same name,
/// the next request gets the new contents, never the env of the old bytes.
#[test]
fn a_changed_file_zip_is_read_again() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &["--gpus", "none"]);
    ws.write("proj/main.py", "print('one')\n");
    ws.package_zip("proj", "p.zip");
    let spec = json!({"runtime_env": {"working_dir": format!("file://{}", ws.path("p.zip").display())}});
    let first = daemon.post("/v1/envs", &spec).unwrap();
    let again = daemon.post("/v1/envs", &spec).unwrap();
    assert_eq!(again["env_id"], first["env_id"]);
    ws.write("proj/main.py", "print('two')\n");
    std::fs::remove_file(ws.path("p.zip")).unwrap();
    ws.package_zip("proj", "p.zip");
    let changed = daemon.post("/v1/envs", &spec).unwrap();
    assert_ne!(changed["env_id"], first["env_id"]);
    let main = Path::new(changed["working_dir"].as_str().unwrap()).join("main.py");
    assert_eq!(std::fs::read_to_string(main).unwrap(), "print('two')\n");
}

/// Whatever runs as the build user can rewrite the wheel cache it is lent: here a uv that,
/// when asked for `evilpkg`, replaces the cached `tinypkg` as an sdist's build code could.
/// The poison reaches only envs built for the same caller; another tenant's builds use a
/// cache of their own, which the poisoning build could not even reach, and never share
/// an env built from the poisoned one.
#[test]
fn one_tenants_build_never_poisons_anothers_env() {
    const BUILDER: u32 = 1091;
    let ws = setup();
    wheelhouse(
        &ws.path("wheels"),
        &[("evilpkg", "1.0", "X = 1\n"), ("otherpkg", "1.0", "Y = 1\n")],
    );
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Where the build notes each other caller's cache it could list (none, it must be).
    let reached = ws.write("reached", "");
    std::fs::set_permissions(&reached, std::fs::Permissions::from_mode(0o666)).unwrap();
    let wrapper = ws.write(
        "uv-wrapper",
        format!(
            "#!/bin/sh\n{uv} \"$@\"; rc=$?\n\
             case \"$*\" in *evilpkg*) find \"$UV_CACHE_DIR\" -path '*tinypkg/__init__.py' | \
             while read -r f; do rm -f \"$f\"; echo \"VERSION = 'POISONED'\" > \"$f\"; done;; esac\n\
             for c in \"$UV_CACHE_DIR\"/../uv-cache-*; do [ \"$c\" -ef \"$UV_CACHE_DIR\" ] || \
             ! ls \"$c\" >/dev/null 2>&1 || echo \"$c\" >> {reached}; done\n\
             exit $rc\n",
            uv = crate::common::uv().display(),
            reached = reached.display()
        ),
    );
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let python = crate::common::shared_python().to_str().unwrap();
    let daemon = Daemon::start(
        &ws,
        &[
            "--gpus",
            "none",
            "--allow-uid",
            "1000",
            "--allow-uid",
            "1001",
            "--python",
            python,
            "--uv",
            wrapper.to_str().unwrap(),
            "--build-user",
            &BUILDER.to_string(),
        ],
    );
    std::fs::set_permissions(
        daemon.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let version = "import tinypkg; print(tinypkg.VERSION)";
    let tiny = json!({"pip": ["tinypkg==1.0"]});
    let both = json!({"pip": ["tinypkg==1.0", "otherpkg"]});
    // The victim's cache holds tinypkg; then the attacker's cache, then its poison.
    assert_eq!(python_as(&daemon, 1001, &tiny, version).trim(), "1.0");
    assert_eq!(python_as(&daemon, 1000, &tiny, version).trim(), "1.0");
    python_as(&daemon, 1000, &json!({"pip": ["evilpkg"]}), "pass");
    assert_eq!(
        python_as(&daemon, 1000, &both, version).trim(),
        "POISONED",
        "the poison works where it was planted: the attacker's own later builds"
    );
    assert_eq!(
        python_as(&daemon, 1001, &both, version).trim(),
        "1.0",
        "never in another tenant's env"
    );
    assert_eq!(python_as(&daemon, 1001, &tiny, version).trim(), "1.0");
    assert_eq!(
        std::fs::read_to_string(&reached).unwrap(),
        "",
        "a build listed another caller's cache"
    );
    daemon.assert_healthy(&tiny);
}

/// What a build leaves cannot be turned against root or the env once the build user's
/// processes are gone: a descriptor the build passed to another user's process writes
/// only to a file that is no longer the env's, and a symlink at the name of renv's build
/// record refuses the build instead of sending root's write elsewhere.
#[test]
fn a_builds_leftovers_cannot_reach_the_committed_env() {
    const BUILDER: u32 = 1092;
    let ws = setup();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket_name = format!("renv-test-fd-{}", std::process::id());
    // uid 1000 waits for a descriptor, then writes through it once the env is served.
    let taker = ws.write(
        "taker.py",
        format!(
            "import socket, array, sys, time\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
             s.bind('\\0{socket_name}'); s.listen(1)\n\
             print('listening', flush=True)\n\
             c, _ = s.accept()\n\
             fds = array.array('i')\n\
             msg, anc, _, _ = c.recvmsg(1, socket.CMSG_LEN(fds.itemsize))\n\
             fds.frombytes(anc[0][2][:fds.itemsize])\n\
             print('got', flush=True)\n\
             sys.stdin.readline()\n\
             import os; os.lseek(fds[0], 0, 0); os.write(fds[0], b\"VERSION = 'POISONED'\\n\")\n\
             print('wrote', flush=True)\n"
        ),
    );
    let giver = ws.write(
        "giver.py",
        format!(
            "import socket, array, os, sys, glob\n\
             venv = sys.argv[1]\n\
             f = glob.glob(venv + '/lib/python*/site-packages/tinypkg/__init__.py')[0]\n\
             fd = os.open(f, os.O_RDWR)\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect('\\0{socket_name}')\n\
             s.sendmsg([b'x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [fd]))])\n"
        ),
    );
    let python = crate::common::shared_python().to_str().unwrap();
    let wrapper = ws.write(
        "uv-wrapper",
        format!(
            "#!/bin/sh\n{uv} \"$@\"; rc=$?\n\
             if [ \"$1\" = pip ] && [ \"$2\" = install ]; then\n\
             py=; prev=; for a; do [ \"$prev\" = --python ] && py=$a; prev=$a; done; venv=${{py%/bin/python}}\n\
             case \"$*\" in *evilpkg*) ln -s {victim} \"$venv/.renv-build.json\";; \
             *) {python} {giver} \"$venv\";; esac\n\
             fi\nexit $rc\n",
            uv = crate::common::uv().display(),
            victim = ws.path("victim").display(),
            giver = giver.display(),
        ),
    );
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim = ws.write("victim", "root's\n");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    wheelhouse(&ws.path("wheels"), &[("evilpkg", "1.0", "X = 1\n")]);
    let daemon = Daemon::start(
        &ws,
        &[
            "--gpus",
            "none",
            "--allow-uid",
            "1000",
            "--python",
            python,
            "--uv",
            wrapper.to_str().unwrap(),
            "--build-user",
            &BUILDER.to_string(),
        ],
    );
    std::fs::set_permissions(
        daemon.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    let mut taker = Command::new("setpriv")
        .args([
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "sh",
            "-c",
            "exec \"$0\" \"$1\"",
        ])
        .arg(python)
        .arg(&taker)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(taker.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let env = json!({"pip": ["tinypkg==1.0"]});
    let version = "import tinypkg; print(tinypkg.VERSION)";
    assert_eq!(python_as(&daemon, 1000, &env, version).trim(), "1.0");
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "got", "the build handed its descriptor over");
    taker.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "wrote");
    taker.wait().unwrap();
    assert_eq!(
        python_as(&daemon, 1000, &env, version).trim(),
        "1.0",
        "the write went to a file that is no longer the env's"
    );

    let body = json!({"runtime_env": {"pip": ["evilpkg"]}, "argv": ["true"]});
    let (status, answer) = as_user(&daemon.socket, 1000, "POST", "/v1/workers", Some(&body));
    assert_ne!(status, 200, "{answer}");
    assert!(answer.to_string().contains(".renv-build.json"), "{answer}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's\n");
    daemon.assert_healthy(&env);
}
