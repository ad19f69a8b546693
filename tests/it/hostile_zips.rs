//! Hostile zips, each checked against sentinel files outside the store: the archive is
//! rejected whole, with the entry named, and leaves no trace anywhere.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::common::raw_zip::{self, Entry};
use crate::common::{Workspace, mode_of, tree_listing};

const SENTINEL: &str = "sentinel: must never change";

struct Case {
    name: &'static str,
    entries: Vec<Entry>,
    flags: &'static [&'static str],
    /// Substrings the error must contain (the entry and the reason).
    want: &'static [&'static str],
}

fn cases(outside: &Path) -> Vec<Case> {
    let abs = format!("{}/evil.txt", outside.display());
    let abs: &'static str = Box::leak(abs.into_boxed_str());
    let bad_name = Entry {
        name: vec![b'a', 0xff, 0xfe],
        mode: Some(0o100644),
        data: b"x".to_vec(),
        flags: 0,
    };
    let encrypted = Entry {
        flags: 1,
        ..raw_zip::file("secret.txt", b"xxxxxxxxxxxxxxxx")
    };
    vec![
        Case {
            name: "traversal",
            entries: vec![
                raw_zip::file("ok.txt", b"ok"),
                raw_zip::file("../evil.txt", b"evil"),
            ],
            flags: &[],
            want: &["\"../evil.txt\"", "`..` components are not allowed"],
        },
        Case {
            name: "nested traversal",
            entries: vec![raw_zip::file("a/../../evil.txt", b"evil")],
            flags: &[],
            want: &["a/../../evil.txt", "`..`"],
        },
        Case {
            name: "absolute path",
            entries: vec![raw_zip::file(abs, b"evil")],
            flags: &[],
            want: &["evil.txt", "absolute paths are not allowed"],
        },
        Case {
            name: "backslash",
            entries: vec![raw_zip::file("..\\evil.txt", b"evil")],
            flags: &[],
            want: &["evil.txt", "backslashes"],
        },
        Case {
            name: "duplicate names",
            entries: vec![raw_zip::file("a.txt", b"one"), raw_zip::file("a.txt", b"two")],
            flags: &[],
            want: &["duplicate"],
        },
        Case {
            name: "file and dir with one name",
            entries: vec![raw_zip::file("a", b"file"), raw_zip::dir("a/")],
            flags: &[],
            want: &["\"a/\"", "duplicate name"],
        },
        Case {
            name: "symlink out, then write through it",
            entries: vec![
                raw_zip::symlink("link", "../../../outside"),
                raw_zip::file("link/evil.txt", b"evil"),
            ],
            flags: &[],
            want: &["link/evil.txt", "parent \"link\" is a file or symlink"],
        },
        Case {
            name: "symlink out",
            entries: vec![raw_zip::symlink("link", "../../outside/sentinel.txt")],
            flags: &[],
            want: &["\"link\"", "leaves the tree"],
        },
        Case {
            name: "absolute symlink",
            entries: vec![raw_zip::symlink("link", "/etc/passwd")],
            flags: &[],
            want: &["\"link\"", "leaves the tree"],
        },
        Case {
            name: "symlink dot-dot trick",
            entries: vec![raw_zip::symlink("c", "."), raw_zip::symlink("a", "c/..")],
            flags: &[],
            want: &["leaves the tree"],
        },
        Case {
            name: "fifo",
            entries: vec![raw_zip::with_mode("pipe", 0o010644, b"")],
            flags: &[],
            want: &["\"pipe\"", "special files"],
        },
        Case {
            name: "char device",
            entries: vec![raw_zip::with_mode("null", 0o020666, b"")],
            flags: &[],
            want: &["\"null\"", "special files"],
        },
        Case {
            name: "block device",
            entries: vec![raw_zip::with_mode("sda", 0o060660, b"")],
            flags: &[],
            want: &["\"sda\"", "special files"],
        },
        Case {
            name: "socket",
            entries: vec![raw_zip::with_mode("sock", 0o140755, b"")],
            flags: &[],
            want: &["\"sock\"", "special files"],
        },
        Case {
            name: "encrypted",
            entries: vec![encrypted],
            flags: &[],
            want: &["secret.txt", "encrypted"],
        },
        Case {
            name: "non-UTF-8 name",
            entries: vec![bad_name],
            flags: &[],
            want: &["not UTF-8"],
        },
        Case {
            name: "empty component",
            entries: vec![raw_zip::file("a//b", b"x")],
            flags: &[],
            want: &["a//b", "empty or `.`"],
        },
        Case {
            name: "dot component",
            entries: vec![raw_zip::file("./a", b"x")],
            flags: &[],
            want: &["./a", "empty or `.`"],
        },
        Case {
            name: "too many entries",
            entries: (0..6)
                .map(|i| raw_zip::file(Box::leak(format!("f{i}").into_boxed_str()), b"x"))
                .collect(),
            flags: &["--max-zip-entries", "5"],
            want: &["6 entries, more than the limit of 5"],
        },
        Case {
            name: "declared bytes over the cap",
            entries: vec![
                raw_zip::file("a.bin", &[7; 600]),
                raw_zip::file("b.bin", &[8; 600]),
            ],
            flags: &["--max-unpacked-bytes", "1000"],
            want: &["b.bin", "more than the limit of 1000 bytes"],
        },
    ]
}

