//! Integration tests: the real `renv` binary on real files in temp dirs.
//! One test binary (modules below) so the suite links once.

mod common;

mod concurrency;
mod crash;
mod daemon;
mod daemon_limits;
mod digest;
mod excludes;
mod hostile_zips;
mod prune;
mod py_modules;
mod python_sdk;
mod remote;
mod restart;
mod spec_cli;
mod store_safety;
mod venv_templates;
mod venvs;
mod zip_safety;
mod zips;
