//! A daemon killed with SIGKILL at the worst moments and started again on the same store:
//! references, workers (running, or ended while it was down, with their exit codes) and
//! GPU allocations come back; worker ids are never given twice; nothing leaks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use renv::client::ClientError;
use serde_json::{Value, json};

use crate::common::{Workspace, assert_success};
use crate::daemon::{Daemon, api_error, logs, setup, start_worker, wait_for_end};

/// References per env, as the daemon lists them (to all of them: the tests are root).
fn ref_counts(daemon: &Daemon) -> HashMap<String, i64> {
    daemon.get("/v1/envs")["envs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|env| {
            (
                env["env_id"].as_str().unwrap().to_string(),
                env["refs"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn refs_by_tag(daemon: &Daemon) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for env in daemon.get("/v1/envs")["envs"].as_array().unwrap() {
        let tags = env["ref_tags"].as_array().unwrap();
        out.entry(env["env_id"].as_str().unwrap().to_string())
            .or_default()
            .extend(tags.iter().map(|t| t.as_str().unwrap().to_string()));
    }
    out
}

fn prune_everything(ws: &Workspace) -> Value {
    let out = ws
        .renv()
        .args(["prune", "--json", "--max-size", "0", "--min-age", "0s"])
        .output()
        .unwrap();
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Pids of the supervisors of this store (their argv names the store), spares included.
fn supervisors_of(ws: &Workspace) -> Vec<u32> {
    let store = ws.store().canonicalize().unwrap();
    let store = store.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                args.get(1) == Some(&&b"__supervise"[..]) && args.get(2) == Some(&store.as_bytes())
            })
        })
        .collect()
}

fn wait_for_no_supervisors(ws: &Workspace) {
    let start = Instant::now();
    while !supervisors_of(ws).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "supervisors left running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn references_workers_and_gpus_survive_a_kill_9() {
    let ws = setup();
    ws.write("proj/app.py", "print('hi')\n");
    ws.package_zip("proj", "proj.zip");
    let args = ["--gpus", "0,1,2"];
    let mut daemon = Daemon::start(&ws, &args);
    let env = json!({"working_dir": format!("file://{}", ws.path("proj.zip").display())});
    let a = daemon
        .post("/v1/envs", &json!({"runtime_env": env, "ref": "job-a"}))
        .unwrap();
    daemon
        .post("/v1/envs", &json!({"runtime_env": env, "ref": "job-b"}))
        .unwrap();
    let env_id = a["env_id"].as_str().unwrap().to_string();
    let long = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["sh", "-c", "echo started; exec sleep 60"], "num_gpus": 2}),
    )
    .unwrap();
    assert_eq!(long["gpus"], json!([0, 1]));
    let short = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["sh", "-c", "sleep 1; exit 7"]}),
    )
    .unwrap();
    let quick = start_worker(&daemon, json!({"runtime_env": env, "argv": ["true"]})).unwrap();
    wait_for_end(&daemon, quick["worker_id"].as_str().unwrap());
    let started_before: HashSet<String> = [&long, &short, &quick]
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap().to_string())
        .collect();

    daemon.kill9();
    // While it is down: the short worker ends (its supervisor records the exit), and a
    // cron prune finds the referenced env held by the saved state.
    std::thread::sleep(Duration::from_millis(1500));
    let report = prune_everything(&ws);
    assert!(report["removed"].as_array().unwrap().is_empty(), "{report}");

    let daemon = Daemon::start(&ws, &args);
    let refs = refs_by_tag(&daemon);
    let mut tags = refs[&env_id].clone();
    tags.sort();
    assert_eq!(tags, ["job-a", "job-b"], "references with their tags are back");
    let long_id = long["worker_id"].as_str().unwrap();
    let w = daemon.get(&format!("/v1/workers/{long_id}"));
    assert_eq!(w["state"], "running", "{w}");
    assert_eq!(w["gpus"], json!([0, 1]));
    assert_eq!(w["pid"], long["pid"]);
    let s = daemon.get(&format!("/v1/workers/{}", short["worker_id"].as_str().unwrap()));
    assert_eq!(
        (s["state"].as_str(), s["exit_code"].as_i64()),
        (Some("failed"), Some(7)),
        "{s}"
    );
    assert_eq!(
        daemon.get(&format!("/v1/workers/{}", quick["worker_id"].as_str().unwrap()))["state"],
        "succeeded"
    );
    // The GPUs the adopted worker holds are not handed out again.
    let (status, kind, field, _) = api_error(start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["true"], "num_gpus": 2}),
    ));
    assert_eq!(
        (status, kind.as_str(), field.as_deref()),
        (503, "busy", Some("num_gpus"))
    );
    let (status, ..) = api_error(start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["true"], "gpus": [1]}),
    ));
    assert_eq!(status, 503);
    let third = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["true"], "num_gpus": 1}),
    )
    .unwrap();
    assert_eq!(third["gpus"], json!([2]));
    let third_id = third["worker_id"].as_str().unwrap();
    assert!(
        !started_before.contains(third_id),
        "worker ids are never given twice"
    );
    assert_eq!(third_id, "w000004");
    // The adopted worker is the restarted daemon's to follow and stop.
    assert_eq!(logs(&daemon, long_id, "stdout"), "started\n");
    let stopped = daemon
        .client()
        .json("DELETE", &format!("/v1/workers/{long_id}"), None)
        .unwrap();
    assert_eq!(stopped["worker_id"], long_id);
    let ended = daemon.get(&format!("/v1/workers/{long_id}?wait=true"));
    assert_eq!(ended["state"], "stopped", "{ended}");
    assert_eq!(ended["signal"], libc::SIGTERM);
    // Its GPUs are free once it is gone.
    let both = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["true"], "num_gpus": 2}),
    )
    .unwrap();
    assert_eq!(both["gpus"], json!([0, 1]));
    wait_for_end(&daemon, both["worker_id"].as_str().unwrap());
    // The restored references are released as any other.
    for left in [1, 0] {
        let released = daemon
            .client()
            .json("DELETE", &format!("/v1/envs/{env_id}"), None)
            .unwrap();
        assert_eq!(released["refs"], left);
    }
    drop(daemon);
    // Every supervisor exits with its worker (and the spares with their daemon).
    wait_for_no_supervisors(&ws);
    let report = prune_everything(&ws);
    assert_eq!(report["removed"].as_array().unwrap().len(), 1, "{report}");
}

