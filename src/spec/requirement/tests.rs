use super::*;

fn canonical(raw: &str) -> String {
    match Requirement::parse(raw) {
        Ok(req) => req.canonical().to_string(),
        Err(e) => panic!("{raw:?} refused: {e}"),
    }
}

/// Accepted requirements and their canonical forms. Acceptance agrees with PyPA's
/// `packaging` (`packaging.requirements.Requirement`) for every row.
#[test]
fn accepts_and_canonicalizes() {
    let cases = [
        ("requests", "requests"),
        ("  requests  ", "requests"),
        ("Requests_Toolbelt==1.0", "requests-toolbelt==1"),
        ("Foo.Bar[X_Y]", "foo-bar[x-y]"),
        ("foo[Socks,security,socks]", "foo[security,socks]"),
        ("foo[]", "foo"),
        (
            "requests [Security , socks] >= 2.0 , < 3",
            "requests[security,socks]>=2,<3",
        ),
        ("numpy (>=1.20)", "numpy>=1.20"),
        // `packaging` accepts a trailing comma.
        ("foo==1.0,", "foo==1"),
        ("foo==1.0 , ", "foo==1"),
        // PEP 440 pads releases with zeros for these operators: same versions.
        ("requests==2.26", "requests==2.26"),
        ("requests==2.26.0", "requests==2.26"),
        ("requests == 2.26.0.0", "requests==2.26"),
        ("foo!=1.5.0", "foo!=1.5"),
        ("foo>=1.0.0,<2.0,!=1.5.0", "foo>=1,!=1.5,<2"),
        ("foo<2.0.0, >1.0", "foo>1,<2"),
        ("foo>=1.0,>=1.0.0", "foo>=1"),
        ("foo<=0.0", "foo<=0"),
        ("foo>=1.0.0rc1", "foo>=1rc1"),
        ("foo>2.0.post1", "foo>2.post1"),
        ("foo<=V1.0-1", "foo<=1.post1"),
        ("foo==1!2.0.0", "foo==1!2"),
        ("foo==01.10.0", "foo==1.10"),
        ("torch==2.1.0+cu121", "torch==2.1+cu121"),
        // ...but not for these: kept as written (PEP 440 normalized).
        ("foo~=2.2", "foo~=2.2"),
        ("foo~=2.2.0", "foo~=2.2.0"),
        ("foo==2.26.*", "foo==2.26.*"),
        ("foo==2.26.0.*", "foo==2.26.0.*"),
        ("foo!=1.0.*", "foo!=1.0.*"),
        ("foo===1.0.0", "foo===1.0.0"),
        // Markers as the crate prints them.
        (
            "pandas; python_version>='3.9' and sys_platform == \"linux\"",
            "pandas ; python_full_version >= '3.9' and sys_platform == 'linux'",
        ),
        (
            "pandas ; sys_platform == 'linux' and python_version >= '3.9'",
            "pandas ; python_full_version >= '3.9' and sys_platform == 'linux'",
        ),
        ("foo;extra=='Bar_Baz'", "foo ; extra == 'bar-baz'"),
        (
            "foo ; os_name == 'b' or os_name == 'a'",
            "foo ; os_name == 'a' or os_name == 'b'",
        ),
        // Direct URLs.
        (
            "pkg @ https://example.org/pkg-1.0-py3-none-any.whl",
            "pkg @ https://example.org/pkg-1.0-py3-none-any.whl",
        ),
        (
            "Pkg[Bar]@https://example.org/pkg.whl ; python_version<'3.9'",
            "pkg[bar] @ https://example.org/pkg.whl ; python_full_version < '3.9'",
        ),
        (
            "pkg @ https://user:secret@example.org/pkg.whl#sha256=ab",
            "pkg @ https://user:secret@example.org/pkg.whl#sha256=ab",
        ),
    ];
    for (raw, want) in cases {
        assert_eq!(canonical(raw), want, "{raw}");
        // Canonical forms are fixed points.
        assert_eq!(canonical(want), want, "{want}");
    }
    let req = Requirement::parse("  Requests == 2.26.0 ").unwrap();
    assert_eq!(req.given(), "Requests == 2.26.0");
    assert_eq!(req.name(), "requests");
    assert_eq!(req.to_string(), "requests==2.26");
}

