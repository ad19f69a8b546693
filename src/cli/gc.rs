//! `renv ls` and `renv prune`.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

use super::{StoreArgs, print_stdout};
use crate::error::Error;
use crate::store::EntryInfo;
use crate::store::prune::PrunePolicy;
use crate::units::{parse_duration, parse_size};

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Evict least-recently-used entries until the store is at most this big (10G, 500MiB, bytes).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    max_size: Option<u64>,
    /// Remove entries unused for longer than this (90m, 12h, 7d).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    older_than: Option<Duration>,
    /// Never remove an entry younger than this.
    #[arg(long, value_parser = parse_duration, default_value = "10m", value_name = "DURATION")]
    min_age: Duration,
    /// Say what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

fn ago(unix: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = now.saturating_sub(unix);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

fn line(out: &mut String, e: &EntryInfo, note: &str) {
    let mut holders: Vec<String> = e.held_by.clone();
    if !e.holders.is_empty() {
        holders.push(format!("pids {:?}", e.holders));
    }
    let in_use = if holders.is_empty() {
        "-".to_string()
    } else {
        holders.join("; ")
    };
    let source = match &e.source {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let _ = writeln!(
        out,
        "{:<8} {}  {:>10}  created {:<8} used {:<8} in use: {in_use:<12} {source}{note}",
        e.kind,
        &e.id[..16],
        super::build::human_bytes(e.bytes),
        ago(e.created_unix),
        ago(e.last_used_unix),
    );
}

pub fn ls(args: LsArgs) -> Result<(), Error> {
    let store = args.store.open(None)?;
    let entries = store.list_entries()?;
    if args.json {
        return print_stdout(&format!("{}\n", serde_json::json!({"entries": entries})));
    }
    let mut out = String::new();
    for e in &entries {
        line(&mut out, e, "");
    }
    let total: u64 = entries.iter().map(|e| e.bytes).sum();
    let _ = writeln!(
        out,
        "{} entries, {}",
        entries.len(),
        super::build::human_bytes(total)
    );
    print_stdout(&out)
}

pub fn prune(args: PruneArgs) -> Result<(), Error> {
    let store = args.store.open(None)?;
    let policy = PrunePolicy {
        max_size: args.max_size,
        older_than: args.older_than,
        min_age: args.min_age,
        dry_run: args.dry_run,
    };
    let report = crate::maintenance::prune(&store, &policy)?;
    if args.json {
        return print_stdout(&format!(
            "{}\n",
            serde_json::to_value(&report).expect("serializable")
        ));
    }
    let mut out = String::new();
    let verb = if report.store.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for d in &report.store.removed {
        line(&mut out, &d.entry, &format!("  [{verb}: {}]", d.reason));
    }
    for d in report.store.kept.iter().filter(|d| d.reason != "within policy") {
        line(&mut out, &d.entry, &format!("  [kept: {}]", d.reason));
    }
    let _ = writeln!(
        out,
        "{verb} {} entries, {} freed ({} before){}",
        report.store.removed.len(),
        super::build::human_bytes(report.store.bytes_freed),
        super::build::human_bytes(report.store.bytes_before),
        if report.store.orphans_removed > 0 {
            format!(", {} orphaned directories", report.store.orphans_removed)
        } else {
            String::new()
        }
    );
    print_stdout(&out)
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Remove damaged entries that are not in use, so the next request rebuilds them.
    #[arg(long)]
    repair: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// Exit status 1 when a problem remains (unrepaired), so cron and scripts notice.
pub fn verify(args: VerifyArgs) -> Result<u8, Error> {
    let store = args.store.open(None)?;
    let report = crate::maintenance::verify(&store, args.repair)?;
    if args.json {
        print_stdout(&format!(
            "{}\n",
            serde_json::to_value(&report).expect("serializable")
        ))?;
    } else {
        let mut out = String::new();
        for p in &report.problems {
            let state = if p.repaired { "removed" } else { "kept" };
            let _ = writeln!(out, "{} {}: {} [{state}]", p.kind, p.id, p.problem);
        }
        let _ = writeln!(
            out,
            "{} entries checked, {} problems",
            report.checked,
            report.problems.len()
        );
        print_stdout(&out)?;
    }
    Ok(u8::from(report.problems.iter().any(|p| !p.repaired)))
}
