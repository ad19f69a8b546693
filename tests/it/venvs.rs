//! Virtualenvs built by the real uv (and pip) from wheels the tests make, checked from
//! inside the env by running its python.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{Value, json};

use crate::common::{Workspace, assert_success, list_dir, python, wheelhouse};

const TINY_1: (&str, &str, &str) = ("tinypkg", "1.0", "VERSION = '1.0'\n");
const TINY_2: (&str, &str, &str) = ("tinypkg", "2.0", "VERSION = '2.0'\n");
const OTHER: (&str, &str, &str) = ("otherpkg", "0.1", "NAME = 'other'\n");

/// A workspace with a local wheelhouse, and the flags that make it the only index.
fn setup() -> (Workspace, Vec<String>) {
    let ws = Workspace::new();
    wheelhouse(&ws.path("wheels"), &[TINY_1, TINY_2, OTHER]);
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

/// Runs `python -c CODE` with the env's interpreter and returns stdout.
fn in_env(python: &str, code: &str) -> String {
    let out = std::process::Command::new(python)
        .args(["-c", code])
        .output()
        .unwrap();
    assert_success(&out);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn run(ws: &Workspace, flags: &[String], spec: &Path, extra: &[&str], cmd: &[&str]) -> Output {
    ws.renv()
        .arg("run")
        .args(flags)
        .args(extra)
        .arg(spec)
        .arg("--")
        .args(cmd)
        .output()
        .unwrap()
}

#[test]
fn a_package_from_the_operators_wheelhouse_imports_at_its_version() {
    let (ws, flags) = setup();
    let built = build(&ws, &flags, &json!({"pip": ["tinypkg==1.0"]}), "one.json");
    let python = built["python"].as_str().unwrap();
    assert!(
        python.starts_with(ws.store_v1("envs").to_str().unwrap()),
        "{python}"
    );
    assert_eq!(built["venv"]["created"], true);
    assert_eq!(in_env(python, "import tinypkg; print(tinypkg.VERSION)"), "1.0");
    assert_eq!(built["env"]["VIRTUAL_ENV"], built["venv"]["path"]);
    assert_eq!(
        built["env"]["PATH"],
        format!("{}/bin:${{PATH}}", built["venv"]["path"].as_str().unwrap())
    );
    // Workers' bytecode goes to their user's own cache, never into the read-only entry,
    // even where the node says not to write bytecode (that is about source trees).
    let pycache = built["env"]["PYTHONPYCACHEPREFIX"].as_str().unwrap();
    assert_eq!(
        Path::new(pycache),
        ws.store_v1("pycache/0").canonicalize().unwrap()
    );
    assert_eq!(crate::common::mode_of(Path::new(pycache)), 0o700);
    assert_eq!(built["env"]["PYTHONDONTWRITEBYTECODE"], "");
    let spec = ws.spec("one-run.json", &json!({"pip": ["tinypkg==1.0"]}));
    let out = ws
        .renv()
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg("run")
        .args(&flags)
        .arg(&spec)
        .args(["--", "python", "-c", "import tinypkg"])
        .output()
        .unwrap();
    assert_success(&out);
    let site = in_env(
        python,
        "import tinypkg, os; print(os.path.dirname(tinypkg.__file__))",
    );
    assert!(list_dir(&Path::new(&site).join("__pycache__")).is_empty());
    let env_path = built["venv"]["path"].as_str().unwrap();
    let env_bytecode = Path::new(pycache).join(env_path.trim_start_matches('/'));
    // The store's modules are compiled by what their source holds (see the bytecode test
    // below), not by path.
    let compiled = crate::common::tree_listing(&Path::new(pycache).join(".renv-by-content"));
    assert!(compiled.iter().any(|p| p.ends_with(".pyc")), "{compiled:?}");
    assert_eq!(crate::common::mode_of(Path::new(&site)), 0o555);
    // Every file is sealed, those hardlinked from the installer's cache included (an
    // append to one would change every env sharing the inode, and the cache).
    let mut writable = Vec::new();
    let mut shared = 0;
    let venv = Path::new(built["venv"]["path"].as_str().unwrap());
    let files = crate::common::tree_listing(venv)
        .into_iter()
        .filter(|rel| !rel.ends_with('/') && !rel.contains(" -> "));
    for rel in files {
        use std::os::unix::fs::MetadataExt;
        let path = venv.join(&rel);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_file() {
            if meta.mode() & 0o7222 != 0 {
                writable.push((path.clone(), meta.mode() & 0o7777));
            }
            shared += usize::from(meta.nlink() > 1);
        }
    }
    assert!(writable.is_empty(), "{writable:?}");
    assert!(shared > 0, "the check covered files shared with the uv cache");

    let again = build(&ws, &flags, &json!({"pip": ["tinypkg==1.0"]}), "one-again.json");
    assert_eq!(again["venv"]["created"], false);
    assert_eq!(again["python"], built["python"]);

    let other = build(&ws, &flags, &json!({"pip": ["tinypkg==2.0"]}), "two.json");
    assert_ne!(other["venv"]["key"], built["venv"]["key"]);
    assert_eq!(
        in_env(
            other["python"].as_str().unwrap(),
            "import tinypkg; print(tinypkg.VERSION)"
        ),
        "2.0"
    );
    assert!(ws.leftovers().is_empty());

    // An env's bytecode (by path) goes with it; the node's cache stays, and so does
    // bytecode by content that was loaded recently.
    let pruned = ws
        .renv()
        .args(["prune", "--max-size", "0", "--min-age", "0s"])
        .output()
        .unwrap();
    assert_success(&pruned);
    assert!(list_dir(&ws.store_v1("envs")).is_empty());
    assert!(!env_bytecode.exists());
    assert!(Path::new(pycache).is_dir());
    assert_eq!(
        crate::common::tree_listing(&Path::new(pycache).join(".renv-by-content")),
        compiled
    );
}

/// On a disk, a commit fdatasyncs each file of the installer's cache it hardlinks once:
/// the inodes it synced are recorded (`cache/synced-inodes`), a later env linking the same
/// inodes syncs none of them, and an inode written since is synced (and recorded) again.
#[test]
fn cache_files_are_synced_once_and_again_once_changed() {
    use std::os::unix::fs::MetadataExt;
    let ws = Workspace::on_disk();
    wheelhouse(&ws.path("wheels"), &[TINY_1]);
    let flags: Vec<String> = ["--no-index", "--find-links"]
        .map(String::from)
        .into_iter()
        .chain([ws.path("wheels").display().to_string()])
        .collect();
    let synced = ws.store_v1("cache/synced-inodes");
    let records = || std::fs::metadata(&synced).map_or(0, |m| m.len() / 16);
    let shared = |env: &Value| -> Vec<PathBuf> {
        let venv = Path::new(env["venv"]["path"].as_str().unwrap());
        crate::common::tree_listing(venv)
            .into_iter()
            .filter(|rel| !rel.ends_with('/') && !rel.contains(" -> "))
            .map(|rel| venv.join(rel))
            .filter(|path| {
                let meta = std::fs::symlink_metadata(path).unwrap();
                meta.is_file() && meta.nlink() > 1
            })
            .collect()
    };

    let first = build(&ws, &flags, &json!({"pip": ["tinypkg==1.0"]}), "first.json");
    let linked = shared(&first);
    assert!(
        linked.len() >= 2,
        "the wheel's files are hardlinked from the cache: {linked:?}"
    );
    assert_eq!(
        records(),
        linked.len() as u64,
        "each shared inode synced and recorded once"
    );

    let second = build(
        &ws,
        &flags,
        &json!({"pip": ["tinypkg==1.0,!=0.0.1"]}),
        "second.json",
    );
    assert_ne!(second["venv"]["key"], first["venv"]["key"]);
    assert_eq!(shared(&second).len(), linked.len());
    assert_eq!(records(), linked.len() as u64, "nothing synced again");

    // The store's owner changes one cache inode (through the first env's link): it is
    // synced again, and only it.
    let changed = &linked[0];
    let mode = crate::common::mode_of(changed);
    crate::common::set_mode(changed, 0o644);
    std::fs::OpenOptions::new()
        .append(true)
        .open(changed)
        .unwrap()
        .write_all(b"\n# changed\n")
        .unwrap();
    crate::common::set_mode(changed, mode);
    let third = build(
        &ws,
        &flags,
        &json!({"pip": ["tinypkg==1.0,!=0.0.2"]}),
        "third.json",
    );
    assert_eq!(shared(&third).len(), linked.len());
    assert_eq!(records(), linked.len() as u64 + 1);

    // Another user can neither forge a record nor remove the file to plant one of its own.
    for uid in ["1000", "65534"] {
        let out = std::process::Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ])
            .args([
                "sh",
                "-c",
                "printf 0123456789abcdef >> \"$1\" || rm -f \"$1\"",
                "sh",
            ])
            .arg(&synced)
            .output()
            .unwrap();
        assert!(!out.status.success(), "uid {uid} changed {}", synced.display());
        assert_eq!(records(), linked.len() as u64 + 1);
    }
    // A symlink in its place (whoever planted it) is never followed: the build neither
    // writes through it nor trusts what it names, and syncs what it must.
    let elsewhere = ws.write("elsewhere", b"");
    std::fs::remove_file(&synced).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &synced).unwrap();
    let fourth = build(
        &ws,
        &flags,
        &json!({"pip": ["tinypkg==1.0,!=0.0.3"]}),
        "fourth.json",
    );
    assert_eq!(shared(&fourth).len(), linked.len());
    assert_eq!(std::fs::read(&elsewhere).unwrap(), b"");
    assert!(
        std::fs::symlink_metadata(&synced)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    for env in [&second, &third] {
        let python = env["python"].as_str().unwrap();
        assert_eq!(in_env(python, "import tinypkg; print(tinypkg.VERSION)"), "1.0");
    }
}

