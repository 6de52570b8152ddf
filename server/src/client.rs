//! A small HTTP client of the API, for the CLI's client subcommands: JSON in, JSON out, one
//! HTTP/1.1 connection per request (the CLI makes few requests; the `work` loop's long-polls
//! dominate anyway). Plain `http://` only: put a TLS-terminating proxy in front of a remote
//! coordinator.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status; `kind` and `message` are from its JSON body.
    #[error("{status} {kind}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The body's `error` field.
        kind: String,
        /// The body's `message` field.
        message: String,
        /// For a misdirected request (421): each group of the request and the address of the
        /// coordinator serving it (`None`: none right now).
        owners: Option<BTreeMap<String, Option<String>>>,
    },
    /// The server could not be reached, or did not answer in time or in JSON.
    #[error("{0}")]
    Transport(String),
}

/// Most 421 answers one call follows (ownership may move while it is sent).
const MAX_REDIRECTS: usize = 3;

impl ClientError {
    /// For a 421: each group's owner (`None`: none right now).
    pub fn owners(&self) -> Option<&BTreeMap<String, Option<String>>> {
        match self {
            ClientError::Api {
                status: 421,
                owners,
                ..
            } => owners.as_ref(),
            _ => None,
        }
    }

    /// For a 421 whose groups are all served by one coordinator: its address.
    fn single_owner(&self) -> Option<String> {
        let owners = self.owners()?;
        let distinct: BTreeSet<&Option<String>> = owners.values().collect();
        match distinct.into_iter().collect::<Vec<_>>()[..] {
            [Some(owner)] => Some(owner.clone()),
            _ => None,
        }
    }

    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Transport(_) => None,
        }
    }
}

/// A coordinator's address and the token to present.
#[derive(Debug, Clone)]
pub struct Client {
    authority: String,
    token: Option<String>,
    timeout: Duration,
}

impl Client {
    /// A client of `server` (`http://host:port`, or `host:port`).
    pub fn new(server: &str, token: Option<String>) -> Result<Self, ClientError> {
        let authority = match server.split_once("://") {
            None => server,
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(ClientError::Transport(format!(
                    "{scheme}:// is not supported: use http:// (behind a TLS proxy if remote)"
                )))
            }
        }
        .trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(ClientError::Transport(format!(
                "{server:?} is not a server address: use http://host:port"
            )));
        }
        Ok(Self {
            authority: authority.to_string(),
            token,
            timeout: Duration::from_secs(90),
        })
    }

    /// This client's coordinator address (`host:port`).
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The same client, sent to the coordinator at `server` instead.
    pub fn at(&self, server: &str) -> Result<Self, ClientError> {
        Ok(Self {
            timeout: self.timeout,
            ..Self::new(server, self.token.clone())?
        })
    }

    /// Sends one request; returns the JSON body of a 2xx answer. A request misdirected to a
    /// coordinator that does not serve its groups (421) is sent again to the one that does,
    /// when a single one serves them all (nothing was done by the first); otherwise the 421
    /// is returned, with `owners`, for the caller to split the request.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut answered = self.call_here(method.clone(), path, body).await;
        for _ in 0..MAX_REDIRECTS {
            let Some(owner) = answered.as_ref().err().and_then(ClientError::single_owner) else {
                break;
            };
            answered = self.at(&owner)?.call_here(method.clone(), path, body).await;
        }
        answered
    }

    /// [`Client::call`] without following a 421.
    pub async fn call_here(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let (status, bytes) = tokio::time::timeout(self.timeout, self.send(method, path, body))
            .await
            .map_err(|_| ClientError::Transport(format!("{path}: no answer in time")))??;
        let json: Value = serde_json::from_slice(&bytes).map_err(|_| {
            ClientError::Transport(format!(
                "{path}: status {status}, not JSON: {}",
                String::from_utf8_lossy(&bytes)
            ))
        })?;
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let field = |k: &str| json[k].as_str().unwrap_or("").to_string();
        Err(ClientError::Api {
            status,
            kind: field("error"),
            message: field("message"),
            owners: serde_json::from_value(json["owners"].clone()).ok(),
        })
    }

    /// The text of a 2xx answer (for `/metrics`).
    pub async fn text(&self, path: &str) -> Result<String, ClientError> {
        let (status, bytes) = self.send(Method::GET, path, None).await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if (200..300).contains(&status) {
            Ok(text)
        } else {
            Err(ClientError::Transport(format!(
                "{path}: status {status}: {text}"
            )))
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Bytes), ClientError> {
        let transport = |e: &dyn std::fmt::Display| {
            ClientError::Transport(format!("{} {path}: {e}", self.authority))
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| transport(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(&e))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority);
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match body {
            Some(v) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|e| transport(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| transport(&e))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(&e))?
            .to_bytes();
        Ok((status, bytes))
    }
}
