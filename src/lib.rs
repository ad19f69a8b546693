//! renv: a per-node runtime-environment agent for Python cluster workers.
//!
//! The modules follow the data flow:
//!
//! ```text
//! spec      runtime_env JSON → RuntimeEnvSpec (strict, errors name the field)
//! resolve   → resolved parts: a package source, the requirement list (local paths read)
//! package   walk + manifest digest, zip writing and safe zip reading
//! store     content-addressed entries: layout, transactions, leases, prune, verify
//! sources   where packages come from (a local tree, a zip, an upload, pkg://), into the store
//! venv      the pip/uv fields: interpreter, installer, env key, build through the store
//! context   python, cwd, env for a worker
//! build     the whole pipeline, as `renv build` runs it
//! worker    starting a command in a built context
//! supervisor  a worker's parent process, which outlives the daemon and records its end
//! ```
//!
//! Who uses whom (each arrow points at what a module uses, and may skip layers: `venv`
//! uses `store` directly too; nothing points back up):
//!
//! ```text
//! cli ──▶ daemon ──▶ build ──▶ venv ──▶ resolve ──▶ sources ──▶ store ──▶ package ──▶ sys
//!  │        │          └──▶ context                              └──▶ spec     └──▶ digest
//!  │        ├──▶ maintenance ──▶ venv, store
//!  │        ├──▶ supervisor ──▶ worker, store, sys
//!  │        └──▶ worker ──▶ context, sys
//!  └──▶ client
//! error: every layer's error and its exit code, for build, daemon and cli
//! ```
//!
//! `daemon` serves all of this over a Unix socket; `client` talks to it; `cli` is a thin
//! shell over these. `sys` wraps the system calls beyond `std` and is the only module
//! allowed `unsafe`.

#![deny(unsafe_code)]

pub mod build;
pub mod cli;
pub mod client;
pub mod context;
pub mod daemon;
pub mod digest;
pub mod env_vars;
pub mod error;
pub mod maintenance;
pub mod package;
pub mod progress;
pub mod remote;
pub mod resolve;
pub mod sources;
pub mod spec;
pub mod store;
pub mod supervisor;
pub mod sys;
pub mod units;
pub mod venv;
pub mod worker;

pub use error::Error;
