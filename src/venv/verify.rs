//! What makes a committed env sound, for `renv verify`: its marker's description, its
//! `pyvenv.cfg`, the interpreter it was built with, and every path against its build
//! record (see [`super::build_record`]).

use std::path::Path;

use serde_json::Value;

use crate::store::EntryInfo;

/// What is wrong with the env `entry`, if anything.
pub fn env_problem(entry: &EntryInfo) -> Option<String> {
    let built_with: &Value = &entry.marker.description["python"]["path"];
    if !entry.path.join("pyvenv.cfg").is_file() {
        return Some("pyvenv.cfg is missing".into());
    }
    let python = entry.path.join("bin").join("python");
    match (std::fs::canonicalize(&python), built_with.as_str()) {
        (Err(_), _) => Some("its interpreter is gone (bin/python does not resolve)".into()),
        (Ok(real), Some(expected)) if real != Path::new(expected) => Some(format!(
            "bin/python resolves to {}, built with {expected}",
            real.display()
        )),
        _ => super::build_record::check(&entry.path),
    }
}