fn check_no_trace(ws: &Workspace, case: &str) {
    assert_eq!(
        std::fs::read_to_string(ws.path("outside/sentinel.txt")).unwrap(),
        SENTINEL,
        "{case}"
    );
    assert_eq!(
        tree_listing(&ws.path("outside")),
        ["sentinel.txt".to_string()].into_iter().collect(),
        "{case}: something was written outside"
    );
    let everywhere = tree_listing(ws.dir.path());
    assert!(
        !everywhere.iter().any(|p| p.contains("evil")),
        "{case}: {everywhere:?}"
    );
    assert!(ws.committed_packages().is_empty(), "{case}");
    assert!(ws.leftovers().is_empty(), "{case}: {:?}", ws.leftovers());
    let meta = crate::common::list_dir(&ws.store_v1("meta"));
    assert!(
        meta.is_empty(),
        "{case}: no marker or zip alias is kept: {meta:?}"
    );
}

#[test]
fn hostile_zips_are_rejected_whole() {
    let ws = Workspace::new();
    ws.write("outside/sentinel.txt", SENTINEL);
    let spec = ws.spec("env.json", &json!({"working_dir": "hostile.zip"}));
    for case in cases(&ws.path("outside")) {
        std::fs::write(ws.path("hostile.zip"), raw_zip::build(&case.entries)).unwrap();
        let (code, stderr) = ws.build_fails(&spec, case.flags);
        assert_eq!(code, 2, "{}: {stderr}", case.name);
        for want in case.want {
            assert!(
                stderr.contains(want),
                "{}: stderr {stderr:?} lacks {want:?}",
                case.name
            );
        }
        assert!(
            stderr.contains("hostile.zip"),
            "{}: the archive is named: {stderr}",
            case.name
        );
        check_no_trace(&ws, case.name);
    }
}

/// A deflated entry whose headers claim 100 bytes but which inflates to 8 MiB: the cap is
/// on bytes actually produced, not on what the headers say.
#[test]
fn lying_sizes_cannot_get_past_the_cap() {
    let ws = Workspace::new();
    ws.write("outside/sentinel.txt", SENTINEL);
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("bomb.txt", options).unwrap();
    zip.write_all(&vec![0u8; 8 << 20]).unwrap();
    let mut bytes = zip.finish().unwrap().into_inner();
    // Local header: uncompressed size at offset 22. Central directory: at +24.
    assert_eq!(&bytes[..4], b"PK\x03\x04");
    bytes[22..26].copy_from_slice(&100u32.to_le_bytes());
    let cd = bytes.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    bytes[cd + 24..cd + 28].copy_from_slice(&100u32.to_le_bytes());
    std::fs::write(ws.path("bomb.zip"), &bytes).unwrap();

    let spec = ws.spec("env.json", &json!({"working_dir": "bomb.zip"}));
    let (code, stderr) = ws.build_fails(&spec, &["--max-unpacked-bytes", "1000000"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("bomb.txt"), "{stderr}");
    check_no_trace(&ws, "lying sizes");
}

#[test]
fn not_a_zip_is_rejected() {
    let ws = Workspace::new();
    ws.write("outside/sentinel.txt", SENTINEL);
    ws.write("junk.zip", b"this is not a zip file at all".repeat(10));
    let (code, stderr) = ws.build_fails(&ws.spec("env.json", &json!({"working_dir": "junk.zip"})), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("junk.zip: not a readable zip"), "{stderr}");
    check_no_trace(&ws, "junk");
}

#[test]
fn setuid_and_world_write_bits_never_reach_the_disk() {
    let ws = Workspace::new();
    let entries = vec![
        raw_zip::with_mode("tool", 0o106777, b"#!/bin/sh\n"),
        raw_zip::with_mode("data.txt", 0o100666, b"data"),
        raw_zip::with_mode("sub/", 0o043777, b""),
        Entry {
            name: b"dos.txt".to_vec(),
            mode: None,
            data: b"made on DOS".to_vec(),
            flags: 0,
        },
    ];
    std::fs::write(ws.path("modes.zip"), raw_zip::build(&entries)).unwrap();
    let built = ws.build(&ws.spec("env.json", &json!({"working_dir": "modes.zip"})));
    let wd = Path::new(built["working_dir"].as_str().unwrap());
    assert_eq!(mode_of(&wd.join("tool")), 0o555);
    assert_eq!(mode_of(&wd.join("data.txt")), 0o444);
    assert_eq!(mode_of(&wd.join("sub")), 0o555);
    assert_eq!(
        std::fs::read_to_string(wd.join("dos.txt")).unwrap(),
        "made on DOS"
    );
}