/// A new env's workers load the bytecode an older env's workers compiled, when their
/// sources are the same bytes: keyed by content, not by path. The code is this env's own
/// (tracebacks name its files), a changed source is compiled again, and bytecode no one
/// loaded for longer than prune keeps logs goes (without following a planted symlink).
#[test]
fn bytecode_is_shared_by_source_content_across_envs() {
    let (ws, flags) = setup();
    wheelhouse(
        &ws.path("wheels"),
        &[("tracepkg", "1.0", "def boom():\n    raise ValueError('boom')\n")],
    );
    let probe = "import sys, traceback, tracepkg\n\
                 print(type(tracepkg.__spec__.loader).__name__)\n\
                 try:\n    tracepkg.boom()\n\
                 except ValueError as e:\n    print(traceback.extract_tb(e.__traceback__)[-1].filename)\n";
    let run_in = |spec: &Value, name: &str| -> (String, String) {
        let path = ws.spec(name, spec);
        let out = run(&ws, &flags, &path, &[], &["python", "-c", probe]);
        assert_success(&out);
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines().map(str::to_string);
        (lines.next().unwrap(), lines.next().unwrap())
    };
    let cache = ws.store_v1("pycache/0/.renv-by-content");
    let pycs = || -> Vec<String> {
        crate::common::tree_listing(&cache)
            .into_iter()
            .filter(|p| p.ends_with(".pyc"))
            .collect()
    };
    let first = json!({"pip": ["tracepkg==1.0"]});
    let (loader, file) = run_in(&first, "first.json");
    assert_eq!(loader, "ContentKeyedLoader");
    let envs = ws.store_v1("envs").canonicalize().unwrap();
    assert!(file.starts_with(envs.to_str().unwrap()), "{file}");
    let compiled = pycs();
    assert!(!compiled.is_empty());

    // Another env (another key) with the same wheel: nothing compiled, its own paths.
    let second = json!({"pip": ["tracepkg==1.0", "otherpkg==0.1"]});
    let (loader, second_file) = run_in(&second, "second.json");
    assert_eq!(loader, "ContentKeyedLoader");
    assert_ne!(second_file, file, "the traceback names the second env's file");
    assert!(Path::new(&second_file).exists(), "{second_file}");
    assert_eq!(pycs(), compiled, "found by content, not compiled again");

    // Other bytes are compiled on their own.
    wheelhouse(
        &ws.path("wheels"),
        &[("tracepkg", "2.0", "def boom():\n    raise ValueError('two')\n")],
    );
    run_in(&json!({"pip": ["tracepkg==2.0"]}), "third.json");
    assert_eq!(pycs().len(), compiled.len() + 1);

    // Unread for longer than prune keeps logs: removed; a planted symlink is removed
    // itself, its target left alone.
    let outside = ws.write("outside", "not bytecode\n");
    let fanout = cache.join(compiled[0].split('/').next().unwrap());
    std::os::unix::fs::symlink(&outside, fanout.join("planted.pyc")).unwrap();
    let files = crate::common::tree_listing(&cache)
        .into_iter()
        .filter(|p| !p.ends_with('/'));
    for pyc in files.map(|p| p.split(" -> ").next().unwrap().to_string()) {
        let status = std::process::Command::new("touch")
            .args(["-h", "-a", "-d", "30 days ago"])
            .arg(cache.join(&pyc))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let pruned = ws
        .renv()
        .args(["prune", "--json", "--max-size", "0", "--min-age", "0s"])
        .output()
        .unwrap();
    assert_success(&pruned);
    let report: Value = serde_json::from_slice(&pruned.stdout).unwrap();
    assert_eq!(report["bytecode_removed"], compiled.len() + 2, "{report}");
    assert!(pycs().is_empty());
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "not bytecode\n");
}

