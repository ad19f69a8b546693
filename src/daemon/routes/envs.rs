//! `/v1/envs`: get-or-create (taking a reference), release, list.
//!
//! The common answer to `POST /v1/envs` is an env that already exists; its body is
//! serialized once per env and kept in [`Answers`], so a cached get-or-create costs the
//! in-memory lookup in [`Daemon::get_or_create`](crate::daemon::state::Daemon::get_or_create),
//! the reference, and a copy of a reference-counted buffer.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiResult, AppState};
use crate::build::BuiltEnv;
use crate::daemon::error::ApiError;
use crate::daemon::peer::Caller;
use crate::daemon::state::Hold;
use crate::digest::EnvId;
use crate::store::Store;

/// The `POST /v1/envs` answer (`"created": false`) per env and user (the context names the
/// user's own bytecode cache), serialized once. Each is kept
/// with the env it describes: when the daemon rebuilds an env it holds a new `BuiltEnv`,
/// so an answer whose env is not that same one is stale and is made again.
const MAX_ANSWERS: usize = 16_384;

#[derive(Default)]
pub(super) struct Answers(Mutex<HashMap<AnswerKey, (Arc<BuiltEnv>, Bytes)>>);

/// An env, and the uid it was answered to.
type AnswerKey = (EnvId, u32);

impl Answers {
    fn existing(&self, built: &Arc<BuiltEnv>, store: &Store, caller: &Caller) -> Result<Bytes, ApiError> {
        let key = (built.env_id, caller.uid);
        if let Some((env, body)) = self.0.lock().unwrap().get(&key)
            && Arc::ptr_eq(env, built)
        {
            return Ok(body.clone());
        }
        let body = Bytes::from(env_json(built, store, caller, false)?.to_string());
        let mut answers = self.0.lock().unwrap();
        // A cache of what the state layer remembers: when it has forgotten many envs,
        // start over rather than keep their answers.
        if answers.len() >= MAX_ANSWERS {
            answers.clear();
        }
        answers.insert(key, (Arc::clone(built), body.clone()));
        Ok(body)
    }
}

fn env_json(built: &BuiltEnv, store: &Store, caller: &Caller, created: bool) -> Result<Value, ApiError> {
    let (working_dir_bytes, venv_bytes) = built.bytes();
    let context = built
        .context_for(store, caller.uid, caller.gid)
        .map_err(|e| ApiError::internal(format!("the caller's bytecode cache: {e}")))?;
    Ok(json!({
        "env_id": built.env_id.to_string(),
        "python": context.python,
        "cwd": context.cwd,
        "env": context.env,
        "working_dir": built.working_dir_path(),
        "venv": built.venv.as_ref().map(|e| e.path.clone()),
        "bytes": working_dir_bytes + venv_bytes,
        "created": created,
        "timings_ms": built.timings_ms,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateEnv {
    /// Kept as sent: its exact text is the key of the in-memory fast path.
    runtime_env: Box<serde_json::value::RawValue>,
    #[serde(rename = "ref")]
    tag: Option<String>,
}

pub(super) async fn create(
    State(app): AppState,
    Extension(caller): Extension<Arc<Caller>>,
    body: super::JsonBody,
) -> ApiResult<Response> {
    app.daemon.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let request: CreateEnv = app.parse_json(&body)?;
    super::check_label("ref", request.tag.as_deref())?;
    let (built, created) = app.daemon.get_or_create(&request.runtime_env, &caller).await?;
    app.daemon
        .hold(built.env_id, caller.uid, Hold::Reference(request.tag))
        .await?;
    let body = if created {
        Bytes::from(env_json(&built, &app.daemon.store, &caller, true)?.to_string())
    } else {
        app.answers.existing(&built, &app.daemon.store, &caller)?
    };
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Releases the last reference the caller took (the daemon's user and root: anyone's).
pub(super) async fn release(
    State(app): AppState,
    Extension(caller): Extension<Arc<Caller>>,
    Path(env_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let env_id: EnvId = env_id
        .parse()
        .map_err(|_| ApiError::bad_request("env_id", "expected 64 lowercase hex digits"))?;
    let refs = app.daemon.release_reference(env_id, &caller).await?;
    Ok(Json(json!({"env_id": env_id.to_string(), "refs": refs})))
}

/// The envs the caller holds references to or runs workers in (the daemon's user and
/// root: every env).
pub(super) async fn list(State(app): AppState, Extension(caller): Extension<Arc<Caller>>) -> Json<Value> {
    let mut list: Vec<Value> = app
        .daemon
        .envs(&caller)
        .into_iter()
        .map(|r| {
            let (working_dir_bytes, venv_bytes) = r.built.bytes();
            json!({
                "env_id": r.built.env_id.to_string(),
                "refs": r.refs,
                "ref_tags": r.ref_tags,
                "workers": r.workers,
                "working_dir": r.built.working_dir_path(),
                "python": r.built.context.python,
                "bytes": working_dir_bytes + venv_bytes,
                "working_dir_bytes": working_dir_bytes,
                "venv_bytes": venv_bytes,
                "last_used": r.last_used,
            })
        })
        .collect();
    // References restored at start-up whose env lost an entry while the daemon was down.
    list.extend(app.daemon.lost_envs(&caller).into_iter().map(|lost| {
        json!({
            "env_id": lost.env_id.to_string(),
            "refs": lost.refs,
            "ref_tags": lost.ref_tags,
            "workers": 0,
            "missing": true,
        })
    }));
    list.sort_by(|a, b| a["env_id"].as_str().cmp(&b["env_id"].as_str()));
    Json(json!({"envs": list}))
}