#[test]
fn spellings_of_one_requirement_are_equal_and_others_are_not() {
    let same = [
        ["requests==2.26", "requests==2.26.0", "Requests == 2.26.0.0"],
        ["foo>=1.0,<2", "foo <2.0.0, >=1", "foo (>=1.0.0,<2.0)"],
        ["foo[b,a]", "foo[A,B,a]", "FOO [a , b]"],
        [
            "foo; os_name == 'posix' and python_version < '3.12'",
            "foo ; python_version<\"3.12\" and os_name==\"posix\"",
            "foo;(os_name == 'posix') and (python_version < '3.12')",
        ],
    ];
    for spellings in same {
        let first = Requirement::parse(spellings[0]).unwrap();
        for other in &spellings[1..] {
            assert_eq!(
                Requirement::parse(other).unwrap(),
                first,
                "{other} vs {}",
                spellings[0]
            );
        }
    }
    let different = [
        ("foo~=2.2", "foo~=2.2.0"),
        ("foo==2.26.*", "foo==2.26.0.*"),
        ("foo==1.0", "foo===1.0"),
        ("foo==1.0", "foo==1.0.1"),
        ("foo==1.0", "foo==1.0+local"),
        ("foo", "foo[bar]"),
    ];
    for (a, b) in different {
        assert_ne!(
            Requirement::parse(a).unwrap(),
            Requirement::parse(b).unwrap(),
            "{a} vs {b}"
        );
    }
}

/// Refused requirements and a part of the reason. The grammar rows agree with
/// `packaging`; the policy rows are renv's.
#[test]
fn refuses_invalid_and_hostile_entries() {
    let cases = [
        // Grammar (`packaging` refuses these too).
        ("foo==abc", "in requirement \"foo==abc\""),
        ("foo==1.0.*.1", "wildcards in versions must be at the end"),
        ("foo>=1,,<2", "in requirement"),
        ("foo~=1", "~= operator requires at least two segments"),
        ("foo~=2.2.*", "in requirement"),
        ("foo>=1.0+local", "local"),
        ("foo==1.*+local", "in requirement"),
        ("requests==", "in requirement"),
        ("requests extra", "at position 9"),
        ("  requests extra", "at position 11"),
        ("requests; evil()", "marker"),
        ("requests ; os_name == 'a' and", "in requirement"),
        ("foo==1.0 ;", "in requirement"),
        ("fóo", "in requirement"),
        ("", "empty"),
        ("   ", "empty"),
        // Policy.
        ("--index-url https://evil", "options are not allowed"),
        ("-r other.txt", "options are not allowed"),
        ("-e .", "options are not allowed"),
        ("./local", "local paths"),
        ("/abs/path", "local paths"),
        ("~/pkg", "local paths"),
        ("pkg/sub", "local paths"),
        ("x @ ./local", "local paths"),
        ("x @ /abs/x.whl", "local paths"),
        ("file:///tmp/x.whl", "file://"),
        ("x @ file:///tmp/x.whl", "file://"),
        ("x @ FILE:///tmp/x.whl", "file://"),
        ("git+https://github.com/a/b", "VCS"),
        ("b @ git+https://github.com/a/b", "VCS"),
        ("b @ git+ssh://git@github.com/a/b", "VCS"),
        ("b @ hg+https://example.org/b", "VCS"),
        ("b @ HG+https://example.org/b", "VCS"),
        ("requests\n--index-url x", "control characters"),
        ("requests\t", "control characters"),
        ("requests==${VERSION}", "`$`"),
        ("x @ https://example.org/${TOKEN}/x.whl", "`$`"),
        ("requests; $(touch /tmp/pwned)", "`$`"),
        ("C:\\pkg", "backslashes"),
        ("x @ https://example.org\\x.whl", "backslashes"),
        ("https://example.org/x.whl", "bare URLs"),
        ("x @ http://example.org/x.whl", "https://"),
        ("x @ ftp://example.org/x.whl", "https://"),
        ("x @ example.org/x.whl", "https://"),
        (
            "x @ https://example.org/a b.whl",
            "unexpected character in direct URL",
        ),
        (
            "x @ https://example.org/a\"b.whl",
            "unexpected character in direct URL",
        ),
        (
            "x @ https://example.org/a'b.whl",
            "unexpected character in direct URL",
        ),
        (
            "foo ; platform_release == \"it's\"",
            "quotes inside marker strings",
        ),
        (
            "foo ; os_name == 'a' or os_name == 'b' or os_name == 'c' or os_name == 'd' or \
             os_name == 'e' or os_name == 'f' or os_name == 'g' or os_name == 'h' or \
             os_name == 'i' or os_name == 'j' or os_name == 'k' or os_name == 'l' or os_name == 'm'",
            "at most 12 comparisons",
        ),
        (
            "foo ; (((((((((((((((((os_name == 'a')))))))))))))))))",
            "nest at most 16 deep",
        ),
    ];
    for (raw, want) in cases {
        match Requirement::parse(raw) {
            Ok(req) => panic!("{raw:?} accepted as {req}"),
            Err(err) => assert!(err.contains(want), "{raw:?}: {err}"),
        }
    }
}

