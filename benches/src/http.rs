//! A keep-alive HTTP/1.1 connection to a coordinator, for the load generators.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    send: SendRequest<Full<Bytes>>,
    authority: String,
    token: String,
}

impl Conn {
    /// Connects to `authority` (`host:port`), presenting `token`.
    pub async fn open(authority: &str, token: &str) -> Conn {
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .expect("the coordinator accepts connections");
        stream.set_nodelay(true).unwrap();
        let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(connection);
        Conn {
            send,
            authority: authority.to_string(),
            token: token.to_string(),
        }
    }

    /// One request; the status and the JSON body (`null` if none).
    pub async fn call(&mut self, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let payload = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority)
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(payload))
            .unwrap();
        self.send.ready().await.expect("connection ready");
        let response = self.send.send_request(request).await.expect("a response");
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The same connection, presenting `token` from now on.
    pub fn with_token(mut self, token: &str) -> Conn {
        self.token = token.to_string();
        self
    }
}

/// Each of `groups`' coordinator address: `first` if it serves them all, else as the 421 of a
/// probe registration at `first` names them (coordinators sharing a database, `serve
/// --shared`). A probe worker that registered is removed again.
pub async fn owners(first: &str, token: &str, groups: &[String]) -> BTreeMap<String, String> {
    let mut conn = Conn::open(first, token).await;
    let (st, r) = conn
        .call(
            Method::POST,
            "/v1/workers",
            Some(&json!({ "groups": groups })),
        )
        .await;
    match st {
        201 => {
            let path = format!("/v1/admin/workers/{}", r["id"]);
            let (st, gone) = conn.call(Method::DELETE, &path, None).await;
            assert_eq!(st, 200, "{gone}");
            groups
                .iter()
                .map(|g| (g.clone(), first.to_string()))
                .collect()
        }
        421 => groups
            .iter()
            .map(|g| {
                let at = r["owners"][g].as_str().expect("every group has an owner");
                (g.clone(), at.to_string())
            })
            .collect(),
        _ => panic!("a probe registration answered {st}: {r}"),
    }
}
