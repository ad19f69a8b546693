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

/// The default store root.
pub fn default_store_dir() -> std::path::PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| std::path::PathBuf::from(".cache"));
    cache.join("renv")
}