/// CPython 3.14 has no `importlib._bootstrap_external._RAW_MAGIC_NUMBER` (its hash key is
/// `_imp.pyc_magic_number_token`): the hook must not need it, or every import of a store
/// module fails there. A cached file whose payload is no code object is compiled over, not
/// an import error.
#[test]
fn content_keyed_bytecode_needs_no_interpreter_private_name_and_survives_a_bad_payload() {
    let (ws, flags) = setup();
    wheelhouse(
        &ws.path("wheels"),
        &[("tracepkg", "1.0", "def boom():\n    raise ValueError('boom')\n")],
    );
    let path = ws.spec("env.json", &json!({"pip": ["tracepkg==1.0"]}));
    // As on 3.14: the name is not there.
    let probe = "from importlib import _bootstrap_external as e\n\
                 del e._RAW_MAGIC_NUMBER\n\
                 import tracepkg\n\
                 print(type(tracepkg.__spec__.loader).__name__)\n";
    let out = run(&ws, &flags, &path, &[], &["python", "-c", probe]);
    assert_success(&out);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "ContentKeyedLoader"
    );
    let cache = ws.store_v1("pycache/0/.renv-by-content");
    let pycs: Vec<String> = crate::common::tree_listing(&cache)
        .into_iter()
        .filter(|p| p.ends_with(".pyc"))
        .collect();
    assert_eq!(pycs.len(), 1, "{pycs:?}");
    // A right header over a payload that is no code object (an int).
    let pyc = cache.join(&pycs[0]);
    let mut bytes = std::fs::read(&pyc).unwrap()[..16].to_vec();
    bytes.extend_from_slice(&[0xe9, 42, 0, 0, 0]);
    std::fs::write(&pyc, bytes).unwrap();
    let out = run(
        &ws,
        &flags,
        &path,
        &[],
        &["python", "-c", "import tracepkg; print(tracepkg.boom.__name__)"],
    );
    assert_success(&out);
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "boom");
}

