//! Every `RENV_*` environment variable renv reads, in one place. Each CLI flag that has
//! one names it here (clap reads it), so `--help` and this list never disagree.

/// Root of the store (`--store`). Default: `$XDG_CACHE_HOME/renv`, else `~/.cache/renv`.
pub const RENV_STORE: &str = "RENV_STORE";
/// Most bytes one zip may unpack to (`--max-unpacked-bytes`).
pub const RENV_MAX_UNPACKED_BYTES: &str = "RENV_MAX_UNPACKED_BYTES";
/// Most entries one zip may hold (`--max-zip-entries`).
pub const RENV_MAX_ZIP_ENTRIES: &str = "RENV_MAX_ZIP_ENTRIES";
/// Hashing, copying and unpacking threads (`--threads`). Default: the core count, at most 16.
pub const RENV_THREADS: &str = "RENV_THREADS";
/// Print JSON instead of a readable summary (`--json`).
pub const RENV_JSON: &str = "RENV_JSON";
/// The base interpreter for virtualenvs (`--python`). Default: `python3` from `PATH`.
pub const RENV_PYTHON: &str = "RENV_PYTHON";
/// The uv binary (`--uv`). Default: `uv` on `PATH` if it is the pinned version, else the
/// store's bootstrapped copy.
pub const RENV_UV: &str = "RENV_UV";
/// `auto` (uv unless a spec sets `pip_version`) or `pip` (`--installer`).
pub const RENV_INSTALLER: &str = "RENV_INSTALLER";
/// The package index (`--index-url`).
pub const RENV_INDEX_URL: &str = "RENV_INDEX_URL";
/// Extra package indexes, comma-separated (`--extra-index-url`).
pub const RENV_EXTRA_INDEX_URL: &str = "RENV_EXTRA_INDEX_URL";
/// Wheel directories or pages, comma-separated (`--find-links`).
pub const RENV_FIND_LINKS: &str = "RENV_FIND_LINKS";
/// Use no index, only find-links (`--no-index`).
pub const RENV_NO_INDEX: &str = "RENV_NO_INDEX";
/// Install options requests may use, comma-separated (`--allow-install-option`).
pub const RENV_ALLOW_INSTALL_OPTIONS: &str = "RENV_ALLOW_INSTALL_OPTIONS";
/// Let direct-URL requirements bypass a configured index (`--allow-direct-urls`).
pub const RENV_ALLOW_DIRECT_URLS: &str = "RENV_ALLOW_DIRECT_URLS";
/// The daemon's socket (`--socket`), for `renv daemon` and its clients. Default:
/// `renv.sock` in the store directory.
pub const RENV_SOCKET: &str = "RENV_SOCKET";
/// Who the daemon's installers run as (`renv daemon --build-user`).
pub const RENV_BUILD_USER: &str = "RENV_BUILD_USER";
/// The daemon's GPU set (`--gpus`): `auto`, `none` or ids.
pub const RENV_GPUS: &str = "RENV_GPUS";
/// Compile all bytecode when an env is built (`--compile-bytecode`).
pub const RENV_COMPILE_BYTECODE: &str = "RENV_COMPILE_BYTECODE";
/// Let venvs see the base interpreter's site-packages (`--system-site-packages`).
pub const RENV_SYSTEM_SITE_PACKAGES: &str = "RENV_SYSTEM_SITE_PACKAGES";

/// The cluster-wide package store (`--remote`): `s3://bucket/prefix`, `gs://…`,
/// `file:///shared/dir`; `pkg://<digest>` missing here is fetched from it.
pub const RENV_REMOTE: &str = "RENV_REMOTE";
/// Remote URI prefixes requests to the daemon may name, comma-separated (`--allow-remote`).
pub const RENV_ALLOW_REMOTE: &str = "RENV_ALLOW_REMOTE";
/// Builds the daemon runs at once (`--max-concurrent-builds`); more wait their turn.
pub const RENV_MAX_CONCURRENT_BUILDS: &str = "RENV_MAX_CONCURRENT_BUILDS";
/// A stopping daemon leaves its workers running for the next one (`--live-restore`).
pub const RENV_LIVE_RESTORE: &str = "RENV_LIVE_RESTORE";

/// The default store root.
pub fn default_store_dir() -> std::path::PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| std::path::PathBuf::from(".cache"));
    cache.join("renv")
}
