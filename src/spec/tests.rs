use super::*;
use proptest::prelude::*;
use serde_json::json;

fn err(json: &str) -> String {
    RuntimeEnvSpec::from_json(json).unwrap_err().to_string()
}

#[test]
fn validation_errors_name_the_field() {
    let cases = [
        (
            r#"{"env_vars": {"FOO": 1}}"#,
            "env_vars.FOO: expected a string, got 1",
        ),
        (
            r#"{"config": {"setup_timeout_seconds": 0}}"#,
            "config.setup_timeout_seconds: must be an integer > 0 or -1, got 0",
        ),
        (
            r#"{"config": {"setup_timeout_seconds": 9223372036854775807}}"#,
            "config.setup_timeout_seconds: must be at most 31536000 (a year), or -1 for no deadline, got 9223372036854775807",
        ),
        (
            r#"{"config": {"setup_timeout_seconds": 1.5}}"#,
            "config.setup_timeout_seconds: must be an integer > 0 or -1, got 1.5",
        ),
        (
            r#"{"config": {"setup_timeout_seconds": "10"}}"#,
            "config.setup_timeout_seconds: must be an integer > 0 or -1, got \"10\"",
        ),
        (
            r#"{"config": {"eager_install": "yes"}}"#,
            "config.eager_install: expected true or false, got \"yes\"",
        ),
        (
            r#"{"config": {"retries": 1}}"#,
            "config.retries: unknown key; supported keys are: setup_timeout_seconds, eager_install",
        ),
        (
            r#"{"conda": "env.yaml"}"#,
            "conda: unknown field; supported fields are: working_dir, py_modules, excludes, env_vars, pip, uv, config, _ray_commit",
        ),
        (
            r#"{"pip": ["a"], "uv": ["b"]}"#,
            "uv: `pip` and `uv` cannot both be given; use one of them",
        ),
        (
            r#"{"pip": 3}"#,
            "pip: expected a list of requirements, a requirements file path, or an object, got 3",
        ),
        (
            r#"{"pip": {"pip_check": true}}"#,
            "pip: expected a `packages` key in the dict form",
        ),
        (
            r#"{"pip": {"packages": [], "uv_check": true}}"#,
            "pip.uv_check: unknown key; supported keys are: packages, pip_check, pip_version, pip_install_options",
        ),
        (
            r#"{"uv": {"packages": ["a"], "uv_check": 1}}"#,
            "uv.uv_check: expected true or false, got 1",
        ),
        (
            r#"{"pip": {"packages": ["a"], "pip_version": "latest"}}"#,
            "pip.pip_version: expected a version specifier such as \"==23.2.1\", got \"latest\"",
        ),
        (
            r#"{"pip": ["requests", 7]}"#,
            "pip[1]: expected a requirement string, got 7",
        ),
        (
            r#"{"pip": {"packages": ["a", "b", "--index-url https://x"]}}"#,
            "pip.packages[2]: options are not allowed in requirements (\"--index-url https://x\")",
        ),
        (
            r#"{"uv": ["ok", "./local"]}"#,
            "uv[1]: local paths are not allowed in requirements (\"./local\")",
        ),
        (
            r#"{"pip": ["foo==abc"]}"#,
            "pip[0]: expected version to start with a number, but no leading ASCII digits were found at position 3 in requirement \"foo==abc\"",
        ),
        (
            r#"{"pip": {"packages": ["ok", "foo==1.0.*.1"]}}"#,
            "pip.packages[1]: wildcards in versions must be at the end",
        ),
        (
            r#"{"uv": ["x @ file:///tmp/x.whl"]}"#,
            "uv[0]: file:// requirements are not allowed (\"x @ file:///tmp/x.whl\")",
        ),
        (
            r#"{"pip": {"packages": ["a"], "pip_version": "==abc"}}"#,
            "pip.pip_version: expected a version specifier such as \"==23.2.1\", got \"==abc\"",
        ),
        (
            r#"{"env_vars": {"CUDA_VISIBLE_DEVICES": "0"}}"#,
            "env_vars.CUDA_VISIBLE_DEVICES: is managed by renv",
        ),
        (
            r#"{"env_vars": {"NVIDIA_VISIBLE_DEVICES": "all"}}"#,
            "env_vars.NVIDIA_VISIBLE_DEVICES: is managed by renv",
        ),
        (
            r#"{"env_vars": {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}}"#,
            "env_vars.CUDA_DEVICE_ORDER: is managed by renv",
        ),
        (
            r#"{"env_vars": {"1BAD": "x"}}"#,
            "env_vars.1BAD: invalid variable name",
        ),
        (
            r#"{"env_vars": {"A=B": "x"}}"#,
            "env_vars.A=B: invalid variable name",
        ),
        (
            r#"{"env_vars": ["A"]}"#,
            "env_vars: expected an object of string to string, got a list",
        ),
        (r#"{"working_dir": 5}"#, "working_dir: expected a string"),
        (
            r#"{"working_dir": "s3://bucket/wd.tar"}"#,
            "working_dir: expected a remote .zip (as Ray accepts), got \"s3://bucket/wd.tar\"",
        ),
        (
            r#"{"working_dir": "https://host/team/../other/wd.zip"}"#,
            "working_dir: \"https://host/team/../other/wd.zip\": expected its canonical spelling",
        ),
        (
            r#"{"working_dir": "ftp://host/wd.zip"}"#,
            "working_dir: \"ftp://host/wd.zip\": ftp:// is not a supported remote",
        ),
        (
            r#"{"py_modules": ["gs://bucket/m.whl"]}"#,
            "py_modules[0]: expected a wheel file name (name-version-python-abi-platform.whl), got \"m.whl\"",
        ),
        (
            r#"{"working_dir": "m-1.0-py3-none-any.whl"}"#,
            "working_dir: a wheel cannot be the working_dir",
        ),
        (
            r#"{"working_dir": "pkg://abc"}"#,
            "working_dir: expected pkg://<64 lowercase hex digits>, got \"pkg://abc\"",
        ),
        (
            r#"{"working_dir": "file://relative.zip"}"#,
            "working_dir: expected file:///absolute/path.zip",
        ),
        (
            r#"{"working_dir": "file:///tmp/x.tar"}"#,
            "working_dir: expected file:///absolute/path.zip",
        ),
        (
            r#"{"excludes": "*.log"}"#,
            "excludes: expected a list of gitignore patterns, got \"*.log\"",
        ),
        (
            r#"{"excludes": ["ok", null]}"#,
            "excludes[1]: expected a string, got null",
        ),
        (
            r#"{"working_dir": "pkg://0000000000000000000000000000000000000000000000000000000000000000", "excludes": ["x"]}"#,
            "excludes: applies only to local directories (working_dir, py_modules)",
        ),
        ("[1]", "expected a JSON object, got a list"),
        ("{", "invalid JSON"),
    ];
    for (json, want) in cases {
        let got = err(json);
        assert!(got.starts_with(want), "{json}\n  got:  {got}\n  want: {want}");
    }
}

#[test]
fn accepts_ray_forms() {
    let spec = RuntimeEnvSpec::from_json(
        r#"{"working_dir": "./", "excludes": ["*.log", "!keep.log", "data/"],
            "env_vars": {"TF_WARNINGS": "none", "P": "${PATH}:x"},
            "pip": {"packages": ["requests==2.26.0"], "pip_check": false, "pip_version": "==22.0.2;python_version=='3.8.11'"},
            "config": {"setup_timeout_seconds": -1, "eager_install": false},
            "_ray_commit": "abc"}"#,
    )
    .unwrap();
    assert_eq!(spec.working_dir, Some(WorkingDirSpec::Local("./".into())));
    assert_eq!(spec.config.setup_timeout_seconds, None);
    let pkgs = spec.packages.unwrap();
    // As the marker algebra prints it: `python_version` has two components, so
    // `python_version == '3.8.11'` is never true.
    assert_eq!(
        pkgs.installer_version.as_deref(),
        Some("==22.0.2 ; python_version < '0'")
    );
    assert!(RuntimeEnvSpec::from_json(r#"{"uv": "requirements.txt"}"#).is_ok());
    assert!(RuntimeEnvSpec::from_json(r#"{"pip": null, "uv": ["a"]}"#).is_ok());
}

#[test]
fn list_and_dict_forms_are_the_same_spec() {
    let a = RuntimeEnvSpec::from_json(r#"{"pip": ["Requests", "numpy>=1"]}"#).unwrap();
    let b =
        RuntimeEnvSpec::from_json(r#"{"pip": {"packages": ["requests", "numpy >= 1"], "pip_check": false}}"#)
            .unwrap();
    assert_eq!(a.canonical_json(), b.canonical_json());
    let c = RuntimeEnvSpec::from_json(r#"{"config": {"setup_timeout_seconds": 600}}"#).unwrap();
    let d = RuntimeEnvSpec::from_json("{}").unwrap();
    assert_eq!(c.canonical_json(), d.canonical_json());
}

#[test]
fn equal_versions_are_one_requirement() {
    let a = RuntimeEnvSpec::from_json(r#"{"pip": ["requests==2.26"]}"#).unwrap();
    let b = RuntimeEnvSpec::from_json(r#"{"pip": ["requests==2.26.0"]}"#).unwrap();
    assert_eq!(a.canonical_json(), b.canonical_json());
    assert_eq!(a.canonical_json()["pip"]["packages"], json!(["requests==2.26"]));
    // `packaging` accepts a trailing comma.
    assert!(RuntimeEnvSpec::from_json(r#"{"pip": ["foo==1.0,"]}"#).is_ok());

    // Duplicates by canonical form: the first spelling is kept, as Ray keeps the first.
    let reqs: Vec<Requirement> = ["Requests==2.26.0", "numpy", "requests == 2.26", "requests==2.27"]
        .iter()
        .map(|r| Requirement::parse(r).unwrap())
        .collect();
    let kept = dedup_requirements(&reqs);
    let given: Vec<&str> = kept.iter().map(Requirement::given).collect();
    assert_eq!(given, ["Requests==2.26.0", "numpy", "requests==2.27"]);
    let canonical: Vec<&str> = kept.iter().map(Requirement::canonical).collect();
    assert_eq!(canonical, ["requests==2.26", "numpy", "requests==2.27"]);
}

fn env_map() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("[A-Z_][A-Z0-9_]{0,8}", "[ -~]{0,12}"), 0..8)
}

proptest! {
    /// Key order and whitespace never change the canonical form.
    #[test]
    fn canonical_form_ignores_key_order_and_whitespace(vars in env_map(), shuffle in any::<u64>(), pad in 0usize..3) {
        let vars: BTreeMap<_, _> = vars.into_iter().collect();
        let mut entries: Vec<_> = vars.iter().collect();
        let n = entries.len().max(1);
        entries.rotate_left((shuffle as usize) % n);
        let ws = " ".repeat(pad);
        let body: Vec<String> = entries
            .iter()
            .map(|(k, v)| format!("{ws}{}{ws}:{ws}{}", serde_json::to_string(k).unwrap(), serde_json::to_string(v).unwrap()))
            .collect();
        let forward = format!("{{\"env_vars\": {{{}}}, \"pip\": [\"a\"]}}", body.join(","));
        let backward = format!("{{{ws}\"pip\":{ws}{{\"packages\": [\"a\"]}},\n\"env_vars\": {{{}}}}}", body.iter().rev().cloned().collect::<Vec<_>>().join(",\n"));
        let a = RuntimeEnvSpec::from_json(&forward).unwrap();
        let b = RuntimeEnvSpec::from_json(&backward).unwrap();
        prop_assert_eq!(a.canonical_json().to_string(), b.canonical_json().to_string());
        prop_assert_eq!(a, b);
    }
}