#[test]
fn spellings_share_an_env_and_real_differences_do_not() {
    let (ws, flags) = setup();
    let key = |spec: Value, name: &str, extra: &[String]| -> String {
        let flags: Vec<String> = flags.iter().chain(extra).cloned().collect();
        build(&ws, &flags, &spec, name)["venv"]["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let base = key(json!({"pip": ["tinypkg==1.0", "otherpkg"]}), "a.json", &[]);
    assert_eq!(
        key(
            json!({"pip": {"packages": ["TinyPkg == 1.0", "otherpkg", "tinypkg==1.0"]}}),
            "b.json",
            &[]
        ),
        base
    );
    assert_eq!(
        key(json!({"uv": ["tinypkg==1.0", "otherpkg"]}), "c.json", &[]),
        base
    );
    assert_eq!(
        key(
            json!({"uv": {"packages": ["tinypkg==1.0", "otherpkg"], "uv_check": false}}),
            "d.json",
            &[]
        ),
        base
    );

    assert_ne!(
        key(json!({"pip": ["otherpkg", "tinypkg==1.0"]}), "order.json", &[]),
        base
    );
    assert_ne!(
        key(
            json!({"pip": {"packages": ["tinypkg==1.0", "otherpkg"], "pip_check": true}}),
            "check.json",
            &[]
        ),
        base
    );
    let extra_links = vec![
        "--find-links".to_string(),
        ws.path("more-wheels").display().to_string(),
    ];
    std::fs::create_dir_all(ws.path("more-wheels")).unwrap();
    assert_ne!(
        key(
            json!({"pip": ["tinypkg==1.0", "otherpkg"]}),
            "index.json",
            &extra_links
        ),
        base
    );
    assert_ne!(
        key(
            json!({"pip": ["tinypkg==1.0", "otherpkg"]}),
            "ssp.json",
            &["--system-site-packages".into()]
        ),
        base
    );

    // A shim in front of the same interpreter is the same interpreter.
    let shim = ws.write(
        "shim/python3",
        format!("#!/bin/sh\nexec {} \"$@\"\n", python().display()),
    );
    crate::common::set_mode(&shim, 0o755);
    let via_shim = vec!["--python".to_string(), shim.display().to_string()];
    assert_eq!(
        key(
            json!({"pip": ["tinypkg==1.0", "otherpkg"]}),
            "shim.json",
            &via_shim
        ),
        base
    );

    // Another interpreter is another env.
    if let Some(other) = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists() && std::fs::canonicalize(p).ok().as_deref() != Some(python()))
    {
        let other = vec!["--python".to_string(), other.display().to_string()];
        assert_ne!(
            key(json!({"pip": ["tinypkg==1.0", "otherpkg"]}), "py.json", &other),
            base
        );
    }
}

#[test]
fn base_site_packages_are_hidden_unless_the_node_allows_them() {
    let (ws, flags) = setup();
    // `pip` is installed in the base interpreter, never in a uv-built env.
    assert_eq!(
        in_env(python().to_str().unwrap(), "import pip; print('ok')"),
        "ok"
    );
    let spec = json!({"pip": ["tinypkg==1.0"]});
    let isolated = build(&ws, &flags, &spec, "iso.json");
    let probe = "import importlib.util as u; print(u.find_spec('pip') is not None)";
    assert_eq!(in_env(isolated["python"].as_str().unwrap(), probe), "False");
    let mut open_flags = flags.clone();
    open_flags.push("--system-site-packages".into());
    let shared = build(&ws, &open_flags, &spec, "shared.json");
    assert_eq!(in_env(shared["python"].as_str().unwrap(), probe), "True");
}

/// A node that runs Ray from a virtualenv names that venv's python: envs then see the
/// venv's packages behind their own (a requested version wins), and only when the node
/// allows site-packages at all.
#[test]
fn a_virtualenvs_python_lends_its_packages_behind_the_envs_own() {
    let (ws, flags) = setup();
    let parent = ws.path("parent-venv");
    let out = std::process::Command::new(python())
        .args(["-m", "venv", "--without-pip"])
        .arg(&parent)
        .output()
        .unwrap();
    assert_success(&out);
    let site = std::fs::read_dir(parent.join("lib"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("site-packages");
    std::fs::write(site.join("parent_only.py"), "WHERE = 'parent'\n").unwrap();
    std::fs::create_dir(site.join("tinypkg")).unwrap();
    std::fs::write(site.join("tinypkg/__init__.py"), "VERSION = 'parent'\n").unwrap();

    let mut node = flags.clone();
    node.extend([
        "--python".to_string(),
        parent.join("bin/python").display().to_string(),
    ]);
    let spec = json!({"pip": ["tinypkg==2.0"]});
    let probe = "import importlib.util as u; print(u.find_spec('parent_only') is not None)";
    let isolated = build(&ws, &node, &spec, "iso.json");
    assert_eq!(in_env(isolated["python"].as_str().unwrap(), probe), "False");

    node.push("--system-site-packages".into());
    let shared = build(&ws, &node, &spec, "shared.json");
    let env_python = shared["python"].as_str().unwrap();
    assert_ne!(shared["venv"]["key"], isolated["venv"]["key"]);
    assert_eq!(
        in_env(
            env_python,
            "import parent_only, tinypkg; print(parent_only.WHERE, tinypkg.VERSION)"
        ),
        "parent 2.0"
    );
    // The base interpreter's own packages stay visible after the parent's.
    assert_eq!(in_env(env_python, "import pip; print('ok')"), "ok");

    // The same base interpreter without the venv is a different env.
    let mut base_node = flags.clone();
    base_node.extend([
        "--system-site-packages".to_string(),
        "--python".to_string(),
        python().display().to_string(),
    ]);
    let base = build(&ws, &base_node, &spec, "base.json");
    assert_ne!(base["venv"]["key"], shared["venv"]["key"]);
    assert_eq!(in_env(base["python"].as_str().unwrap(), probe), "False");
}

#[test]
fn install_options_need_the_operators_permission() {
    let (ws, flags) = setup();
    let spec = ws.spec(
        "opts.json",
        &json!({"pip": {"packages": ["tinypkg"], "pip_install_options": ["--no-deps"]}}),
    );
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (code, stderr) = ws.build_fails(&spec, &extra);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("pip.pip_install_options[0]: \"--no-deps\" is not allowed on this node"),
        "{stderr}"
    );
    let mut allowed = extra.clone();
    allowed.push("--allow-install-option=--no-deps");
    let built = ws.build_with(&spec, &allowed);
    assert_eq!(
        in_env(
            built["python"].as_str().unwrap(),
            "import tinypkg; print(tinypkg.VERSION)"
        ),
        "2.0"
    );
}

#[test]
fn a_failed_install_reports_why_keeps_the_log_and_commits_nothing() {
    let (ws, flags) = setup();
    let spec = ws.spec("bad.json", &json!({"pip": ["no-such-package==1.0"]}));
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (code, stderr) = ws.build_fails(&spec, &extra);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("uv pip install failed (exit status"), "{stderr}");
    assert!(
        stderr.contains("no-such-package"),
        "the installer's own words are quoted: {stderr}"
    );
    let log = stderr.split("full log: ").nth(1).unwrap().lines().next().unwrap();
    assert!(std::fs::read_to_string(log).unwrap().contains("no-such-package"));
    assert!(list_dir(&ws.store_v1("envs")).is_empty());
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
    // The request itself is fine once the package exists: nothing was cached as failed.
    wheelhouse(&ws.path("wheels"), &[("no-such-package", "1.0", "")]);
    ws.build_with(&spec, &extra);
}

/// A fake installer that starts a grandchild and hangs: at the deadline the whole
/// process group dies and no staging is left.
#[test]
fn the_deadline_kills_the_installers_whole_process_group() {
    let (ws, flags) = setup();
    let pid_file = ws.path("grandchild.pid");
    let fake = ws.write(
        "fake-uv",
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'uv 0.0.0-fake'; exit 0; fi\nsleep 300 &\necho $! > {}\nwait\n",
            pid_file.display()
        ),
    );
    crate::common::set_mode(&fake, 0o755);
    let spec = ws.spec(
        "slow.json",
        &json!({"pip": ["tinypkg"], "config": {"setup_timeout_seconds": 2}}),
    );
    let mut extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let fake_arg = fake.display().to_string();
    extra.extend(["--uv", &fake_arg]);
    let started = std::time::Instant::now();
    let (code, stderr) = ws.build_fails(&spec, &extra);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("uv venv timed out after 2s"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Killed means gone or a zombie awaiting its reaper (state `Z`), never still running.
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while running() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !running(),
        "the installer's grandchild {pid} survived the deadline"
    );
    assert!(ws.leftovers().is_empty(), "{:?}", ws.leftovers());
    assert!(list_dir(&ws.store_v1("envs")).is_empty());
}

