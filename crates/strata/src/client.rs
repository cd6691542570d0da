//! The REST client behind every subcommand but `serve`.

use std::path::Path;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use strata_controller::controller::TOKEN_FILE;
use strata_controller::serve::ENDPOINTS_FILE;

/// Where the API is when nothing says otherwise.
const DEFAULT_URL: &str = "http://127.0.0.1:7480";

/// A client of one controller's API.
pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// Works out the URL and token from the flags, the environment and `data_dir`.
    pub fn new(api: Option<&str>, token: Option<&str>, data_dir: Option<&Path>) -> Result<Self, String> {
        let from_dir = |file: &str| data_dir.and_then(|d| std::fs::read_to_string(d.join(file)).ok());
        let base = match api {
            Some(url) => url.to_string(),
            None => from_dir(ENDPOINTS_FILE)
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .and_then(|v| v["api"].as_str().map(str::to_string))
                .unwrap_or_else(|| DEFAULT_URL.to_string()),
        };
        let base = if base.contains("://") { base } else { format!("http://{base}") };
        let token = match token {
            Some(t) => t.to_string(),
            None => match data_dir {
                Some(dir) => from_dir(TOKEN_FILE).map(|t| t.trim().to_string()).ok_or_else(|| {
                    format!(
                        "no API token in {}; is it a controller's data directory?",
                        dir.join(TOKEN_FILE).display()
                    )
                })?,
                None => {
                    return Err("no API token: pass --token, set STRATA_TOKEN, or point --data-dir at the \
                                controller's data directory"
                        .into());
                }
            },
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        Ok(Self { base: base.trim_end_matches('/').to_string(), token, http })
    }

    /// Sends a request; the answer's JSON, or the server's error message.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| {
            let why = if e.is_connect() { "connection refused".to_string() } else { root_cause(&e) };
            format!(
                "cannot reach the Strata API at {} ({why}); is `strata serve` running? Point --api or STRATA_API at it",
                self.base
            )
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| format!("reading the answer from {url}: {e}"))?;
        if status.is_success() {
            return Ok(if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            });
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{status} from {url}"));
        Err(match status {
            StatusCode::UNAUTHORIZED => format!("{message} (check --token, STRATA_TOKEN or --data-dir)"),
            _ => message,
        })
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
