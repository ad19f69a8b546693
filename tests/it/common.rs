//! Shared helpers: a temp workspace with its own store, and ways to run `renv` in it.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Workspace {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A workspace on the filesystem of the build's target dir, not /tmp (which may be
    /// tmpfs): for what only happens on a disk. Fails where the target dir is tmpfs too.
    pub fn on_disk() -> Self {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        assert!(
            !renv::sys::is_volatile_fs(dir.path()),
            "{} is tmpfs; this test needs a disk",
            dir.path().display()
        );
        Workspace { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    pub fn store_v1(&self, sub: &str) -> PathBuf {
        self.store().join("store-v1").join(sub)
    }

    /// `renv` with this workspace's store and no inherited `RENV_*` settings.
    pub fn renv(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_renv"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RENV_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("RENV_STORE", self.store())
            .env("RENV_UV", uv())
            .env("RENV_PYTHON", python())
            // A root daemon must be told who installers run as; the tests' builds are
            // their own (a test that uses a real build user says so).
            .env("RENV_BUILD_USER", "root")
            .current_dir(self.dir.path());
        cmd
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        path
    }

    /// Writes a spec file and returns its path.
    pub fn spec(&self, name: &str, json: &Value) -> PathBuf {
        self.write(name, json.to_string())
    }

    /// `renv build --json SPEC`, which must succeed.
    pub fn build(&self, spec: &Path) -> Value {
        self.build_with(spec, &[])
    }

    pub fn build_with(&self, spec: &Path, extra: &[&str]) -> Value {
        let out = self.build_output(spec, extra);
        assert_success(&out);
        serde_json::from_slice(&out.stdout).expect("build --json prints one JSON object")
    }

    /// `renv build --json [EXTRA…] SPEC`, whatever its outcome.
    pub fn build_output(&self, spec: &Path, extra: &[&str]) -> Output {
        self.renv()
            .arg("build")
            .arg("--json")
            .args(extra)
            .arg(spec)
            .output()
            .unwrap()
    }

    /// `renv build SPEC`, which must fail; returns (exit code, stderr).
    pub fn build_fails(&self, spec: &Path, extra: &[&str]) -> (i32, String) {
        let out = self.build_output(spec, extra);
        assert!(
            !out.status.success(),
            "expected failure, got: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(out.stdout.is_empty(), "a failed build prints nothing on stdout");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Names left in the store's staging and trash directories.
    pub fn leftovers(&self) -> Vec<String> {
        ["staging", "trash"]
            .iter()
            .flat_map(|sub| {
                list_dir(&self.store_v1(sub))
                    .into_iter()
                    .map(move |n| format!("{sub}/{n}"))
            })
            .collect()
    }

    /// `renv package DIR -o OUT`, which must succeed.
    pub fn package_zip(&self, dir: &str, out: &str) {
        let result = self.renv().args(["package", dir, "-o", out]).output().unwrap();
        assert_success(&result);
    }

    pub fn committed_packages(&self) -> Vec<String> {
        list_dir(&self.store_v1("pkgs"))
    }
}

pub fn list_dir(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
        Err(_) => Vec::new(),
    }
}

pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "renv failed ({:?})\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every path under `root` (relative, `/`-separated), with a trailing `/` for directories
/// and ` -> target` for symlinks.
pub fn tree_listing(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                out.insert(format!("{rel}/"));
                walk(root, &path, out);
            } else if kind.is_symlink() {
                out.insert(format!(
                    "{rel} -> {}",
                    std::fs::read_link(&path).unwrap().display()
                ));
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Writes `count` files of `size` bytes (distinct contents) under `root`.
pub fn write_many(root: &Path, count: usize, size: usize) {
    for i in 0..count {
        let path = root.join(format!("d{:02}/f{i:05}.dat", i % 50));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut body = format!("file {i}\n").into_bytes();
        body.resize(size, b'a' + (i % 26) as u8);
        std::fs::write(path, body).unwrap();
    }
}

/// A zip writer that does exactly what it is told, including what well-behaved writers
/// refuse to do (duplicate names, `..`, special-file modes, lying sizes). Stored entries.
pub mod raw_zip {
    pub struct Entry {
        pub name: Vec<u8>,
        /// Full unix mode including the file type bits, or None for a DOS-made entry.
        pub mode: Option<u32>,
        pub data: Vec<u8>,
        pub flags: u16,
    }

    pub fn file(name: &str, data: &[u8]) -> Entry {
        Entry {
            name: name.into(),
            mode: Some(0o100644),
            data: data.to_vec(),
            flags: 0,
        }
    }

    pub fn dir(name: &str) -> Entry {
        Entry {
            name: name.into(),
            mode: Some(0o040755),
            data: Vec::new(),
            flags: 0,
        }
    }

    pub fn symlink(name: &str, target: &str) -> Entry {
        Entry {
            name: name.into(),
            mode: Some(0o120777),
            data: target.into(),
            flags: 0,
        }
    }

    pub fn with_mode(name: &str, mode: u32, data: &[u8]) -> Entry {
        Entry {
            name: name.into(),
            mode: Some(mode),
            data: data.to_vec(),
            flags: 0,
        }
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    pub fn build(entries: &[Entry]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for e in entries {
            let offset = out.len() as u32;
            let crc = crc32(&e.data);
            let size = e.data.len() as u32;
            // Local file header.
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes());
            out.extend_from_slice(&e.flags.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes()); // stored
            out.extend_from_slice(&0u32.to_le_bytes()); // time, date
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&e.name);
            out.extend_from_slice(&e.data);
            // Central directory header.
            let made_by: u16 = if e.mode.is_some() { 3 << 8 | 20 } else { 20 };
            central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            central.extend_from_slice(&made_by.to_le_bytes());
            central.extend_from_slice(&20u16.to_le_bytes());
            central.extend_from_slice(&e.flags.to_le_bytes());
            central.extend_from_slice(&0u16.to_le_bytes());
            central.extend_from_slice(&0u32.to_le_bytes());
            central.extend_from_slice(&crc.to_le_bytes());
            central.extend_from_slice(&size.to_le_bytes());
            central.extend_from_slice(&size.to_le_bytes());
            central.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 6]); // extra len, comment len, disk number
            central.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            central.extend_from_slice(&(e.mode.unwrap_or(0) << 16).to_le_bytes());
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(&e.name);
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }
}

/// The pinned uv for tests: `RENV_TEST_UV`, or installed once (per checkout) into
/// `target/test-tools` with pip, the same way renv bootstraps it.
pub fn uv() -> &'static Path {
    static UV: OnceLock<PathBuf> = OnceLock::new();
    UV.get_or_init(|| {
        if let Some(uv) = std::env::var_os("RENV_TEST_UV") {
            return PathBuf::from(uv);
        }
        let version = renv::venv::UV_VERSION;
        pip_install_once(&format!("uv-{version}"), &[&format!("uv=={version}")]).join("bin/uv")
    })
}