/// 20 processes ask for the same new env at once: the installer runs once.
#[test]
fn twenty_concurrent_builds_install_once() {
    let (ws, flags) = setup();
    let (counting, calls) = crate::common::counting_uv(&ws);
    let spec = ws.spec("env.json", &json!({"pip": ["tinypkg==1.0", "otherpkg"]}));
    let children: Vec<_> = (0..20)
        .map(|_| {
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
    let pythons: Vec<Value> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert_success(&out);
            serde_json::from_slice::<Value>(&out.stdout).unwrap()["python"].clone()
        })
        .collect();
    assert!(pythons.iter().all(|p| *p == pythons[0]));
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(log.lines().filter(|l| l.starts_with("venv")).count(), 1, "{log}");
    assert_eq!(
        log.lines().filter(|l| l.starts_with("pip install")).count(),
        1,
        "{log}"
    );
    assert_eq!(list_dir(&ws.store_v1("envs")).len(), 1);
}

#[test]
fn the_pip_installer_builds_the_same_shape() {
    let (ws, mut flags) = setup();
    flags.extend(["--installer".to_string(), "pip".to_string()]);
    let built = build(&ws, &flags, &json!({"pip": ["tinypkg==2.0"]}), "pip.json");
    let python = built["python"].as_str().unwrap();
    assert_eq!(in_env(python, "import tinypkg; print(tinypkg.VERSION)"), "2.0");
    // Scripts were pointed at the published location, not the staging dir.
    let venv = Path::new(built["venv"]["path"].as_str().unwrap());
    let pip = std::fs::read_to_string(venv.join("bin/pip")).unwrap();
    assert!(
        pip.starts_with(&format!("#!{}", venv.display())),
        "{}",
        pip.lines().next().unwrap()
    );
    let out = std::process::Command::new(venv.join("bin/pip"))
        .arg("--version")
        .output()
        .unwrap();
    assert_success(&out);
    // The installer is part of the key.
    let (ws2, uv_flags) = (ws, flags[..3].to_vec());
    let with_uv = build(&ws2, &uv_flags, &json!({"pip": ["tinypkg==2.0"]}), "uv.json");
    assert_ne!(with_uv["venv"]["key"], built["venv"]["key"]);
}

