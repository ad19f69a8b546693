//! Venv templates: a new env's skeleton is copied from what `uv venv` made once for the
//! same uv, interpreter and options. The envs must be exactly what `uv venv` and the same
//! install make; templates must be distinct where uv's output could differ, made once
//! however many builds start together, and out of everyone's reach but the store owner's.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::common::{Workspace, assert_success, list_dir, python, wheelhouse};
use crate::daemon::{Daemon, python_as};

/// A workspace with a local wheelhouse, and the flags that make it the only index.
fn setup() -> (Workspace, Vec<String>) {
    let ws = Workspace::new();
    wheelhouse(
        &ws.path("wheels"),
        &[
            ("tinypkg", "1.0", "VERSION = '1.0'\n"),
            ("tinypkg", "2.0", "VERSION = '2.0'\n"),
            ("otherpkg", "0.1", "NAME = 'other'\n"),
        ],
    );
    let flags = vec![
        "--no-index".to_string(),
        "--find-links".to_string(),
        ws.path("wheels").display().to_string(),
    ];
    (ws, flags)
}

fn build(ws: &Workspace, flags: &[String], spec: &Value, name: &str) -> Value {
    let path = ws.spec(name, spec);
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    ws.build_with(&path, &extra)
}

fn in_env(python: &str, code: &str) -> String {
    let out = Command::new(python).args(["-c", code]).output().unwrap();
    assert_success(&out);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// One path of a tree: its kind, mode, owner, and its bytes or symlink target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: char,
    mode: u32,
    uid: u32,
    data: Vec<u8>,
}

/// Every path below `root`, never following a symlink.
fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let (kind, data) = if meta.is_symlink() {
                (
                    'l',
                    std::fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if meta.is_dir() {
                pending.push(path.clone());
                ('d', Vec::new())
            } else {
                assert!(meta.is_file(), "{}", path.display());
                ('f', std::fs::read(&path).unwrap())
            };
            let mode = if kind == 'l' { 0 } else { meta.mode() & 0o7777 };
            out.insert(
                rel,
                Node {
                    kind,
                    mode,
                    uid: meta.uid(),
                    data,
                },
            );
        }
    }
    out
}

/// What the store makes of a tree when it commits it: read-only, its owner's.
fn sealed(mut tree: BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    for node in tree.values_mut() {
        node.mode = match node.kind {
            'd' => 0o555,
            'f' => node.mode & 0o555,
            _ => node.mode,
        };
        node.uid = 0;
    }
    tree
}

/// renv's own files in an env (its build record, the bytecode hook), which no `uv` run
/// makes.
fn without_renvs_own(mut tree: BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    let before = tree.len();
    tree.retain(|rel, _| {
        let name = rel.rsplit('/').next().unwrap();
        ![".renv-build.json", "_renv_bytecode.py", "_renv_bytecode.pth"].contains(&name)
    });
    assert_eq!(before - tree.len(), 3, "renv's own three files");
    tree
}

/// `uv venv` by hand, as a build runs it, at `dir`.
fn uv_venv(ws: &Workspace, python: &Path, site_packages: bool, dir: &Path) {
    let mut cmd = Command::new(crate::common::uv());
    cmd.env("UV_PYTHON_DOWNLOADS", "never")
        .env("UV_CACHE_DIR", ws.path("by-hand-cache"))
        .args(["venv", "--relocatable", "--no-config", "--quiet", "--python"])
        .arg(python);
    if site_packages {
        cmd.arg("--system-site-packages");
    }
    assert_success(&cmd.arg(dir).output().unwrap());
}

/// The venv templates of the workspace's store.
fn templates(ws: &Workspace) -> Vec<PathBuf> {
    list_dir(&ws.store_v1("templates"))
        .into_iter()
        .map(|name| ws.store_v1("templates").join(name))
        .collect()
}