/// Installs `requirements` with pip into `target/test-tools/<name>` unless it is there
/// (per checkout; concurrent test binaries may both install, one copy wins).
fn pip_install_once(name: &str, requirements: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-tools")
        .join(name);
    if !dir.exists() {
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--ignore-installed",
                "--target",
            ])
            .arg(&tmp)
            .args(requirements)
            .output()
            .expect("python3 -m pip");
        assert!(
            out.status.success(),
            "installing {requirements:?} for the tests: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::rename(&tmp, &dir);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

/// A free port on 127.0.0.1 (for servers that cannot report the one they bound).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn servers_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/servers.py")
}

/// A plain http server on 127.0.0.1 serving a directory (`tests/it/servers.py http`),
/// logging each request; killed on drop.
pub struct HttpServer {
    child: std::process::Child,
    pub root: PathBuf,
    pub url: String,
    log: PathBuf,
}

impl HttpServer {
    pub fn start(root: &Path) -> HttpServer {
        Self::start_with(root, None)
    }

    /// Over TLS with `(certificate, key)`: `https://127.0.0.1:<port>`.
    pub fn start_tls(root: &Path, cert: &Path, key: &Path) -> HttpServer {
        Self::start_with(root, Some((cert, key)))
    }

    fn start_with(root: &Path, tls: Option<(&Path, &Path)>) -> HttpServer {
        std::fs::create_dir_all(root).unwrap();
        let port_file = root.with_extension("port");
        let log = root.with_extension("log");
        let mut cmd = Command::new("python3");
        cmd.arg(servers_py());
        match tls {
            None => cmd.arg("http").args([root, &port_file, &log]),
            Some((cert, key)) => cmd.arg("https").args([root, &port_file, &log, cert, key]),
        };
        let child = cmd.spawn().unwrap();
        let port = wait_for(
            || std::fs::read_to_string(&port_file).ok(),
            "the http server's port",
        );
        let scheme = if tls.is_some() { "https" } else { "http" };
        HttpServer {
            child,
            root: root.to_path_buf(),
            url: format!("{scheme}://127.0.0.1:{port}"),
            log,
        }
    }

    /// What GETs do from now on: `normal`, `slow`, `break-once`, `break-always`.
    pub fn behave(&self, behaviour: &str) {
        std::fs::write(self.root.join(".behaviour"), behaviour).unwrap();
    }

