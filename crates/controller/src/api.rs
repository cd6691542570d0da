//! The REST API: JSON over HTTP, bearer-token authentication on every route but
//! `/health`, errors as `{"error": "..."}` with a 4xx or 5xx status. The OpenAPI document
//! (`openapi.json` beside this crate's sources) describes every route and is served at
//! `/openapi.json`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body as RequestBody;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use strata_iscsi::IscsiServer;
use strata_volume::{Layout, VolumeRequest};

use crate::controller::Controller;
use crate::exports::{ChapRecord, ExportRecord, ISCSI, NBD};
use crate::failure::{Failure, FailureKind};
use crate::metrics::{Frontends, Protocol};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");
/// Largest request body read; larger ones are refused with 413 (API bodies are a few
/// hundred bytes).
pub const MAX_BODY: usize = 1 << 20;

/// What every handler can reach.
pub struct ApiState {
    /// The controller.
    pub controller: Arc<Controller>,
    /// The bearer token clients must present.
    pub token: String,
    /// The iSCSI target, for session counts.
    pub iscsi: Arc<IscsiServer>,
    /// Where the API listens, for status.
    pub api_addr: String,
    /// When the controller started.
    pub started: Instant,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// The shared byte budget and the listeners, for their metrics.
    pub frontends: Frontends,
}

type Shared = State<Arc<ApiState>>;

/// An error answer.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        let status = match f.kind {
            FailureKind::BadRequest => StatusCode::BAD_REQUEST,
            FailureKind::NotFound => StatusCode::NOT_FOUND,
            FailureKind::Conflict => StatusCode::CONFLICT,
            FailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, f.message)
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match r.status() {
            status @ (StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::PAYLOAD_TOO_LARGE) => status,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, format!("invalid request body: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        bad_request(format!("invalid query: {}", r.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        bad_request(format!("invalid path: {}", r.body_text()))
    }
}

/// A JSON body whose rejections are JSON errors too.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
struct Body<T>(T);

/// A query string whose rejections are JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
struct Query<T>(T);

/// A path parameter whose rejections are JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
struct Path<T>(T);

type Answer = Result<Response, ApiError>;

fn ok(value: impl serde::Serialize) -> Answer {
    Ok(Json(value).into_response())
}

fn created(value: impl serde::Serialize) -> Answer {
    Ok((StatusCode::CREATED, Json(value)).into_response())
}

/// The API's routes over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/devices", get(list_devices).post(add_device))
        .route("/v1/devices/scan", post(scan_devices))
        .route("/v1/devices/{id}", get(show_device).delete(remove_device))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/map", get(map_volume))
        .route("/v1/exports", get(list_exports).post(add_export))
        .route("/v1/exports/{volume}", axum::routing::delete(remove_export))
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route("/health", get(health))
        .fallback(|| async {
            ApiError(StatusCode::NOT_FOUND, "no such route; GET /openapi.json lists the API".into())
        })
        .with_state(state)
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authenticate(State(state): Shared, headers: HeaderMap, request: Request, next: Next) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if same(token.as_bytes(), state.token.as_bytes()) => next.run(request).await,
        Some(_) => ApiError(
            StatusCode::UNAUTHORIZED,
            "the API token is wrong; use the one in the controller's data directory".into(),
        )
        .into_response(),
        None => {
            ApiError(StatusCode::UNAUTHORIZED, "missing bearer token (Authorization: Bearer TOKEN)".into())
                .into_response()
        }
    }
}

/// Reads an authenticated request's body within [`MAX_BODY`] and the body timeout, so a
/// client can neither make the controller hold a large body nor hold a connection by
/// sending one slowly; unauthenticated requests never get this far.
async fn read_body(State(state): Shared, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, RequestBody::from(bytes))).await,
        Ok(Err(e)) if too_large(&e) => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the API accepts ({MAX_BODY} bytes)"),
        )
        .into_response(),
        Ok(Err(e)) => bad_request(format!("cannot read the request body: {e}")).into_response(),
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {} ms", state.body_timeout.as_millis()),
        )
        .into_response(),
    }
}

/// Whether reading a body failed because it is over the limit.
fn too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(state): Shared) -> Response {
    let nbd_connections = state.frontends.connections(Protocol::nbd);
    state.controller.update_gauges(nbd_connections, state.iscsi.sessions()).await;
    state.controller.metrics.update_frontends(&state.frontends);
    let body = state.controller.metrics.render();
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
        .into_response()
}

async fn status(State(state): Shared) -> Answer {
    let c = &state.controller;
    let pool = match c.pool() {
        Some(pool) => {
            let config = pool.config().await;
            json!({ "id": pool.id(), "name": config.name, "generation": config.generation })
        }
        None => Value::Null,
    };
    let devices = c.devices().await;
    let volumes = c.volumes();
    let count = |s: strata_volume::VolumeState| volumes.iter().filter(|v| v.state == s).count();
    ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "data_dir": c.data_dir(),
        "api": state.api_addr,
        "nbd": c.nbd_addr.get().map(|a| a.to_string()),
        "iscsi": c.iscsi_addr.get().map(|a| a.to_string()),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "pool": pool,
        "devices": {
            "total": devices.len(),
            "online": devices.iter().filter(|d| d.state == strata_pool::DeviceState::Online).count(),
            "missing": devices.iter().filter(|d| d.state == strata_pool::DeviceState::Missing).count(),
        },
        "volumes": {
            "total": volumes.len(),
            "healthy": count(strata_volume::VolumeState::Healthy),
            "degraded": count(strata_volume::VolumeState::Degraded),
            "failed": count(strata_volume::VolumeState::Failed),
        },
        "exports": c.exports().len(),
        "nbd_connections": state.frontends.connections(Protocol::nbd),
        "iscsi_sessions": state.iscsi.sessions(),
        "startup": startup(c.discovery()),
    }))
}