#[test]
fn a_reference_whose_env_went_while_the_daemon_was_down_is_reported() {
    let ws = setup();
    ws.write("proj/x", "x");
    ws.package_zip("proj", "proj.zip");
    let mut daemon = Daemon::start(&ws, &["--gpus", "none"]);
    let env = json!({"working_dir": format!("file://{}", ws.path("proj.zip").display())});
    let a = daemon
        .post("/v1/envs", &json!({"runtime_env": env, "ref": "kept"}))
        .unwrap();
    let env_id = a["env_id"].as_str().unwrap().to_string();
    daemon.kill9();
    // Someone removes the entry by hand while no daemon runs.
    let pkg = a["working_dir"].as_str().unwrap();
    let digest = std::path::Path::new(pkg).file_name().unwrap().to_str().unwrap();
    std::fs::remove_file(ws.store_v1(&format!("meta/pkg-{digest}.json"))).unwrap();
    assert!(
        std::process::Command::new("rm")
            .args(["-rf", pkg])
            .status()
            .unwrap()
            .success()
    );

    let daemon = Daemon::start(&ws, &["--gpus", "none"]);
    let envs = daemon.get("/v1/envs")["envs"].clone();
    let lost = envs
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["env_id"] == env_id.as_str())
        .unwrap_or_else(|| panic!("the lost reference is listed: {envs}"));
    assert_eq!(lost["missing"], true);
    assert_eq!(lost["ref_tags"], json!(["kept"]));
    assert_eq!(daemon.metric("renv_env_references_lost"), 1.0);
    // Building the same env again gives the reference its env back.
    let again = daemon.post("/v1/envs", &json!({"runtime_env": env})).unwrap();
    assert_eq!(again["env_id"], env_id.as_str());
    assert_eq!(daemon.metric("renv_env_references_lost"), 0.0);
    let mut tags = refs_by_tag(&daemon)[&env_id].clone();
    tags.sort();
    assert_eq!(tags, ["kept"]);
    for left in [1, 0] {
        let released = daemon
            .client()
            .json("DELETE", &format!("/v1/envs/{env_id}"), None)
            .unwrap();
        assert_eq!(released["refs"], left);
    }
}

