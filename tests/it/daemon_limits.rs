//! The daemon on a shared node, attacked through its real socket: one user's idle
//! connections, a body trickled after its headers, a store lock held by another process, a
//! worker tree without a cgroup. Each attack fails, and the daemon keeps answering
//! `/healthz` throughout.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use renv::client::{Client, ClientError};
use serde_json::{Value, json};

use crate::common::Workspace;

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    /// `renv daemon` on `run/renv.sock` in the workspace, run as `uid` (root: `None`).
    fn start(ws: &Workspace, uid: Option<u32>, extra: &[&str]) -> Daemon {
        let socket = ws.path("run/renv.sock");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let mut cmd = ws.renv();
        cmd.args(["daemon", "--socket"])
            .arg(&socket)
            .args(["--stop-grace-seconds", "1"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn().unwrap();
        let start = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "the daemon exited");
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Until it answers: an answered connection (`Connection: close`) is let go by the
        // daemon before its client sees the end, so no probe still holds a slot after.
        let daemon = Daemon { child, socket };
        while !daemon.health().0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the daemon does not answer"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.client().json(method, path, body)
    }

    /// `GET /healthz`: whether it answered `{"ok": true}`, and how long that took.
    fn health(&self) -> (bool, Duration) {
        let started = Instant::now();
        let (status, body) = raw_request(&self.socket, "GET /healthz HTTP/1.1\r\nHost: renv\r\n\r\n");
        (status == 200 && body.contains("\"ok\":true"), started.elapsed())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `head` (a whole request without a body, or with `Connection: close` added) and
/// returns the status and the body of the answer.
fn raw_request(socket: &Path, head: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = head.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    parse_answer(&answer)
}

fn parse_answer(answer: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(answer);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

/// `curl` as `uid` (no supplementary groups): the status and body.
fn curl_as(uid: u32, socket: &Path, path: &str) -> (u16, String) {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ])
        .args(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://renv{path}"))
        .output()
        .expect("setpriv");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

fn api_error(result: Result<Value, ClientError>) -> (u16, String, String) {
    match result {
        Err(ClientError::Api {
            status,
            kind,
            message,
            ..
        }) => (status, kind, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn wait_for_end(daemon: &Daemon, id: &str) -> Value {
    daemon
        .call("GET", &format!("/v1/workers/{id}?wait=true"), None)
        .unwrap()
}

/// Holds `n` idle connections to the socket as the uid it runs as, then asks `/healthz`
/// on one more and prints that answer as one JSON line; holds on until stdin closes.
const CONNECTION_HOARDER: &str = r#"
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    held.append(s)
extra = socket.socket(socket.AF_UNIX)
extra.connect(path)
extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: renv\r\n\r\n")
answer = b""
while True:
    try:
        chunk = extra.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    answer += chunk
print(json.dumps(answer.decode("utf-8", "replace")), flush=True)
sys.stdin.read()
"#;

/// One uid cannot take every connection: its connections beyond
/// `--max-connections-per-uid` are answered 429 at once, while other users (and root) are
/// served, and its places come back when its connections close.
#[test]
fn one_user_cannot_take_every_connection() {
    let ws = Workspace::new();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Daemon::start(
        &ws,
        None,
        &[
            "--allow-uid",
            "1000",
            "--allow-uid",
            "1001",
            "--max-connections-per-uid",
            "3",
            "--header-timeout-seconds",
            "120",
        ],
    );
    let mut hoarder = {
        use std::os::unix::process::CommandExt;
        Command::new("python3")
            .args(["-c", CONNECTION_HOARDER])
            .arg(&daemon.socket)
            .arg("3")
            .uid(1000)
            .gid(1000)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut line = String::new();
    BufReader::new(hoarder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let answer: String = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line:?}"));
    let (status, body) = parse_answer(answer.as_bytes());
    assert_eq!(status, 429, "the 4th connection of uid 1000: {answer}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["kind"], "too_many_connections");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("uid 1000") && message.contains("--max-connections-per-uid 3"),
        "{message}"
    );

    // Uid 1000 still holds its three: everyone else is served meanwhile, and it is not.
    let (status, body) = curl_as(1001, &daemon.socket, "/healthz");
    assert_eq!((status, body.as_str()), (200, r#"{"ok":true}"#));
    assert!(daemon.health().0, "root is served");
    let (status, _) = curl_as(1000, &daemon.socket, "/healthz");
    assert_eq!(status, 429, "uid 1000 is at its cap");

    // Its connections close: its places come back.
    drop(hoarder.stdin.take());
    hoarder.wait().unwrap();
    let started = Instant::now();
    loop {
        match curl_as(1000, &daemon.socket, "/healthz") {
            (200, _) => break,
            (status, body) => assert!(
                started.elapsed() < Duration::from_secs(10),
                "uid 1000 never got its places back: {status} {body}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that sends its headers and then trickles (here: stops sending) its JSON body
/// is answered 408 after `--body-timeout-seconds` and its connection closed, so it holds
/// its connection slot no longer; `/healthz` is answered all the while.
#[test]
fn a_stalled_body_is_answered_408_and_gives_its_slot_back() {
    let ws = Workspace::new();
    let daemon = Daemon::start(
        &ws,
        None,
        &[
            "--max-connections",
            "3",
            "--body-timeout-seconds",
            "2",
            "--header-timeout-seconds",
            "60",
        ],
    );
    let stall = |path: &str| {
        let mut stream = UnixStream::connect(&daemon.socket).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: renv\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{{\"runtime_"
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream
    };
    let stalled = [stall("/v1/envs"), stall("/v1/workers")];
    // Two of three slots are held by the stalled clients; the third serves everyone.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let (status, body) = raw_request(&daemon.socket, "GET /healthz HTTP/1.1\r\nHost: renv\r\n\r\n");
        assert_eq!(status, 200, "/healthz while the bodies stall: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for mut stream in stalled {
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let (status, body) = parse_answer(&answer);
        assert_eq!(status, 408, "{}", String::from_utf8_lossy(&answer));
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["field"], "body");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("within 2 s (--body-timeout-seconds)"),
            "{body}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered at the deadline, not whenever"
    );
    // Their slots are free again: two idle connections and a request fit in three.
    let _idle = [
        UnixStream::connect(&daemon.socket).unwrap(),
        UnixStream::connect(&daemon.socket).unwrap(),
    ];
    assert!(daemon.health().0, "the stalled clients' slots came back");
    // A body sent whole is still fine.
    let env = daemon
        .call(
            "POST",
            "/v1/envs",
            Some(&json!({"runtime_env": {"env_vars": {"A": "1"}}})),
        )
        .unwrap();
    assert_eq!(env["env"]["A"], "1");
}

/// Another process holds a store entry's lock (`flock`, as a build or a prune would) for
/// 10 s. Requests that need the entry wait for it off the event loop and give up at
/// `--lock-timeout-seconds` with a 503 naming the entry, giving back the GPU and the hold
/// they took; everything else — `/healthz` first — is answered all the while; once the
/// lock is free, the same requests succeed.
#[test]
fn a_held_entry_lock_is_waited_for_with_a_deadline_off_the_event_loop() {
    let ws = Workspace::new();
    ws.write("project/hello.py", "WORD = 'hello'\n");
    let packaged = ws.renv().args(["package", "project", "--json"]).output().unwrap();
    crate::common::assert_success(&packaged);
    let digest = serde_json::from_slice::<Value>(&packaged.stdout).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let daemon = Daemon::start(&ws, None, &["--gpus", "0", "--lock-timeout-seconds", "3"]);
    let spec = json!({"working_dir": format!("pkg://{digest}")});
    let env = daemon
        .call("POST", "/v1/envs", Some(&json!({"runtime_env": spec})))
        .unwrap();
    let env_id = env["env_id"].as_str().unwrap().to_string();
    // Released: nothing leases the package now, so the next user must take its lock.
    daemon
        .call("DELETE", &format!("/v1/envs/{env_id}"), None)
        .unwrap();

    let lock = ws.store_v1("locks").join(format!("pkg-{digest}.lock"));
    let locked = ws.path("locked");
    let mut locker = Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); \
             open(sys.argv[2], 'w').close(); time.sleep(10)",
        ])
        .arg(&lock)
        .arg(&locked)
        .spawn()
        .unwrap();
    while !locked.exists() {
        assert!(locker.try_wait().unwrap().is_none(), "the locker failed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let held_since = Instant::now();
    let mut latencies = Vec::new();
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            daemon.call(
                "POST",
                "/v1/workers",
                Some(&json!({"env_id": env_id, "argv": ["true"], "num_gpus": 1})),
            )
        });
        let reference = s.spawn(|| {
            daemon.call(
                "POST",
                "/v1/envs",
                Some(&json!({"runtime_env": spec, "ref": "waits"})),
            )
        });
        let mut checked_after_timeouts = false;
        while locker.try_wait().unwrap().is_none() {
            let (ok, took) = daemon.health();
            assert!(ok, "/healthz failed while the lock was held");
            assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
            latencies.push(took);
            if !checked_after_timeouts && worker.is_finished() && reference.is_finished() {
                checked_after_timeouts = true;
                assert!(
                    held_since.elapsed() < Duration::from_secs(9),
                    "the requests gave up before the lock was released"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for answer in [worker.join().unwrap(), reference.join().unwrap()] {
            let (status, kind, message) = api_error(answer);
            assert_eq!((status, kind.as_str()), (503, "busy"), "{message}");
            assert!(
                message.contains(&format!("pkg-{digest}")) && message.contains("--lock-timeout-seconds"),
                "{message}"
            );
        }
    });
    // What the failed requests took is back: no hold on the env, and its GPU lent again.
    let envs = daemon.call("GET", "/v1/envs", None).unwrap();
    let record = envs["envs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["env_id"] == env_id.as_str())
        .expect("the env is still known");
    assert_eq!(
        (record["refs"].as_u64(), record["workers"].as_u64()),
        (Some(0), Some(0))
    );
    let other = daemon
        .call(
            "POST",
            "/v1/workers",
            Some(&json!({"runtime_env": {}, "argv": ["true"], "num_gpus": 1})),
        )
        .unwrap();
    assert_eq!(other["gpus"], json!([0]), "the GPU came back");
    wait_for_end(&daemon, other["worker_id"].as_str().unwrap());
    // The lock is free now: the same requests succeed.
    let worker = daemon
        .call(
            "POST",
            "/v1/workers",
            Some(&json!({"env_id": env_id, "argv": ["true"], "num_gpus": 1})),
        )
        .unwrap();
    assert_eq!(
        wait_for_end(&daemon, worker["worker_id"].as_str().unwrap())["state"],
        "succeeded"
    );
    daemon
        .call(
            "POST",
            "/v1/envs",
            Some(&json!({"runtime_env": spec, "ref": "after"})),
        )
        .unwrap();

    latencies.sort();
    eprintln!(
        "/healthz while an entry's lock was held: {} answers, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        latencies[latencies.len() - 1]
    );
}

/// Live processes running `sleep <secs>` (zombies are dead already).
fn sleeping(secs: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            cmdline == format!("sleep\0{secs}\0").as_bytes() && !stat.contains(") Z ")
        })
        .collect()
}

/// `sleep <secs>` is gone soon: without a cgroup the daemon sends the group SIGKILL but
/// cannot tell when its members (no children of its own) have died.
fn assert_gone(secs: &str, what: &str) {
    let started = Instant::now();
    while !sleeping(secs).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: sleep {secs} is still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Without a cgroup (a daemon that may not create one: here, not root), a worker's tree is
/// its process group: what a leader leaves running is killed when it exits, and a stop
/// kills what ignores SIGTERM — through the group the leader, still unreaped, holds.
#[test]
fn without_cgroups_a_workers_process_group_is_ended_with_it() {
    let ws = Workspace::new();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in ["store", "run"] {
        std::fs::create_dir_all(ws.path(dir)).unwrap();
        std::os::unix::fs::chown(ws.path(dir), Some(1000), Some(1000)).unwrap();
    }
    let daemon = Daemon::start(&ws, Some(1000), &["--gpus", "none"]);
    let mut metrics = String::new();
    daemon
        .client()
        .send("GET", "/metrics", None)
        .unwrap()
        .read_to_string(&mut metrics)
        .unwrap();
    // A daemon of uid 1000 cannot create cgroups below root's: the set-up that makes
    // the fallback the path under test.
    assert!(
        metrics.contains("renv_worker_cgroups 0"),
        "uid 1000's daemon got cgroups here, so the fallback is not what runs: {metrics}"
    );

    let w = daemon
        .call(
            "POST",
            "/v1/workers",
            Some(&json!({"runtime_env": {}, "argv": ["sh", "-c", "sleep 331 & exit 0"]})),
        )
        .unwrap();
    assert_eq!(
        wait_for_end(&daemon, w["worker_id"].as_str().unwrap())["state"],
        "succeeded"
    );
    assert_gone("331", "left behind by its leader");

    let script = "(trap '' TERM; exec sleep 332) & echo started; wait";
    let w = daemon
        .call(
            "POST",
            "/v1/workers",
            Some(&json!({"runtime_env": {}, "argv": ["sh", "-c", script]})),
        )
        .unwrap();
    let id = w["worker_id"].as_str().unwrap();
    let started = Instant::now();
    while sleeping("332").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the worker's child did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.call("DELETE", &format!("/v1/workers/{id}"), None).unwrap();
    assert_eq!(wait_for_end(&daemon, id)["state"], "stopped");
    assert_gone("332", "the child that ignored SIGTERM");
    assert!(daemon.health().0);
}
