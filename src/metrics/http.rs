//! A minimal HTTP/1.1 responder for `--metrics ADDR`: `GET /metrics` (the Prometheus text
//! format) and `GET /healthz` (for load balancers), nothing else.
//!
//! Two endpoints do not justify an HTTP framework: requests are read with a deadline and a
//! size bound, parsed with `httparse`, answered, and the connection closed. At most
//! [`MAX_CONNECTIONS`] are served at once; the rest wait in the kernel's backlog.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request and read the answer.
const DEADLINE: Duration = Duration::from_secs(5);

/// What the endpoints answer: the exposition text, and whether the process is healthy.
pub struct Endpoints {
    /// Renders `/metrics`.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// `/healthz` answers 200 when this holds, else 503.
    pub healthy: Box<dyn Fn() -> bool + Send + Sync>,
}

/// Serves `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>, shutdown: impl Future<Output = ()>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = &mut shutdown => return,
        };
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(DEADLINE, answer(tcp, &endpoints)).await {
                tracing::debug!(%peer, error = %e, "metrics request timed out");
            }
            drop(permit);
        });
    }
}

async fn answer(mut tcp: TcpStream, endpoints: &Endpoints) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let (status, ctype, body, head_only) = loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => break route(&req, endpoints),
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                break (431, "text/plain", "request header too large\n".into(), false)
            }
            Err(_) => break (400, "text/plain", "bad request\n".into(), false),
        }
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    tcp.write_all(out.as_bytes()).await?;
    if !head_only {
        tcp.write_all(body.as_bytes()).await?;
    }
    tcp.shutdown().await
}

/// Status, content type, body, and whether to send the head only.
fn route(req: &httparse::Request<'_, '_>, endpoints: &Endpoints) -> (u16, &'static str, String, bool) {
    let head_only = req.method == Some("HEAD");
    if !matches!(req.method, Some("GET") | Some("HEAD")) {
        return (405, "text/plain", "only GET and HEAD\n".into(), false);
    }
    // The query string, if any, does not select anything.
    let path = req.path.unwrap_or("").split('?').next().unwrap_or("");
    match path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            (endpoints.metrics)(),
            head_only,
        ),
        "/healthz" if (endpoints.healthy)() => (200, "text/plain", "ok\n".into(), head_only),
        "/healthz" => (503, "text/plain", "unhealthy\n".into(), head_only),
        _ => (404, "text/plain", "try /metrics or /healthz\n".into(), head_only),
    }
}

/// Binds the metrics listener; errors name the address.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("metrics listener (HTTP) {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    #[tokio::test]
    async fn metrics_healthz_and_refusals() {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h2 = healthy.clone();
        let endpoints = Arc::new(Endpoints {
            metrics: Box::new(|| "x_total 1\n".into()),
            healthy: Box::new(move || h2.load(std::sync::atomic::Ordering::Relaxed)),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(l, endpoints, async {
            let _ = rx.await;
        }));
        let r = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.ends_with("\r\n\r\nx_total 1\n"), "{r}");
        let r = get(addr, b"GET /healthz?probe=1 HTTP/1.0\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK") && r.ends_with("ok\n"), "{r}");
        healthy.store(false, std::sync::atomic::Ordering::Relaxed);
        let r = get(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        let r = get(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\n"), "{r}");
        let r = get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 405") && r.contains("Allow: GET, HEAD"),
            "{r}"
        );
        let r = get(addr, b"GET /secret HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(addr, b"\x00\x01garbage\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 10_000));
        let r = get(addr, &huge).await;
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