/// What the load threads were told by the daemon, and what they cannot know (a request
/// in flight when the daemon died may or may not have been saved).
#[derive(Default)]
struct Ledger {
    /// References answered and not released (nor being released), per env.
    refs: HashMap<String, i64>,
    /// Reference requests and releases that got no answer (the reference may be there
    /// or not), per env.
    unsure: HashMap<String, i64>,
    /// Every worker id the daemon answered with.
    workers: Vec<String>,
}

fn no_answer(e: &ClientError) -> bool {
    !matches!(e, ClientError::Api { .. })
}

/// 30 cycles of: load (references taken and released, workers with GPUs started, a new
/// package uploaded, new working_dirs built), a SIGKILL at a random moment, a restart. After
/// each restart the saved state must agree with what the clients were told; at the end,
/// with everything released and stopped, nothing is left: no reference, no supervisor,
/// no held entry, and `renv verify` is clean.
#[test]
fn thirty_kill_9_restarts_under_load_lose_and_leak_nothing() {
    let ws = setup();
    ws.write("proj/x", "x");
    ws.package_zip("proj", "proj.zip");
    let args = ["--gpus", "0,1,2,3", "--max-ended-workers", "100000"];
    let wd = format!("file://{}", ws.path("proj.zip").display());
    let specs: Vec<Value> = (0..3)
        .map(|i| json!({"working_dir": wd, "env_vars": {"K": i.to_string()}}))
        .collect();
    let mut daemon = Daemon::start(&ws, &args);
    let env_ids: Vec<String> = specs
        .iter()
        .map(|spec| {
            let env = daemon.post("/v1/envs", &json!({"runtime_env": spec})).unwrap();
            let id = env["env_id"].as_str().unwrap().to_string();
            daemon
                .client()
                .json("DELETE", &format!("/v1/envs/{id}"), None)
                .unwrap();
            id
        })
        .collect();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let socket = daemon.socket.clone();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    for cycle in 0..30 {
        let running = Arc::new(AtomicBool::new(true));
        let mut load = Vec::new();
        // References, taken and released.
        for t in 0..2 {
            let (ledger, running, socket, specs, env_ids) = (
                Arc::clone(&ledger),
                Arc::clone(&running),
                socket.clone(),
                specs.clone(),
                env_ids.clone(),
            );
            load.push(std::thread::spawn(move || {
                let client = renv::client::Client::new(&socket);
                let mut i = t;
                while running.load(Ordering::Relaxed) {
                    i += 1;
                    let k = i % specs.len();
                    let env_id = &env_ids[k];
                    // A release takes its reference off the ledger first, so two threads
                    // never release one reference.
                    let release = i % 3 == 0 && {
                        let mut ledger = ledger.lock().unwrap();
                        let held = ledger.refs.entry(env_id.clone()).or_default();
                        *held > 0 && {
                            *held -= 1;
                            true
                        }
                    };
                    if release {
                        match client.json("DELETE", &format!("/v1/envs/{env_id}"), None) {
                            Ok(_) => {}
                            Err(e) if no_answer(&e) => {
                                *ledger.lock().unwrap().unsure.entry(env_id.clone()).or_default() += 1;
                                break;
                            }
                            Err(e) => panic!("release: {e}"),
                        }
                    } else {
                        let body = json!({"runtime_env": specs[k], "ref": format!("c{cycle}")});
                        match client.json("POST", "/v1/envs", Some(&body)) {
                            Ok(env) => {
                                assert_eq!(env["env_id"], env_id.as_str());
                                *ledger.lock().unwrap().refs.entry(env_id.clone()).or_default() += 1;
                            }
                            Err(e) if no_answer(&e) => {
                                *ledger.lock().unwrap().unsure.entry(env_id.clone()).or_default() += 1;
                                break;
                            }
                            Err(e) => panic!("reference: {e}"),
                        }
                    }
                }
            }));
        }
        // Workers with GPUs, some ending while the daemon is down.
        {
            let (ledger, running, socket, spec) = (
                Arc::clone(&ledger),
                Arc::clone(&running),
                socket.clone(),
                specs[0].clone(),
            );
            load.push(std::thread::spawn(move || {
                let client = renv::client::Client::new(&socket);
                let mut i = 0;
                while running.load(Ordering::Relaxed) {
                    i += 1;
                    let sleep = ["0", "0.05", "0.3", "1"][i % 4];
                    let body = json!({"runtime_env": spec, "argv": ["sleep", sleep], "num_gpus": 1});
                    match client.json("POST", "/v1/workers", Some(&body)) {
                        Ok(w) => ledger
                            .lock()
                            .unwrap()
                            .workers
                            .push(w["worker_id"].as_str().unwrap().to_string()),
                        Err(ClientError::Api { status: 503, .. }) => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) if no_answer(&e) => break,
                        Err(e) => panic!("worker: {e}"),
                    }
                }
            }));
        }
        // Builds of new trees and uploads: killed in the middle of some.
        {
            let (running, socket, ws_dir) = (Arc::clone(&running), socket.clone(), ws.path(""));
            load.push(std::thread::spawn(move || {
                let client = renv::client::Client::new(&socket);
                let dir = ws_dir.join(format!("tree-{cycle}"));
                std::fs::create_dir_all(&dir).unwrap();
                for f in 0..200 {
                    std::fs::write(dir.join(format!("f{f}")), format!("{cycle} {f}").repeat(100)).unwrap();
                }
                let zip = ws_dir.join(format!("tree-{cycle}.zip"));
                let body = json!({"runtime_env": {"working_dir": format!("file://{}", zip.display())}});
                let packaged = std::process::Command::new(env!("CARGO_BIN_EXE_renv"))
                    .args(["package", "-o"])
                    .arg(&zip)
                    .arg(&dir)
                    .output()
                    .unwrap();
                assert!(packaged.status.success());
                while running.load(Ordering::Relaxed) {
                    if let Err(e) = client.json("POST", "/v1/envs", Some(&body))
                        && no_answer(&e)
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(30));
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(50 + random(400)));
        daemon.kill9();
        running.store(false, Ordering::Relaxed);
        for thread in load {
            thread.join().unwrap();
        }
        daemon = Daemon::start(&ws, &args);

        // References: what was answered is there; at most what was asked is.
        let present = ref_counts(&daemon);
        let mut ledger = ledger.lock().unwrap();
        for env_id in &env_ids {
            let have = present.get(env_id).copied().unwrap_or(0);
            let low = ledger.refs.get(env_id).copied().unwrap_or(0);
            let high = low + ledger.unsure.get(env_id).copied().unwrap_or(0);
            assert!(
                (low..=high).contains(&have),
                "cycle {cycle}: env {env_id} has {have} references, expected {low}..={high}"
            );
            ledger.refs.insert(env_id.clone(), have);
        }
        ledger.unsure.clear();
        // Workers: every one answered is known; no id twice; GPUs of running ones disjoint.
        let listed = daemon.get("/v1/workers")["workers"].clone();
        let listed = listed.as_array().unwrap();
        let known: HashSet<&str> = listed.iter().map(|w| w["worker_id"].as_str().unwrap()).collect();
        assert_eq!(known.len(), listed.len());
        for id in &ledger.workers {
            assert!(
                known.contains(id.as_str()),
                "cycle {cycle}: worker {id} was forgotten"
            );
        }
        let answered: HashSet<&String> = ledger.workers.iter().collect();
        assert_eq!(
            answered.len(),
            ledger.workers.len(),
            "a worker id was given twice"
        );
        let mut busy = Vec::new();
        for w in listed.iter().filter(|w| w["state"] == "running") {
            busy.extend(w["gpus"].as_array().unwrap().iter().map(|g| g.as_u64().unwrap()));
        }
        let distinct: HashSet<u64> = busy.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            busy.len(),
            "cycle {cycle}: a GPU is given to two running workers"
        );
    }

    // Everything ended and released: nothing is held, nothing is left running.
    let ledger = ledger.lock().unwrap();
    for id in &ledger.workers {
        wait_for_end(&daemon, id);
    }
    // (Each build request took a reference too: release everything the daemon lists.)
    for (env_id, refs) in ref_counts(&daemon) {
        for _ in 0..refs {
            daemon
                .client()
                .json("DELETE", &format!("/v1/envs/{env_id}"), None)
                .unwrap();
        }
    }
    assert!(
        ref_counts(&daemon).values().all(|refs| *refs == 0),
        "{}",
        daemon.get("/v1/envs")
    );
    drop(daemon);
    wait_for_no_supervisors(&ws);
    let verify = ws.renv().args(["verify"]).output().unwrap();
    assert_success(&verify);
    let report = prune_everything(&ws);
    assert!(
        report["kept"].as_array().unwrap().is_empty(),
        "nothing held: {report}"
    );
}

/// The daemon killed in the middle of an upload (half the zip received) and in the middle
/// of its unpack: the restarted daemon's store holds no part of it, the same upload then
/// succeeds, and `renv verify` is clean.
#[test]
fn a_kill_9_during_an_upload_leaves_nothing_half_done() {
    use std::io::{Read, Write};
    let ws = setup();
    for i in 0..400 {
        ws.write(&format!("proj/f{i}.txt"), format!("{i} ").repeat(2000));
    }
    for half in [true, false] {
        // A package of its own each time (one already stored is answered at once).
        ws.write("proj/f0.txt", format!("{half}"));
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
        let zip = std::fs::read(ws.path("proj.zip")).unwrap();
        let mut daemon = Daemon::start(&ws, &["--gpus", "none"]);
        // Half the body, then the daemon dies; or all of it, and it dies while unpacking.
        let sent = if half { zip.len() / 2 } else { zip.len() };
        let mut raw = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
        write!(
            raw,
            "PUT /v1/packages/{digest} HTTP/1.1\r\nHost: renv\r\nContent-Type: application/zip\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            zip.len()
        )
        .unwrap();
        raw.write_all(&zip[..sent]).unwrap();
        std::thread::sleep(Duration::from_millis(if half { 100 } else { 15 }));
        daemon.kill9();
        let ls = ws.renv().args(["ls", "--json"]).output().unwrap();
        assert_success(&ls);
        let committed = String::from_utf8_lossy(&ls.stdout).contains(&digest);
        assert!(!(half && committed), "half a zip was never committed");
        let verify = ws.renv().args(["verify"]).output().unwrap();
        assert_success(&verify);
        let daemon = Daemon::start(&ws, &["--gpus", "none"]);
        if !committed {
            // Nothing of it is served, and it uploads now.
            let mut body = std::io::Cursor::new(zip.clone());
            let mut answer = String::new();
            daemon
                .client()
                .send(
                    "PUT",
                    &format!("/v1/packages/{digest}"),
                    Some(("application/zip", zip.len() as u64, &mut body)),
                )
                .unwrap()
                .read_to_string(&mut answer)
                .unwrap();
            assert!(answer.contains("\"created\":true"), "{answer}");
        }
        let env = daemon
            .post(
                "/v1/envs",
                &json!({"runtime_env": {"working_dir": format!("pkg://{digest}")}}),
            )
            .unwrap();
        let wd = env["working_dir"].as_str().unwrap();
        assert_eq!(std::fs::read_dir(wd).unwrap().count(), 400);
    }
    let verify = ws.renv().args(["verify"]).output().unwrap();
    assert_success(&verify);
}

/// The parent process (field 4 of /proc/<pid>/stat).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

fn is_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

/// A stop that comes right after the start (the supervisor has just started the worker)
/// stops the worker: never a supervisor killed by it and a worker orphaned, running on
/// with GPUs handed to the next.
#[test]
fn a_stop_right_after_the_start_stops_the_worker() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &["--gpus", "0"]);
    let env = json!({"env_vars": {"X": "1"}});
    let mut session = daemon.client().session().unwrap();
    for _ in 0..20 {
        let w = session
            .json(
                "POST",
                "/v1/workers",
                Some(&json!({"runtime_env": env, "argv": ["sleep", "600"], "num_gpus": 1})),
            )
            .unwrap();
        let id = w["worker_id"].as_str().unwrap();
        session
            .json("DELETE", &format!("/v1/workers/{id}"), None)
            .unwrap();
        let ended = session
            .json("GET", &format!("/v1/workers/{id}?wait=true"), None)
            .unwrap();
        assert_eq!(ended["state"], "stopped", "{ended}");
        assert!(is_gone(w["pid"].as_u64().unwrap() as u32), "the worker is gone");
    }
}