#[test]
fn renv_run_runs_in_the_env_and_exits_with_the_commands_status() {
    let (ws, flags) = setup();
    ws.write("proj/app.py", "import tinypkg\nVALUE = tinypkg.VERSION\n");
    let spec = ws.spec(
        "env.json",
        &json!({"working_dir": "proj", "pip": ["tinypkg==1.0"], "env_vars": {"GREETING": "hi ${USER_NAME}"}}),
    );
    let code = "import app, os, sys; print(app.VALUE, os.getcwd(), sys.executable, os.environ['GREETING'], \
                os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ.get('CUDA_DEVICE_ORDER'))";
    let out = ws
        .renv()
        .env("USER_NAME", "ray")
        .env("CUDA_VISIBLE_DEVICES", "7")
        .arg("run")
        .args(&flags)
        .arg(&spec)
        .args(["--", "python", "-c", code])
        .output()
        .unwrap();
    assert_success(&out);
    let line = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[0], "1.0");
    assert!(
        fields[1].contains("/store-v1/pkgs/"),
        "cwd is the working_dir: {line}"
    );
    assert!(
        fields[2].contains("/store-v1/envs/"),
        "`python` is the venv's: {line}"
    );
    assert_eq!(&fields[3..5], ["hi", "ray"]);
    assert_eq!(
        &fields[5..],
        ["7", "None"],
        "without --gpus CUDA_VISIBLE_DEVICES is inherited"
    );

    let out = run(&ws, &flags, &spec, &["--gpus", "3,0"], &["python", "-c", code]);
    assert_success(&out);
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.trim().ends_with("0,3 PCI_BUS_ID"), "{line}");

    let out = run(
        &ws,
        &flags,
        &spec,
        &[],
        &["python", "-c", "import sys; sys.exit(3)"],
    );
    assert_eq!(out.status.code(), Some(3));
    let out = run(
        &ws,
        &flags,
        &spec,
        &[],
        &[
            "python",
            "-c",
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        ],
    );
    assert_eq!(out.status.code(), Some(128 + 9));
    let out = run(&ws, &flags, &spec, &[], &["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-command: command not found"));
}

