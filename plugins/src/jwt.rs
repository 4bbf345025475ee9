//! JWT authentication (the Kairos gateway's): a token from
//! `Authorization: Bearer` or the `access_token` query parameter, verified
//! with HS256/384/512 (a `secret`) or RS256/ES256 (a `public_key_file` in
//! PEM), with `iss`, `aud`, `exp` and `nbf` checked under a leeway. A failure
//! is HTTP 401 with `WWW-Authenticate`; the verified claims go upstream (mux
//! `open.claims`, or a header in direct mode).
//!
//! [`JwtSettings`] is also the shape of the top-level `jwt` section that
//! routes with `auth_required: true` use.

use std::time::Duration;

use http::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::values::{Secret, Text};
use crate::{BuildError, HandshakeCtx, Plugin, Rejection};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// HMAC secret (use `${ENV}`); or `public_key_file`.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// PEM public key (RSA or EC).
    #[serde(default)]
    pub public_key_file: Option<Text>,
    /// Accepted algorithms; default HS256/384/512 with a secret, RS256 with
    /// an RSA key, ES256 with an EC key.
    #[serde(default)]
    pub algorithms: Option<Vec<Algorithm>>,
    #[serde(default)]
    pub issuer: Option<Text>,
    #[serde(default)]
    pub audience: Option<Text>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(
        default = "default_leeway",
        deserialize_with = "crate::values::duration"
    )]
    pub leeway: Duration,
    /// The query parameter that may carry the token.
    #[serde(default = "default_query_param")]
    pub query_param: String,
    /// Direct mode: the request header that carries the verified claims
    /// (JSON) upstream.
    #[serde(default = "default_claims_header")]
    pub claims_header: String,
}

fn default_leeway() -> Duration {
    Duration::from_secs(60)
}
fn default_query_param() -> String {
    "access_token".into()
}
fn default_claims_header() -> String {
    "x-muxgate-claims".into()
}

/// A built verifier.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    query_param: String,
    pub claims_header: http::HeaderName,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub fn build(s: &JwtSettings) -> Result<JwtVerifier, BuildError> {
        crate::jwt_crypto::install();
        let (key, default_algs) = match (&s.secret, &s.public_key_file) {
            (Some(secret), None) => {
                if secret.expose().is_empty() {
                    return Err(BuildError::new("secret", "must not be empty"));
                }
                (
                    DecodingKey::from_secret(secret.expose().as_bytes()),
                    vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                )
            }
            (None, Some(file)) => {
                let pem = std::fs::read(&**file)
                    .map_err(|e| BuildError::new("public_key_file", format!("{file}: {e}")))?;
                if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                    (k, vec![Algorithm::RS256])
                } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                    (k, vec![Algorithm::ES256])
                } else {
                    return Err(BuildError::new(
                        "public_key_file",
                        format!("{file} is not an RSA or EC public key in PEM"),
                    ));
                }
            }
            (None, None) => {
                return Err(BuildError::new(
                    "secret",
                    "needs `secret` or `public_key_file`",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(BuildError::new(
                    "public_key_file",
                    "give either `secret` or `public_key_file`, not both",
                ))
            }
        };
        let algorithms = s.algorithms.clone().unwrap_or(default_algs);
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = s.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = s.audience.is_some();
        if let Some(iss) = &s.issuer {
            validation.set_issuer(&[&**iss]);
        }
        if let Some(aud) = &s.audience {
            validation.set_audience(&[&**aud]);
        }
        let claims_header =
            http::HeaderName::from_bytes(s.claims_header.as_bytes()).map_err(|_| {
                BuildError::new(
                    "claims_header",
                    format!("{:?} is not a header name", s.claims_header),
                )
            })?;
        Ok(JwtVerifier {
            key,
            validation,
            query_param: s.query_param.clone(),
            claims_header,
        })
    }

    /// Verifies the request's token; returns its claims.
    pub fn verify(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> Result<serde_json::Value, Rejection> {
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let from_query = query.and_then(|q| {
            q.split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == self.query_param)
                .map(|(_, v)| v)
        });
        let Some(token) = bearer.or(from_query) else {
            return Err(unauthorized("missing token", None));
        };
        jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind::*;
                let why = match e.kind() {
                    ExpiredSignature => "token expired",
                    ImmatureSignature => "token not yet valid",
                    InvalidAudience => "wrong audience",
                    InvalidIssuer => "wrong issuer",
                    InvalidSignature => "bad signature",
                    InvalidAlgorithm => "algorithm not accepted",
                    _ => "invalid token",
                };
                unauthorized(why, Some(e.to_string()))
            })
    }
}

fn unauthorized(why: &'static str, detail: Option<String>) -> Rejection {
    let challenge = if why == "missing token" {
        HeaderValue::from_static(r#"Bearer realm="muxgate""#)
    } else {
        HeaderValue::from_str(&format!(
            r#"Bearer realm="muxgate", error="invalid_token", error_description="{why}""#
        ))
        .expect("ASCII challenge")
    };
    Rejection {
        status: http::StatusCode::UNAUTHORIZED,
        message: "unauthorized",
        detail: detail.map_or_else(|| why.to_string(), |d| format!("{why}: {d}")),
        headers: vec![(WWW_AUTHENTICATE, challenge)],
        reason: "jwt",
    }
}

/// The `jwt` plugin (handshake stage).
pub struct JwtPlugin(pub JwtVerifier);

impl JwtPlugin {
    pub fn build(s: &JwtSettings) -> Result<JwtPlugin, BuildError> {
        JwtVerifier::build(s)
            .map(JwtPlugin)
            .map_err(|e| BuildError::new(format!("settings.{}", e.field), e.message))
    }
}

impl Plugin for JwtPlugin {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn on_handshake(&self, ctx: &mut HandshakeCtx<'_>) -> Result<(), Rejection> {
        ctx.claims = Some(self.0.verify(ctx.headers, ctx.query)?);
        Ok(())
    }
}