/// A supervisor killed while its worker runs: the worker's tree is ended, the worker is
/// `lost`, and its GPUs go back only then.
#[test]
fn a_killed_supervisor_takes_its_worker_with_it() {
    let ws = setup();
    let daemon = Daemon::start(&ws, &["--gpus", "0"]);
    let env = json!({"env_vars": {"X": "1"}});
    let w = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["sleep", "600"], "num_gpus": 1}),
    )
    .unwrap();
    let pid = w["pid"].as_u64().unwrap() as u32;
    let supervisor = parent_of(pid).unwrap();
    // SAFETY: killing the supervisor our daemon started.
    unsafe { libc::kill(supervisor as i32, libc::SIGKILL) };
    let ended = wait_for_end(&daemon, w["worker_id"].as_str().unwrap());
    assert_eq!(ended["state"], "lost", "{ended}");
    assert!(is_gone(pid), "the worker went with its supervisor");
    let next = start_worker(
        &daemon,
        json!({"runtime_env": env, "argv": ["true"], "num_gpus": 1}),
    )
    .unwrap();
    assert_eq!(next["gpus"], json!([0]));
    // Spares someone killed are not handed out.
    for spare in supervisors_of(&ws) {
        // SAFETY: killing supervisors of our own store.
        unsafe { libc::kill(spare as i32, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(100));
    let after = start_worker(&daemon, json!({"runtime_env": env, "argv": ["true"]})).unwrap();
    assert_eq!(
        wait_for_end(&daemon, after["worker_id"].as_str().unwrap())["state"],
        "succeeded"
    );
}

/// One store, one daemon: a second on another socket is refused, naming why.
#[test]
fn a_second_daemon_on_one_store_is_refused() {
    let ws = setup();
    let _first = Daemon::start(&ws, &["--gpus", "none"]);
    let second = Daemon::try_start_with(&ws, "run/other.sock", &["--gpus", "none"], &[]);
    let err = second.err().expect("refused");
    assert!(err.contains("another renv daemon serves the store"), "{err}");
}

/// References taken and released many times leave a WAL of bounded size (checkpoints
/// keep pace with commits made in place).
#[test]
fn the_state_log_stays_bounded_under_churn() {
    let ws = setup();
    // (Quiet: nobody reads its log here, and 3,000 lines would fill the pipe.)
    let daemon = Daemon::try_start_with(
        &ws,
        "run/renv.sock",
        &["--gpus", "none"],
        &[("RENV_LOG", "warn".into())],
    )
    .unwrap();
    let env = json!({"env_vars": {"X": "1"}});
    let mut session = daemon.client().session().unwrap();
    for _ in 0..1500 {
        let e = session
            .json("POST", "/v1/envs", Some(&json!({"runtime_env": env})))
            .unwrap();
        session
            .json(
                "DELETE",
                &format!("/v1/envs/{}", e["env_id"].as_str().unwrap()),
                None,
            )
            .unwrap();
    }
    let wal = std::fs::metadata(ws.store_v1("state/daemon.db-wal"))
        .unwrap()
        .len();
    // (Without checkpoints: about 8 KiB a commit, 24 MiB here.)
    assert!(wal < 16 << 20, "the WAL grew to {wal} bytes");
}