/// A uv that logs its calls and keeps a copy of every venv as the installer first sees
/// it (`snapshots/<n>`), before anything is installed into it.
fn snapshotting_uv(ws: &Workspace) -> (PathBuf, PathBuf, PathBuf) {
    let (calls, snapshots) = (ws.path("uv-calls.log"), ws.path("snapshots"));
    std::fs::create_dir_all(&snapshots).unwrap();
    let script = format!(
        "#!/bin/sh\necho \"$1 $2 $3\" >> {calls}\n\
         if [ \"$3\" = --offline ]; then\n\
         py=; prev=; for a; do [ \"$prev\" = --python ] && py=$a; prev=$a; done\n\
         cp -a \"${{py%/bin/python}}\" {snapshots}/$(ls {snapshots} | wc -l)\n\
         fi\nexec {uv} \"$@\"\n",
        calls = calls.display(),
        snapshots = snapshots.display(),
        uv = crate::common::uv().display()
    );
    let wrapper = ws.write("snapshotting-uv", script);
    crate::common::set_mode(&wrapper, 0o755);
    (wrapper, calls, snapshots)
}

/// The installer sees exactly the venv `uv venv` would have made (every name, kind, mode,
/// owner, symlink target and byte), whether the template was made by this build or an
/// earlier one; and the committed env is exactly a `uv venv` at another path followed by
/// the same install, sealed.
#[test]
fn an_env_from_a_template_is_what_uv_venv_and_the_same_install_make() {
    let (ws, mut flags) = setup();
    let (uv, calls, snapshots) = snapshotting_uv(&ws);
    flags.extend(["--uv".to_string(), uv.display().to_string()]);
    let first = build(&ws, &flags, &json!({"pip": ["tinypkg==1.0"]}), "first.json");
    let spec = json!({"pip": ["tinypkg==2.0", "otherpkg"]});
    let second = build(&ws, &flags, &spec, "second.json");
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(
        log.lines().filter(|l| l.starts_with("venv ")).count(),
        1,
        "uv venv ran once, for the template: {log}"
    );
    assert_eq!(crate::common::builds(&log), 2, "{log}");
    assert_eq!(templates(&ws).len(), 1);

    let by_hand = ws.path("elsewhere/by-hand");
    uv_venv(&ws, python(), false, &by_hand);
    let skeleton = tree(&by_hand);
    assert!(skeleton.contains_key("pyvenv.cfg") && skeleton["bin/python"].kind == 'l');
    for n in ["0", "1"] {
        assert_eq!(
            tree(&snapshots.join(n)),
            skeleton,
            "build {n}'s venv before its install"
        );
    }

    let install = Command::new(crate::common::uv())
        .env("UV_CACHE_DIR", ws.path("by-hand-cache"))
        .args(["pip", "install", "--no-config", "--python"])
        .arg(by_hand.join("bin/python"))
        .args(&flags[..3])
        .args(["tinypkg==2.0", "otherpkg"])
        .output()
        .unwrap();
    assert_success(&install);
    let env = Path::new(second["venv"]["path"].as_str().unwrap());
    let env_tree = without_renvs_own(tree(env));
    assert!(env_tree.keys().any(|rel| rel.ends_with("tinypkg/__init__.py")));
    assert_eq!(env_tree, sealed(tree(&by_hand)));
    let python = second["python"].as_str().unwrap();
    assert_eq!(
        in_env(
            python,
            "import tinypkg, otherpkg; print(tinypkg.VERSION, otherpkg.NAME)"
        ),
        "2.0 other"
    );
    assert_eq!(
        in_env(
            first["python"].as_str().unwrap(),
            "import tinypkg; print(tinypkg.VERSION)"
        ),
        "1.0"
    );
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
}