/// The marker limits leave room for real markers, and the hostile shapes they stop (which
/// cost the marker algebra exponential time) stay cheap at the limit.
#[test]
fn marker_limits_admit_real_markers() {
    let real = "foo ; (platform_machine == 'x86_64' or platform_machine == 'AMD64' or \
                platform_machine == 'aarch64') and sys_platform != 'darwin' and \
                python_version >= '3.9' and python_version < '3.13'";
    assert!(Requirement::parse(real).is_ok());
    let extras: Vec<String> = (0..6)
        .map(|i| format!("extra == 'a{i}' and extra == 'b{i}'"))
        .collect();
    let at_limit = format!("foo ; {}", extras.join(" or "));
    assert!(Requirement::parse(&at_limit).is_ok());
    // Within the limits but 64 conjunctions once the crate has multiplied it out.
    let clauses: Vec<String> = (0..6)
        .map(|i| format!("('a{i}' in platform_version or 'b{i}' in platform_release)"))
        .collect();
    let err = Requirement::parse(&format!("foo ; {}", clauses.join(" and "))).unwrap_err();
    assert!(err.contains("canonical form is longer than 4096 bytes"), "{err}");
    let nested = format!("foo ; {}os_name == 'a'{}", "(".repeat(16), ")".repeat(16));
    assert_eq!(canonical(&nested), "foo ; os_name == 'a'");
}

#[test]
fn installer_specifiers_keep_their_versions() {
    let cases = [
        ("==23.2.1", Some("==23.2.1")),
        (" ==0.4.0 ", Some("==0.4.0")),
        (">=22.0, <24", Some(">=22.0,<24")),
        (
            "==22.0.2;python_version=='3.8.11'",
            // `python_version` has two components, so this marker is never true.
            Some("==22.0.2 ; python_version < '0'"),
        ),
        (
            "==22.0.2;python_version<'3.12'",
            Some("==22.0.2 ; python_full_version < '3.12'"),
        ),
        ("latest", None),
        ("22.0", None),
        ("", None),
        ("==abc", None),
        (" @ https://example.org/pip.whl", None),
        ("==22;--index-url=x", None),
        ("==${V}", None),
    ];
    for (spec, want) in cases {
        assert_eq!(installer_specifier("pip", spec).as_deref(), want, "{spec:?}");
    }
}
