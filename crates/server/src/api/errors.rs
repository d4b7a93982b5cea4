//! Errors as the OpenAI and Anthropic APIs write them: the same status codes and JSON bodies,
//! so that their SDKs raise the exception a user would expect.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which API's error shape to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Anthropic,
}

impl Flavor {
    /// How this API's tool call ids begin.
    pub fn tool_call_id_prefix(self) -> &'static str {
        match self {
            Flavor::OpenAi => "call_",
            Flavor::Anthropic => "toolu_",
        }
    }

    /// The flavor a request path speaks.
    pub fn of_path(path: &str) -> Self {
        if path.starts_with("/v1/messages") {
            Flavor::Anthropic
        } else {
            Flavor::OpenAi
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    NotFound,
    TooLarge,
    Overloaded,
    Internal,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    pub flavor: Flavor,
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(flavor: Flavor, kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            flavor,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn invalid(flavor: Flavor, message: impl Into<String>) -> Self {
        Self::new(flavor, ErrorKind::InvalidRequest, message)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(&self) -> StatusCode {
        match (self.kind, self.flavor) {
            (ErrorKind::InvalidRequest, _) => StatusCode::BAD_REQUEST,
            (ErrorKind::Authentication, _) => StatusCode::UNAUTHORIZED,
            (ErrorKind::NotFound, _) => StatusCode::NOT_FOUND,
            (ErrorKind::TooLarge, _) => StatusCode::PAYLOAD_TOO_LARGE,
            (ErrorKind::Overloaded, Flavor::OpenAi) => StatusCode::SERVICE_UNAVAILABLE,
            // Anthropic's own status for an overloaded API.
            (ErrorKind::Overloaded, Flavor::Anthropic) => {
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            (ErrorKind::Internal, _) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body (also sent as an SSE event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        match self.flavor {
            Flavor::OpenAi => {
                let kind = match self.kind {
                    ErrorKind::Authentication => "authentication_error",
                    ErrorKind::Overloaded | ErrorKind::Internal => "server_error",
                    _ => "invalid_request_error",
                };
                json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})
            }
            Flavor::Anthropic => {
                let kind = match self.kind {
                    ErrorKind::InvalidRequest => "invalid_request_error",
                    ErrorKind::Authentication => "authentication_error",
                    ErrorKind::NotFound => "not_found_error",
                    ErrorKind::TooLarge => "request_too_large",
                    ErrorKind::Overloaded => "overloaded_error",
                    ErrorKind::Internal => "api_error",
                };
                json!({"type": "error", "error": {"type": kind, "message": self.message}})
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}
