//! Errors as HTTP responses: a status and the KServe v2 error body `{"error": "..."}`.
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (back-pressure).
    pub retry_after: Option<u64>,
    /// A full queue (gRPC: RESOURCE_EXHAUSTED rather than UNAVAILABLE).
    pub exhausted: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), retry_after: None, exhausted: false }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            retry_after: Some(retry_after),
            exhausted: false,
        }
    }
    /// Back-pressure: a full queue (503 with Retry-After over HTTP, RESOURCE_EXHAUSTED over gRPC).
    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError { exhausted: true, ..ApiError::unavailable(message, 1) }
    }

    /// A runtime error from running a request: the caller's fault (shape, dtype, names) or the server's.
    pub fn from_runtime(e: &edgepack_runtime::Error) -> ApiError {
        use edgepack_runtime::Error as E;
        let status = match e {
            E::UnknownInput { .. }
            | E::MissingInput { .. }
            | E::InputDType { .. }
            | E::InputShape { .. }
            | E::InvalidTensor(_)
            | E::Image(_)
            | E::UnknownValue { .. }
            | E::Npy(_)
            | E::Processing(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut r = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