/// What start-up found that an operator should look at.
fn startup(d: &strata_pool::Discovery) -> Value {
    let pairs = |list: &[(String, String)], key: &str| -> Vec<Value> {
        list.iter().map(|(name, why)| json!({ key: name, "reason": why })).collect()
    };
    json!({
        "damaged_devices": pairs(&d.damaged, "device"),
        "foreign_devices": d.foreign.iter().map(|(name, pool)| json!({ "device": name, "pool": pool })).collect::<Vec<_>>(),
        "missing_devices": d.missing,
        "failed_volumes": pairs(&d.failed_volumes, "volume"),
        "repaired": d.repaired,
    })
}

async fn list_devices(State(state): Shared) -> Answer {
    ok(state.controller.devices().await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDevice {
    path: PathBuf,
    #[serde(default)]
    create_size_bytes: Option<u64>,
    #[serde(default)]
    fault_domain: Option<String>,
    /// Overwrite a foreign signature or data where the labels go.
    #[serde(default)]
    force: bool,
}

async fn add_device(State(state): Shared, Body(body): Body<AddDevice>) -> Answer {
    if body.create_size_bytes == Some(0) {
        return Err(bad_request("create_size_bytes must be more than zero"));
    }
    if body.fault_domain.as_deref().is_some_and(|d| d.is_empty() || d.len() > 64) {
        return Err(bad_request("fault_domain must be 1 to 64 characters"));
    }
    let added = state
        .controller
        .add_device(&body.path, body.create_size_bytes, body.fault_domain, body.force)
        .await?;
    created(state.controller.added(added).await)
}

async fn show_device(State(state): Shared, Path(id): Path<String>) -> Answer {
    ok(state.controller.device(&id).await?)
}

async fn remove_device(State(state): Shared, Path(id): Path<String>) -> Answer {
    state.controller.remove_device(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn scan_devices(State(state): Shared) -> Answer {
    ok(state.controller.scan().await)
}

async fn list_volumes(State(state): Shared) -> Answer {
    ok(state.controller.volumes())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolume {
    name: String,
    size_bytes: u64,
    #[serde(default)]
    layout: Option<String>,
    #[serde(default)]
    copies: Option<u32>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    chunk_bytes: Option<u64>,
}

async fn create_volume(State(state): Shared, Body(body): Body<CreateVolume>) -> Answer {
    let layout: Layout = match body.layout.as_deref() {
        None => Layout::Linear,
        Some(text) => text.parse().map_err(|e: strata_volume::LayoutError| bad_request(e.to_string()))?,
    };
    if body.size_bytes == 0 {
        return Err(bad_request("size_bytes must be more than zero"));
    }
    let mut request = VolumeRequest::new(body.size_bytes, layout);
    request.copies = body.copies.or(request.copies);
    request.width = body.width.or(request.width);
    request.chunk = body.chunk_bytes.or(request.chunk);
    created(state.controller.create_volume(&body.name, request).await?)
}

async fn show_volume(State(state): Shared, Path(name): Path<String>) -> Answer {
    let (info, tree) = state.controller.volume(&name).await?;
    let mut value = serde_json::to_value(info).expect("volume info serializes");
    value["tree"] = serde_json::to_value(tree).expect("tree serializes");
    ok(value)
}

async fn delete_volume(State(state): Shared, Path(name): Path<String>) -> Answer {
    state.controller.delete_volume(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapQuery {
    offset: u64,
}

async fn map_volume(State(state): Shared, Path(name): Path<String>, Query(q): Query<MapQuery>) -> Answer {
    let locations = state.controller.map(&name, q.offset).await?;
    ok(json!({ "volume": name, "offset": q.offset, "locations": locations }))
}

async fn list_exports(State(state): Shared) -> Answer {
    ok(state.controller.exports())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddExport {
    volume: String,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    allow_any: bool,
    #[serde(default)]
    lun: Option<u64>,
    #[serde(default)]
    chap: Option<ChapRecord>,
    #[serde(default)]
    mutual_chap: Option<ChapRecord>,
    #[serde(default)]
    block_size: Option<u32>,
    #[serde(default)]
    removable: bool,
}

async fn add_export(State(state): Shared, Body(body): Body<AddExport>) -> Answer {
    let protocol = body.protocol.unwrap_or_else(|| NBD.into());
    let name = match body.name {
        Some(name) => name,
        None if protocol == ISCSI => state.controller.default_target_name(&body.volume)?,
        None => body.volume.clone(),
    };
    let record = ExportRecord {
        name,
        volume: body.volume,
        protocol,
        read_only: body.read_only,
        allow: body.allow,
        allow_any: body.allow_any,
        lun: body.lun,
        chap: body.chap,
        mutual_chap: body.mutual_chap,
        block_size: body.block_size,
        removable: body.removable,
    };
    created(state.controller.add_export(record).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveExportQuery {
    #[serde(default)]
    protocol: Option<String>,
}

async fn remove_export(
    State(state): Shared,
    Path(volume): Path<String>,
    Query(q): Query<RemoveExportQuery>,
) -> Answer {
    state.controller.remove_export(&volume, q.protocol.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
