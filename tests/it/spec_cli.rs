//! Spec validation as a user sees it: exit code 2 and a message naming the field.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::Workspace;

#[test]
fn invalid_specs_exit_2_naming_the_field() {
    let ws = Workspace::new();
    let cases: &[(&str, &str)] = &[
        (
            r#"{"env_vars": {"FOO": 1}}"#,
            "env_vars.FOO: expected a string, got 1",
        ),
        (
            r#"{"config": {"setup_timeout_seconds": 0}}"#,
            "config.setup_timeout_seconds: must be an integer > 0 or -1, got 0",
        ),
        (
            r#"{"conda": {}}"#,
            "conda: unknown field; supported fields are: working_dir, py_modules, excludes, env_vars, pip, uv, config, _ray_commit",
        ),
        (
            r#"{"pip": ["a"], "uv": ["a"]}"#,
            "`pip` and `uv` cannot both be given",
        ),
        (
            r#"{"pip": {"packages": "x", "pip_check": "no"}}"#,
            "pip.pip_check: expected true or false, got \"no\"",
        ),
        (
            r#"{"uv": {"packages": ["a"], "bogus": 1}}"#,
            "uv.bogus: unknown key; supported keys are: packages, uv_check, uv_version, uv_pip_install_options",
        ),
        (
            r#"{"pip": {"packages": ["a", "b", "--index-url https://x"]}}"#,
            "pip.packages[2]: options are not allowed in requirements",
        ),
        (
            r#"{"pip": ["git+https://example.org/x.git"]}"#,
            "pip[0]: VCS requirements are not allowed",
        ),
        (
            r#"{"env_vars": {"CUDA_VISIBLE_DEVICES": "0"}}"#,
            "env_vars.CUDA_VISIBLE_DEVICES: is managed by renv",
        ),
        (
            r#"{"env_vars": {"NVIDIA_VISIBLE_DEVICES": "0"}}"#,
            "env_vars.NVIDIA_VISIBLE_DEVICES: is managed by renv",
        ),
        (
            r#"{"env_vars": {"CUDA_DEVICE_ORDER": "x"}}"#,
            "env_vars.CUDA_DEVICE_ORDER: is managed by renv",
        ),
        (
            r#"{"env_vars": {"BAD-NAME": "x"}}"#,
            "env_vars.BAD-NAME: invalid variable name",
        ),
        (
            r#"{"working_dir": "gs://bucket/x.tar"}"#,
            "working_dir: expected a remote .zip",
        ),
        (
            r#"{"working_dir": "pkg://nothex"}"#,
            "working_dir: expected pkg://<64 lowercase hex digits>",
        ),
        (
            r#"{"working_dir": "./does-not-exist"}"#,
            "does-not-exist: not found",
        ),
        (r#"{"env_vars": "#, "invalid JSON"),
    ];
    for (i, (json, want)) in cases.iter().enumerate() {
        let spec = ws.write(&format!("bad{i}.json"), json);
        let (code, stderr) = ws.build_fails(&spec, &[]);
        assert_eq!(code, 2, "{json}: {stderr}");
        assert!(
            stderr.contains(want),
            "{json}\n  stderr: {stderr}\n  want:   {want}"
        );
    }
    assert!(ws.committed_packages().is_empty());
}

#[test]
fn hostile_requirements_are_rejected_naming_the_entry() {
    let ws = Workspace::new();
    let cases: &[(&str, &str)] = &[
        (
            "--index-url https://evil.example/simple",
            "options are not allowed",
        ),
        ("-i https://evil.example/simple", "options are not allowed"),
        (
            "--extra-index-url https://evil.example",
            "options are not allowed",
        ),
        ("-r other-requirements.txt", "options are not allowed"),
        ("-c constraints.txt", "options are not allowed"),
        ("-e .", "options are not allowed"),
        ("-f https://evil.example/wheels", "options are not allowed"),
        ("--find-links /tmp/wheels", "options are not allowed"),
        ("--trusted-host evil.example", "options are not allowed"),
        ("./local/pkg", "local paths are not allowed"),
        ("/abs/pkg", "local paths are not allowed"),
        ("~/pkg", "local paths are not allowed"),
        ("pkg/sub", "local paths are not allowed"),
        (
            "file:///tmp/x-1.0-py3-none-any.whl",
            "file:// requirements are not allowed",
        ),
        ("x @ file:///tmp/x.whl", "file:// requirements are not allowed"),
        (
            "git+https://example.org/x.git",
            "VCS requirements are not allowed",
        ),
        (
            "x @ git+ssh://git@example.org/x.git",
            "VCS requirements are not allowed",
        ),
        ("requests\n--index-url https://evil.example", "control characters"),
        ("requests==${VERSION}", "`$` is not allowed"),
        ("requests; $(touch /tmp/pwned)", "`$` is not allowed"),
        ("..\\\\evil", "backslashes are not allowed"),
        ("https://example.org/x.whl", "bare URLs are not allowed"),
        ("x @ http://example.org/x.whl", "direct URLs must be `https://…`"),
    ];
    for (i, (requirement, want)) in cases.iter().enumerate() {
        for field in ["pip", "uv"] {
            let spec = json!({field: {"packages": ["ok-package", requirement]}});
            let path = ws.spec(&format!("req{i}-{field}.json"), &spec);
            let (code, stderr) = ws.build_fails(&path, &[]);
            assert_eq!(code, 2, "{requirement}: {stderr}");
            let prefix = format!("{field}.packages[1]: ");
            assert!(
                stderr.contains(&prefix) && stderr.contains(want),
                "{requirement:?}: {stderr}"
            );
        }
    }
    // The list form names the index too, and a requirements file names its line.
    let (_, stderr) = ws.build_fails(&ws.spec("list.json", &json!({"pip": ["a", "b", "-e ."]})), &[]);
    assert!(stderr.contains("pip[2]: options are not allowed"), "{stderr}");
    ws.write("bad-requirements.txt", "# comment\nrequests\n\n-e ./local\n");
    let path = ws.spec("bad-req.json", &json!({"pip": "bad-requirements.txt"}));
    let (_, stderr) = ws.build_fails(&path, &[]);
    assert!(
        stderr.contains("pip (bad-requirements.txt:4): options are not allowed"),
        "{stderr}"
    );
}

#[test]
fn equal_versions_share_an_env_and_invalid_versions_exit_2() {
    let ws = Workspace::new();
    let wheels = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hello/wheels");
    let flags = ["--no-index", "--find-links", wheels.to_str().unwrap()];
    let build = |name: &str, requirement: &str| -> Value {
        let spec = ws.spec(name, &json!({"pip": [requirement]}));
        ws.build_with(&spec, &flags)
    };
    let short = build("short.json", "hello_greeting==1.0");
    let long = build("long.json", "Hello-Greeting == 1.0.0");
    assert_eq!(short["env_id"], long["env_id"]);
    assert_eq!(short["venv"]["key"], long["venv"]["key"]);
    assert_eq!(long["venv"]["created"], false);

    for (requirement, want) in [
        ("foo==abc", "pip[0]: expected version to start with a number"),
        ("foo==1.0.*.1", "pip[0]: wildcards in versions must be at the end"),
    ] {
        let spec = ws.spec("bad.json", &json!({"pip": [requirement]}));
        let (code, stderr) = ws.build_fails(&spec, &flags);
        assert_eq!(code, 2, "{requirement}: {stderr}");
        assert!(stderr.contains(want), "{requirement}: {stderr}");
    }
}

#[test]
fn env_vars_only_spec_builds_and_spelling_does_not_change_the_env() {
    let ws = Workspace::new();
    let a = ws.write(
        "a.json",
        r#"{"env_vars": {"B": "2", "A": "1"}, "config": {"setup_timeout_seconds": 600}}"#,
    );
    let b = ws.write(
        "b.json",
        "{\n  \"env_vars\" : { \"A\":\"1\",\n \"B\" : \"2\" } }\n",
    );
    let built_a = ws.build(&a);
    let built_b = ws.build(&b);
    assert_eq!(built_a["env_id"], built_b["env_id"]);
    assert_eq!(built_a["working_dir"], Value::Null);
    assert_eq!(built_a["python"], Value::Null);
    assert_eq!(built_a["env"], json!({"A": "1", "B": "2"}));
    let c = ws.write("c.json", r#"{"env_vars": {"A": "1", "B": "3"}}"#);
    assert_ne!(ws.build(&c)["env_id"], built_a["env_id"]);

    // The readable form too, and from stdin.
    let out = ws
        .renv()
        .args(["build", "-"])
        .stdin(std::fs::File::open(&a).unwrap())
        .output()
        .unwrap();
    crate::common::assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("env_id") && text.contains("A=1"), "{text}");
}

#[test]
fn working_dir_env_puts_the_package_first_on_pythonpath() {
    let ws = Workspace::new();
    ws.write("proj/main.py", "print('hi')\n");
    let spec = ws.spec(
        "env.json",
        &json!({"working_dir": "proj", "env_vars": {"PYTHONPATH": "/opt/extra", "TF_WARNINGS": "none"}}),
    );
    let built = ws.build(&spec);
    let wd = built["working_dir"].as_str().unwrap();
    assert!(wd.starts_with(ws.store_v1("pkgs").to_str().unwrap()), "{wd}");
    assert_eq!(built["cwd"], wd);
    assert_eq!(built["env"]["PYTHONPATH"], format!("{wd}:/opt/extra"));
    assert_eq!(built["env"]["TF_WARNINGS"], "none");
    assert_eq!(
        built["package"]["uri"],
        format!("pkg://{}", built["package"]["digest"].as_str().unwrap())
    );
    assert!(built["timings_ms"]["total"].is_u64());
}

/// `name @ https://…` would fetch from wherever it points: with `--no-index` or
/// `--index-url` configured, that is the operator's to allow (`--allow-direct-urls`).
#[test]
fn direct_urls_follow_the_operators_index_policy() {
    let ws = Workspace::new();
    let spec = ws.spec(
        "direct.json",
        &json!({"pip": ["tinypkg @ https://127.0.0.1:9/tinypkg-1.0-py3-none-any.whl"]}),
    );
    for policy in [
        &["--no-index"][..],
        &["--index-url", "https://127.0.0.1:9/simple"][..],
    ] {
        let (code, stderr) = ws.build_fails(&spec, policy);
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains("pip:") && stderr.contains("--allow-direct-urls") && stderr.contains("tinypkg @"),
            "{stderr}"
        );
        assert!(ws.leftovers().is_empty());
    }
    // Allowed, the URL is used (and here, unreachable: the installer's own failure).
    let (_, stderr) = ws.build_fails(&spec, &["--no-index", "--allow-direct-urls"]);
    assert!(!stderr.contains("--allow-direct-urls"), "{stderr}");
    assert!(stderr.contains("uv pip install"), "{stderr}");
}
