//! `fake-kube ADDR TOKEN=NODE…`: the one Kubernetes API the CA uses,
//! TokenReview, answered from a table. Tokens bound to a node review as the
//! node agents' service account with the node-name extra a bound token has.

use std::{collections::HashMap, sync::Arc};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

pub async fn serve(addr: &str, table: &[&str]) -> Result<()> {
    let tokens: Arc<HashMap<String, String>> = Arc::new(
        table
            .iter()
            .filter_map(|t| t.split_once('='))
            .map(|(t, n)| (t.to_owned(), n.to_owned()))
            .collect(),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "{}",
        json!({"event": "listening", "local": listener.local_addr()?.to_string()})
    );
    loop {
        let (tcp, _) = listener.accept().await?;
        let tokens = tokens.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let tokens = tokens.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let token = review["spec"]["token"].as_str().unwrap_or_default();
                    println!("{}", json!({"event": "tokenreview", "path": path}));
                    let status = match tokens.get(token) {
                        Some(node) => json!({
                            "authenticated": true,
                            "user": {
                                "username": "system:serviceaccount:mesh-system:mesh-agent",
                                "extra": {"authentication.kubernetes.io/node-name": [node]},
                            },
                        }),
                        None => json!({"authenticated": false, "error": "invalid bearer token"}),
                    };
                    let out = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status});
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        out.to_string(),
                    ))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