#[test]
fn renv_run_forwards_sigterm_and_holds_its_leases() {
    use std::io::BufRead;
    let (ws, flags) = setup();
    ws.write("proj/x.py", "");
    let spec = ws.spec(
        "env.json",
        &json!({"working_dir": "proj", "pip": ["tinypkg==1.0"]}),
    );
    let built = build(
        &ws,
        &flags,
        &json!({"working_dir": "proj", "pip": ["tinypkg==1.0"]}),
        "same.json",
    );
    let script = "import signal, sys, time\n\
                  signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n\
                  print('ready', flush=True)\n\
                  time.sleep(60)\n";
    let mut child = ws
        .renv()
        .arg("run")
        .args(&flags)
        .arg(&spec)
        .args(["--", "python", "-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    // While it runs, both entries are leased: nothing can take them exclusively.
    let lock = |name: String| {
        std::fs::File::options()
            .write(true)
            .open(ws.store_v1("locks").join(format!("{name}.lock")))
            .unwrap()
    };
    let env_lock = lock(format!("env-{}", built["venv"]["key"].as_str().unwrap()));
    let pkg_lock = lock(format!("pkg-{}", built["package"]["digest"].as_str().unwrap()));
    assert!(
        env_lock.try_lock().is_err(),
        "the env is leased while the command runs"
    );
    assert!(
        pkg_lock.try_lock().is_err(),
        "the working_dir is leased while the command runs"
    );

    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(42),
        "SIGTERM reached the command, which chose its exit code"
    );
    assert!(env_lock.try_lock().is_ok(), "the lease ends with the command");
    assert!(pkg_lock.try_lock().is_ok());
    env_lock.unlock().unwrap();
    pkg_lock.unlock().unwrap();

    // `kill -INT <renv>` is forwarded too.
    let script = script.replace(
        "SIGTERM, lambda *a: sys.exit(42)",
        "SIGINT, lambda *a: sys.exit(43)",
    );
    let mut cmd = ws.renv();
    cmd.arg("run")
        .args(&flags)
        .arg(&spec)
        .args(["--", "python", "-c", &script])
        .stdout(std::process::Stdio::piped());
    // A harness run as a background job inherits SIGINT ignored, and renv rightly leaves
    // an ignored signal alone; this is about forwarding one it gets.
    // SAFETY: signal(2) is async-signal-safe, called in the child before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    line.clear();
    stdout.read_line(&mut line).unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(43));
}

/// The one test that needs the registry: a real package from PyPI.
#[test]
fn installs_requests_from_the_registry() {
    let ws = Workspace::new();
    let built = ws.build(&ws.spec("env.json", &json!({"pip": ["requests==2.26.0"]})));
    let version = in_env(
        built["python"].as_str().unwrap(),
        "import requests; print(requests.__version__)",
    );
    assert_eq!(version, "2.26.0");
}

/// With no uv configured or on PATH, renv bootstraps the pinned one into the store.
#[test]
fn uv_is_bootstrapped_into_the_store_when_none_is_given() {
    let (ws, flags) = setup();
    // The bootstrap goes through the operator's index config, so keep the registry on:
    // only the wheelhouse is added (and the offline-first install never leaves it).
    let flags = &flags[1..];
    let spec = ws.spec("env.json", &json!({"pip": ["tinypkg==1.0"]}));
    let out = ws
        .renv()
        .env_remove("RENV_UV")
        .env("PATH", "/usr/bin:/bin")
        .args(["build", "--json"])
        .args(flags)
        .arg(&spec)
        .output()
        .unwrap();
    assert_success(&out);
    let version = renv::venv::UV_VERSION;
    let uv = ws.store_v1("tools").join(format!("uv-{version}/bin/uv"));
    let reported = std::process::Command::new(&uv).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&reported.stdout).contains(version));
}

