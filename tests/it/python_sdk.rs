//! The Python SDK (`python/renv`) against a real daemon: its unittest suite, run with the
//! real interpreter, this build's `renv` and the pinned uv.

use std::path::Path;
use std::process::Command;

use crate::common::{assert_success, python, uv};

#[test]
fn the_python_sdks_own_tests_pass_against_a_real_daemon() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python())
        .args(["-W", "error::ResourceWarning", "-m", "unittest", "discover", "-v"])
        .args(["-s", "python/tests", "-p", "test_*.py"])
        .current_dir(root)
        .env("PYTHONPATH", root.join("python"))
        .env("RENV_BIN", env!("CARGO_BIN_EXE_renv"))
        .env("RENV_UV", uv())
        .output()
        .unwrap();
    assert_success(&out);
    // unittest reports on stderr; make sure the suite ran rather than found nothing.
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(report.contains("\nOK"), "{report}");
    assert!(!report.contains("Ran 0 tests"), "{report}");
}