/// What `uv venv` writes depends on the interpreter (`bin/python`'s target, pyvenv.cfg)
/// and on `--system-site-packages`: each gets a template of its own, and so does an
/// interpreter replaced in place at the same path by a build of the same version.
#[test]
fn interpreters_and_site_packages_get_templates_of_their_own() {
    let (ws, flags) = setup();
    // A second interpreter: a virtualenv's own copy of the binary (uv builds on its base,
    // so its venvs' `bin/python` points elsewhere than the base's).
    let copied = ws.path("copied");
    let out = Command::new(python())
        .args(["-m", "venv", "--copies", "--without-pip"])
        .arg(&copied)
        .output()
        .unwrap();
    assert_success(&out);
    let copied_python = copied.join("bin/python");
    let with = |extra: &[&str]| -> Vec<String> {
        let mut all = flags.clone();
        all.extend(extra.iter().map(|s| s.to_string()));
        all
    };
    let site = "--system-site-packages";
    let copied_arg = copied_python.display().to_string();
    let cases: [(&str, Vec<String>, &Path, bool); 3] = [
        ("base", with(&[]), python(), false),
        ("base-site", with(&[site]), python(), true),
        ("copied", with(&["--python", &copied_arg]), &copied_python, false),
    ];
    let spec = json!({"pip": ["tinypkg==1.0"]});
    let mut envs = Vec::new();
    for (name, flags, interpreter, site_packages) in &cases {
        let built = build(&ws, flags, &spec, &format!("{name}.json"));
        let env = PathBuf::from(built["venv"]["path"].as_str().unwrap());
        let by_hand = ws.path(&format!("by-hand/{name}"));
        uv_venv(&ws, interpreter, *site_packages, &by_hand);
        let env_tree = tree(&env);
        for (rel, node) in sealed(tree(&by_hand)) {
            assert_eq!(env_tree.get(&rel), Some(&node), "{name}: {rel}");
        }
        envs.push(built);
    }
    assert_ne!(
        tree(&ws.path("by-hand/base"))["bin/python"],
        tree(&ws.path("by-hand/copied"))["bin/python"],
        "the interpreters' venvs differ"
    );
    assert_eq!(templates(&ws).len(), 3, "{:?}", templates(&ws));
    let probe = "import importlib.util as u; print(u.find_spec('pip') is not None)";
    assert_eq!(in_env(envs[0]["python"].as_str().unwrap(), probe), "False");
    assert_eq!(in_env(envs[1]["python"].as_str().unwrap(), probe), "True");

    // Upgraded in place: the same path and version, another file.
    let fresh = copied.join("bin/python.new");
    std::fs::copy(copied.join("bin/python3.11"), &fresh).unwrap();
    std::fs::rename(&fresh, &copied_python).unwrap();
    let upgraded = build(
        &ws,
        &cases[2].1,
        &json!({"pip": ["tinypkg==2.0"]}),
        "upgraded.json",
    );
    assert_eq!(templates(&ws).len(), 4, "{:?}", templates(&ws));
    assert_eq!(
        in_env(
            upgraded["python"].as_str().unwrap(),
            "import tinypkg; print(tinypkg.VERSION)"
        ),
        "2.0"
    );
}

