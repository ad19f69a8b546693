//! `/v1/packages/{digest}`: is the package stored (`HEAD`), upload it (`PUT`, the zip as
//! the body; with a shared remote, pushed there before the answer).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiResult, AppState};
use crate::daemon::error::ApiError;
use crate::daemon::packages;
use crate::digest::PackageDigest;

fn parse_digest(digest: &str) -> ApiResult<PackageDigest> {
    digest.parse().map_err(|_| {
        ApiError::bad_request(
            "digest",
            format!("expected 64 lowercase hex digits, got {digest:?}"),
        )
    })
}

pub(super) async fn has(State(app): AppState, Path(digest): Path<String>) -> ApiResult<StatusCode> {
    let digest = parse_digest(&digest)?;
    if packages::has(&app.daemon.store, digest)? {
        Ok(StatusCode::OK)
    } else {
        Ok(StatusCode::NOT_FOUND)
    }
}

/// Streams the zip into the store (capped); it is published only if it is the package the
/// URL names.
pub(super) async fn put(
    State(app): AppState,
    Path(digest): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let digest = parse_digest(&digest)?;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let uploaded = packages::put(
        &app.daemon.store,
        digest,
        declared,
        body.into_data_stream(),
        app.limits.idle,
    )
    .await?;
    let mut answer =
        json!({"digest": digest.to_string(), "created": uploaded.created, "files": uploaded.files});
    if let Some(pushed) = packages::push(&app.daemon.store, &app.daemon.remotes, digest).await? {
        answer["pushed"] = json!(pushed);
    }
    Ok(Json(answer))
}