    /// Requests so far with this method and path.
    pub fn requests(&self, method: &str, path: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let want = format!("{method} {path}");
        log.lines().filter(|l| *l == want).count()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local S3 API (`moto`, installed once into `target/test-tools`) on 127.0.0.1, with a
/// bucket; killed on drop. Its request log counts downloads.
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
    pub bucket: String,
    log: PathBuf,
    moto: PathBuf,
}

const MOTO: &str = "moto[s3]==5.1.18";

impl S3Server {
    pub fn start(ws: &Workspace, bucket: &str) -> S3Server {
        let moto = pip_install_once("moto-5.1.18", &[MOTO, "flask<4", "flask-cors<7"]);
        let port = free_port();
        let log = ws.path(&format!("moto-{port}.log"));
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .env("PYTHONPATH", &moto)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_for(
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
            "the S3 server",
        );
        let server = S3Server {
            child,
            endpoint,
            bucket: bucket.to_string(),
            log,
            moto,
        };
        server.call(&["create-bucket", bucket]);
        server
    }

    /// The environment renv needs to reach it (the standard AWS variables).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Uploads a file as `key`; returns its ETag.
    pub fn put(&self, key: &str, file: &Path) -> String {
        self.call(&["put", &self.bucket, key, file.to_str().unwrap()])
    }

    /// Keys under `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        self.call(&["list", &self.bucket, prefix])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// GETs of `/bucket/key` so far.
    pub fn downloads(&self, key: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let want = format!("\"GET /{}/{key} ", self.bucket);
        log.lines().filter(|l| l.contains(&want)).count()
    }

    fn call(&self, args: &[&str]) -> String {
        let out = Command::new("python3")
            .arg(servers_py())
            .args(["s3", &self.endpoint])
            .args(args)
            .env("PYTHONPATH", &self.moto)
            .output()
            .unwrap();
        assert_success(&out);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it gives a value (30 s at most).
pub fn wait_for<T>(mut check: impl FnMut() -> Option<T>, what: &str) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A wrapper around the test uv that logs each call's first three arguments, to count
/// installer runs (`venv --relocatable`: a venv template made, see [`builds`]). Returns
/// (wrapper, log).
pub fn counting_uv(ws: &Workspace) -> (PathBuf, PathBuf) {
    let calls = ws.path("uv-calls.log");
    let script = format!(
        "#!/bin/sh\necho \"$1 $2 $3\" >> {}\nexec {} \"$@\"\n",
        calls.display(),
        uv().display()
    );
    let wrapper = ws.write("counting-uv", script);
    set_mode(&wrapper, 0o755);
    (wrapper, calls)
}

/// How many env builds a [`counting_uv`] log shows: every build installs, offline first
/// (`uv venv` runs only to make a venv template, once for many builds).
pub fn builds(log: &str) -> usize {
    log.lines()
        .filter(|l| l.starts_with("pip install --offline"))
        .count()
}

/// The real path of `python3` (not a shim): what tests hand renv as `--python`.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import os, sys; print(os.path.realpath(sys.executable))"])
            .output()
            .expect("python3");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// A Python every user can run (the tests' own may live under root's home): for workers
/// that run as other users. Checked as uid 65534 by `test -x` in a shell, never by exec
/// through `setpriv`, which keeps root's capabilities across that exec.
pub fn shared_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let candidates = [python().to_path_buf(), PathBuf::from("/usr/bin/python3")];
        candidates
            .iter()
            .find(|p| {
                Command::new("setpriv")
                    .args([
                        "--reuid=65534",
                        "--regid=65534",
                        "--clear-groups",
                        "sh",
                        "-c",
                        "test -x \"$1\"",
                        "sh",
                    ])
                    .arg(p)
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .map(|p| p.canonicalize().unwrap())
            .unwrap_or_else(|| {
                panic!("these tests need a Python that other users can run; tried {candidates:?}")
            })
    })
}

/// Builds tiny pure-Python wheels into `dir`: (distribution, version, module source),
/// with the same script the Python SDK's tests use.
pub fn wheelhouse(dir: &Path, wheels: &[(&str, &str, &str)]) {
    let spec: Vec<_> = wheels
        .iter()
        .map(|(d, v, b)| serde_json::json!([d, v, b]))
        .collect();
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests/make_wheels.py"))
        .arg(dir)
        .arg(serde_json::Value::from(spec).to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A small tmpfs mounted for a test (root only), unmounted on drop. `None` (with a note on
/// stderr) where mounting is not allowed, so the test can skip.
pub struct TmpfsMount(PathBuf);

impl TmpfsMount {
    /// Mounts it, or fails the test: the suite runs as root (a precondition, never a
    /// reason to test less).
    pub fn new(path: &Path, size: &str) -> TmpfsMount {
        std::fs::create_dir_all(path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            mounted,
            "cannot mount a tmpfs at {}: the tests run as root",
            path.display()
        );
        TmpfsMount(path.to_path_buf())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