/// The installer sees neither the caller's PIP_*/UV_* settings nor the request's
/// env_vars: both would let a request (or a stray shell) steer what gets installed.
#[test]
fn the_installer_sees_neither_the_callers_nor_the_requests_environment() {
    let (ws, flags) = setup();
    let spec = ws.spec(
        "env.json",
        &json!({"pip": ["tinypkg==1.0"], "env_vars": {"UV_CONSTRAINT": "/nonexistent/constraints.txt", "PIP_NO_INDEX": "0"}}),
    );
    let out = ws
        .renv()
        .env("UV_CACHE_DIR", "/nonexistent/uv-cache")
        .env("UV_CONSTRAINT", "/nonexistent/constraints.txt")
        .env("UV_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("VIRTUAL_ENV", "/nonexistent/venv")
        .args(["build", "--json"])
        .args(&flags)
        .arg(&spec)
        .output()
        .unwrap();
    assert_success(&out);
    let built: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        in_env(
            built["python"].as_str().unwrap(),
            "import tinypkg; print(tinypkg.VERSION)"
        ),
        "1.0"
    );
    // The store's own cache was used, not the one in the caller's environment.
    assert!(!list_dir(&ws.store_v1("uv-cache")).is_empty());
    // The request's variables are for the worker.
    assert_eq!(built["env"]["UV_CONSTRAINT"], "/nonexistent/constraints.txt");
}

#[test]
fn pip_version_builds_with_pip_at_that_version() {
    let (ws, flags) = setup();
    // The interpreter's bundled pip wheel stands in for the index.
    let bundled = in_env(
        python().to_str().unwrap(),
        "import ensurepip, glob, os; print(glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), '_bundled', 'pip-*.whl'))[0])",
    );
    let version = bundled
        .rsplit('/')
        .next()
        .unwrap()
        .split('-')
        .nth(1)
        .unwrap()
        .to_string();
    std::fs::copy(
        &bundled,
        ws.path("wheels").join(Path::new(&bundled).file_name().unwrap()),
    )
    .unwrap();
    let spec = json!({"pip": {"packages": ["tinypkg==2.0"], "pip_version": format!("=={version}"), "pip_check": true}});
    let built = build(&ws, &flags, &spec, "pip-version.json");
    let python = built["python"].as_str().unwrap();
    assert_eq!(in_env(python, "import pip; print(pip.__version__)"), version);
    assert_eq!(in_env(python, "import tinypkg; print(tinypkg.VERSION)"), "2.0");
}

#[test]
fn a_failing_dependency_check_fails_the_build() {
    let (ws, flags) = setup();
    // `needy` requires a package that is not there; --no-deps lets it install anyway.
    wheelhouse(&ws.path("wheels"), &[("needy", "1.0", "")]);
    let wheel = ws.path("wheels/needy-1.0-py3-none-any.whl");
    let patch = "import sys, zipfile\n\
                 src = sys.argv[1]; data = {}\n\
                 with zipfile.ZipFile(src) as z:\n    data = {n: z.read(n) for n in z.namelist()}\n\
                 data['needy-1.0.dist-info/METADATA'] += b'Requires-Dist: absent-dependency\\n'\n\
                 with zipfile.ZipFile(src, 'w') as z:\n    [z.writestr(n, d) for n, d in data.items()]\n";
    let out = std::process::Command::new("python3")
        .args(["-c", patch])
        .arg(&wheel)
        .output()
        .unwrap();
    assert_success(&out);
    let mut extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    extra.push("--allow-install-option=--no-deps");
    for (field, check) in [("pip", "pip_check"), ("uv", "uv_check")] {
        let options = if field == "pip" {
            "pip_install_options"
        } else {
            "uv_pip_install_options"
        };
        let spec = ws.spec(
            &format!("{field}.json"),
            &json!({field: {"packages": ["needy"], options: ["--no-deps"], check: true}}),
        );
        let (code, stderr) = ws.build_fails(&spec, &extra);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("uv pip check failed"), "{stderr}");
        assert!(stderr.contains("absent-dependency"), "{stderr}");
        let unchecked = ws.spec(
            &format!("{field}-unchecked.json"),
            &json!({field: {"packages": ["needy"], options: ["--no-deps"]}}),
        );
        ws.build_with(&unchecked, &extra);
    }
}