/// 8 distinct envs asked for at once on a fresh store, by 8 processes and then by 8
/// requests to one daemon (threads of one process): every build succeeds, and `uv venv`
/// runs once, for the one template they all copy.
#[test]
fn concurrent_first_builds_make_one_template() {
    let (ws, flags) = setup();
    let (counting, calls) = crate::common::counting_uv(&ws);
    let children: Vec<_> = (0..8)
        .map(|i| {
            let spec = ws.spec(
                &format!("env{i}.json"),
                &json!({"pip": ["tinypkg==1.0", format!("otherpkg!=0.0.{i}")]}),
            );
            ws.renv()
                .args(["build", "--json", "--uv"])
                .arg(&counting)
                .args(&flags)
                .arg(&spec)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_success(&out);
        let built: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            in_env(
                built["python"].as_str().unwrap(),
                "import otherpkg; print(otherpkg.NAME)"
            ),
            "other"
        );
    }
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(log.lines().filter(|l| l.starts_with("venv ")).count(), 1, "{log}");
    assert_eq!(crate::common::builds(&log), 8, "{log}");
    assert_eq!(templates(&ws).len(), 1);
    assert_eq!(list_dir(&ws.store_v1("envs")).len(), 8);
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());

    let ws = crate::daemon::setup();
    let (counting, calls) = crate::common::counting_uv(&ws);
    let daemon = Daemon::start(&ws, &["--uv", counting.to_str().unwrap()]);
    let answers: Vec<Value> = std::thread::scope(|s| {
        let asked: Vec<_> = (0..8)
            .map(|i| {
                let spec = json!({"runtime_env": {"pip": [format!("tinypkg!=0.0.{i}")]}});
                let daemon = &daemon;
                s.spawn(move || daemon.post("/v1/envs", &spec).unwrap())
            })
            .collect();
        asked.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for answer in &answers {
        assert_eq!(
            in_env(
                answer["python"].as_str().unwrap(),
                "import tinypkg; print(tinypkg.VERSION)"
            ),
            "1.0"
        );
    }
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(log.lines().filter(|l| l.starts_with("venv ")).count(), 1, "{log}");
    assert_eq!(crate::common::builds(&log), 8, "{log}");
    assert_eq!(templates(&ws).len(), 1);
}

/// With a build user, a template made by one caller's build serves another's: the copy
/// is the build user's, as `uv venv` run as it would have left it (its installs write
/// into it), while the template stays the store owner's and read-only, out of reach of
/// every other user (an attack as a caller and as the build user changes nothing). One
/// changed behind renv's back anyway (here by root) is refused: the build runs `uv venv`
/// instead, and the next build makes the template again.
#[test]
fn a_build_user_copies_a_template_that_no_one_else_can_change() {
    const BUILDER: u32 = 1094;
    let ws = crate::daemon::setup();
    wheelhouse(&ws.path("wheels"), &[("otherpkg", "0.1", "NAME = 'other'\n")]);
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A uv that says who runs it, and lists the venv as each install first sees it.
    let (calls, listings) = (ws.write("uv-calls", ""), ws.write("listings", ""));
    for file in [&calls, &listings] {
        crate::common::set_mode(file, 0o666);
    }
    let wrapper = ws.write(
        "uv-wrapper",
        format!(
            "#!/bin/sh\necho \"$(id -u) $1 $2 $3\" >> {calls}\n\
             if [ \"$3\" = --offline ]; then\n\
             py=; prev=; for a; do [ \"$prev\" = --python ] && py=$a; prev=$a; done\n\
             (echo '== build'; find \"${{py%/bin/python}}\" -mindepth 1 -printf '%U %m %y %P %l\\n' | sort) >> {listings}\n\
             fi\nexec {uv} \"$@\"\n",
            calls = calls.display(),
            listings = listings.display(),
            uv = crate::common::uv().display()
        ),
    );
    crate::common::set_mode(&wrapper, 0o755);
    let python = crate::common::shared_python();
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
            python.to_str().unwrap(),
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
    let venv_runs = || -> Vec<String> {
        let log = std::fs::read_to_string(&calls).unwrap();
        log.lines()
            .filter(|l| l.split(' ').nth(1) == Some("venv"))
            .map(str::to_string)
            .collect()
    };
    let tiny = "import tinypkg; print(tinypkg.VERSION)";
    let other = "import otherpkg; print(otherpkg.NAME)";
    assert_eq!(
        python_as(&daemon, 1000, &json!({"pip": ["tinypkg==1.0"]}), tiny).trim(),
        "1.0"
    );
    assert_eq!(
        python_as(&daemon, 1001, &json!({"pip": ["otherpkg"]}), other).trim(),
        "other"
    );
    assert_eq!(venv_runs(), [format!("{BUILDER} venv --relocatable --no-config")]);
    let log = std::fs::read_to_string(&calls).unwrap();
    assert!(
        log.lines()
            .filter(|l| l.contains(" pip "))
            .all(|l| l.starts_with(&format!("{BUILDER} "))),
        "{log}"
    );

    // The second caller's venv, as its install saw it: uv venv's modes, the build user's.
    let by_hand = ws.path("by-hand");
    uv_venv(&ws, python, false, &by_hand);
    let mut expected: Vec<String> = tree(&by_hand)
        .into_iter()
        .map(|(rel, node)| {
            let (kind, mode, target) = match node.kind {
                'l' => ('l', 0o777, String::from_utf8(node.data).unwrap()),
                kind => (kind, node.mode, String::new()),
            };
            format!("{BUILDER} {mode:o} {kind} {rel} {target}")
        })
        .collect();
    expected.sort();
    let listings_text = std::fs::read_to_string(&listings).unwrap();
    let seen: Vec<Vec<&str>> = listings_text
        .split("== build\n")
        .skip(1)
        .map(|build| build.lines().collect())
        .collect();
    assert_eq!(seen.len(), 2, "{listings_text}");
    for seen in seen {
        assert_eq!(seen, expected);
    }

    // The template: the store owner's, read-only, and no one else can even look at it.
    let all = templates(&ws);
    assert_eq!(all.len(), 1);
    let template = &all[0];
    let before = tree(template);
    assert!(before.contains_key("entry/pyvenv.cfg"), "{:?}", before.keys());
    for (rel, node) in &before {
        assert_eq!(node.uid, 0, "{rel}");
        assert!(
            node.kind == 'l' || node.mode & 0o222 == 0,
            "{rel}: {:o}",
            node.mode
        );
    }
    let cfg = template.join("entry/pyvenv.cfg");
    let activate = template.join("entry/bin/activate");
    for uid in [1000, BUILDER] {
        for attack in [
            format!("ln -sf /etc/passwd {}", cfg.display()),
            format!("chmod u+w {}", cfg.display()),
            format!("rm -f {}", activate.display()),
            format!("ls {}", template.display()),
        ] {
            let out = Command::new("setpriv")
                .args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                ])
                .args(["sh", "-c", &attack])
                .output()
                .unwrap();
            assert!(!out.status.success(), "as uid {uid}: {attack}");
        }
    }
    assert_eq!(tree(template), before);

    // Changed anyway (by root, who can): refused, never copied.
    let swap = |path: &Path, to: &dyn Fn(&Path)| {
        let parent = path.parent().unwrap();
        crate::common::set_mode(parent, 0o755);
        to(path);
        crate::common::set_mode(parent, 0o555);
    };
    type Change<'a> = (&'a str, &'a dyn Fn(&Path));
    let changes: [Change; 2] = [
        ("made writable", &|path| crate::common::set_mode(path, 0o644)),
        ("swapped for a symlink", &|path| {
            std::fs::remove_file(path).unwrap();
            std::os::unix::fs::symlink("/etc/shadow", path).unwrap();
        }),
    ];
    for (n, (change, to)) in (1..).zip(changes) {
        swap(&cfg, to);
        let runs = venv_runs().len();
        let spec = json!({"pip": ["tinypkg==1.0", format!("otherpkg!=0.0.{n}")]});
        assert_eq!(python_as(&daemon, 1000, &spec, tiny).trim(), "1.0", "{change}");
        assert_eq!(venv_runs().len(), runs + 1, "{change}: uv venv ran for the env");
        let env_log = std::fs::read_dir(ws.store_v1("logs"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
            .find(|log| log.contains(&format!("otherpkg!=0.0.{n}")))
            .unwrap();
        assert!(env_log.contains("venv template not used"), "{change}: {env_log}");
        assert!(templates(&ws).is_empty(), "{change}: the template was discarded");
        // The next build makes it again, sound.
        let spec = json!({"pip": ["otherpkg", format!("tinypkg!=0.0.{n}")]});
        assert_eq!(python_as(&daemon, 1001, &spec, other).trim(), "other", "{change}");
        assert_eq!(venv_runs().len(), runs + 2, "{change}");
        assert_eq!(templates(&ws), std::slice::from_ref(template));
        assert_eq!(tree(template), before, "{change}");
    }
}
