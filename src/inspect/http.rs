//! HTTP/1.1 exchanges read off a decrypted stream (sans-IO), with `httparse`.
//!
//! [`Observer`] takes the client's bytes ([`Observer::request_bytes`]) and the origin's
//! ([`Observer::response_bytes`]) in order, follows each message's framing (RFC 9112 §6:
//! `Content-Length`, `Transfer-Encoding: chunked`, no body for HEAD, 1xx, 204 and 304
//! responses, a response delimited by the connection's close), pairs responses with
//! requests in order (pipelining included) and yields one [`Exchange`] per answered request.
//! A head longer than [`MAX_HEAD`] or that does not parse ends the observation: the stream
//! is then counted as not HTTP/1.1 (so is what follows a `101 Switching Protocols`).

use std::collections::VecDeque;

/// Most bytes a request or response head may take.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers a head may have.
const MAX_HEADERS: usize = 100;
/// Longest method and path kept for the audit line (longer ones are cut, marked `...`).
pub const MAX_PATH: usize = 2048;
/// Requests waiting for their response (pipelining) beyond which observation stops.
const MAX_PENDING: usize = 256;

/// One answered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// Request method.
    pub method: String,
    /// Request target (path and query) as sent, cut at [`MAX_PATH`].
    pub path: String,
    /// The `Host` header, if any.
    pub host: Option<String>,
    /// Response status code.
    pub status: u16,
    /// Bytes of the request body (after chunked decoding: payload bytes).
    pub request_body: u64,
    /// Bytes of the response body.
    pub response_body: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Reading a head.
    Head,
    /// `n` body bytes left.
    Length(u64),
    /// Chunked: reading a chunk-size line.
    ChunkSize,
    /// Chunked: `n` bytes of chunk data left, then CRLF.
    ChunkData(u64),
    /// Chunked: the CRLF after chunk data.
    ChunkEnd,
    /// Chunked: trailer lines until an empty one.
    Trailers,
    /// Until the connection closes (responses only).
    UntilClose,
}

struct Half {
    buf: Vec<u8>,
    body: Body,
    /// Body bytes of the message being read.
    size: u64,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: Vec::new(),
            body: Body::Head,
            size: 0,
        }
    }
}

struct Pending {
    method: String,
    path: String,
    host: Option<String>,
    body: u64,
    head: bool,
}

/// Follows one connection's HTTP/1.1 traffic.
pub struct Observer {
    req: Half,
    resp: Half,
    pending: VecDeque<Pending>,
    /// The exchange whose response is being read (status known).
    answering: Option<(Pending, u16)>,
    done: Vec<Exchange>,
    broken: Option<&'static str>,
    requests: u64,
}

impl Default for Observer {
    fn default() -> Self {
        Observer::new()
    }
}

fn cut(s: &str) -> String {
    if s.len() <= MAX_PATH {
        return s.to_owned();
    }
    let mut end = MAX_PATH;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn header<'h>(headers: &'h [httparse::Header<'_>], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The body framing the headers announce: chunked, a length, or `None` (none given).
fn framing(headers: &[httparse::Header<'_>]) -> Result<Option<Body>, &'static str> {
    if let Some(te) = header(headers, "transfer-encoding") {
        let te = String::from_utf8_lossy(te).to_ascii_lowercase();
        return if te.trim().ends_with("chunked") {
            Ok(Some(Body::ChunkSize))
        } else {
            Err("transfer-encoding without chunked")
        };
    }
    match header(headers, "content-length") {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|n| Some(Body::Length(n)))
            .ok_or("bad content-length"),
        None => Ok(None),
    }
}

impl Observer {
    /// An observer at the start of a connection.
    pub fn new() -> Observer {
        Observer {
            req: Half::new(),
            resp: Half::new(),
            pending: VecDeque::new(),
            answering: None,
            done: Vec::new(),
            broken: None,
            requests: 0,
        }
    }

    /// Why observation stopped (the stream is not, or no longer, HTTP/1.1).
    pub fn broken(&self) -> Option<&'static str> {
        self.broken
    }

    /// Whether at least one request parsed.
    pub fn saw_http(&self) -> bool {
        self.requests > 0
    }

    /// Exchanges completed since the last call.
    pub fn take(&mut self) -> Vec<Exchange> {
        std::mem::take(&mut self.done)
    }

    /// Client bytes, in order.
    pub fn request_bytes(&mut self, bytes: &[u8]) {
        if self.broken.is_some() {
            return;
        }
        self.req.buf.extend_from_slice(bytes);
        if let Err(why) = self.run_requests() {
            self.stop(why);
        }
    }

    /// Origin bytes, in order.
    pub fn response_bytes(&mut self, bytes: &[u8]) {
        if self.broken.is_some() {
            return;
        }
        self.resp.buf.extend_from_slice(bytes);
        if let Err(why) = self.run_responses() {
            self.stop(why);
        }
    }

    /// `n` bytes of the client's stream went by undecrypted: counted if they lie inside a
    /// body of known length (or to the close), else observation stops.
    pub fn request_gap(&mut self, n: u64) {
        if self.broken.is_some() || n == 0 {
            return;
        }
        match self.req.body {
            Body::Length(k) if n <= k && self.req.buf.is_empty() => {
                self.req.body = Body::Length(k - n);
                if let Some(p) = self.pending.back_mut() {
                    p.body += n;
                }
                if k == n {
                    self.req.body = Body::Head;
                }
            }
            _ => self.stop("request bytes went by undecrypted"),
        }
    }

    /// `n` bytes of the origin's stream went by undecrypted: counted if they lie inside a
    /// body of known length (or to the close), else observation stops.
    pub fn response_gap(&mut self, n: u64) {
        if self.broken.is_some() || n == 0 {
            return;
        }
        match self.resp.body {
            Body::Length(k) if n <= k && self.resp.buf.is_empty() => {
                self.resp.size += n;
                self.resp.body = Body::Length(k - n);
                if k == n {
                    self.complete_response();
                }
            }
            Body::UntilClose => self.resp.size += n,
            _ => self.stop("response bytes went by undecrypted"),
        }
    }

    /// The connection closed: a response delimited by the close is complete.
    pub fn finish(&mut self) {
        if self.resp.body == Body::UntilClose {
            self.complete_response();
        }
    }

    fn stop(&mut self, why: &'static str) {
        self.broken = Some(why);
        self.req.buf = Vec::new();
        self.resp.buf = Vec::new();
    }

    fn run_requests(&mut self) -> Result<(), &'static str> {
        loop {
            if self.req.body == Body::Head {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut r = httparse::Request::new(&mut headers);
                let n = match r.parse(&self.req.buf) {
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) if self.req.buf.len() > MAX_HEAD => {
                        return Err("request head too long")
                    }
                    Ok(httparse::Status::Partial) => return Ok(()),
                    Err(_) => return Err("not an HTTP/1.1 request"),
                };
                let body = framing(r.headers)?.unwrap_or(Body::Length(0));
                if self.pending.len() >= MAX_PENDING {
                    return Err("too many requests without a response");
                }
                let method = r.method.unwrap_or_default();
                self.pending.push_back(Pending {
                    method: cut(method),
                    path: cut(r.path.unwrap_or_default()),
                    host: header(r.headers, "host").map(|h| cut(&String::from_utf8_lossy(h))),
                    body: 0,
                    head: method.eq_ignore_ascii_case("HEAD"),
                });
                self.requests += 1;
                self.req.buf.drain(..n);
                self.req.body = body;
                self.req.size = 0;
            }
            let before = self.req.size;
            let more = body_step(&mut self.req)?;
            let grew = self.req.size - before;
            if let Some(p) = self.pending.back_mut() {
                p.body += grew;
            }
            if !more {
                return Ok(());
            }
        }
    }

    fn run_responses(&mut self) -> Result<(), &'static str> {
        loop {
            if self.resp.body == Body::Head {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut r = httparse::Response::new(&mut headers);
                let n = match r.parse(&self.resp.buf) {
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) if self.resp.buf.len() > MAX_HEAD => {
                        return Err("response head too long")
                    }
                    Ok(httparse::Status::Partial) => return Ok(()),
                    Err(_) => return Err("not an HTTP/1.1 response"),
                };
                let status = r.code.unwrap_or(0);
                let framing = framing(r.headers)?;
                self.resp.buf.drain(..n);
                if status == 101 {
                    return Err("switched protocols");
                }
                if (100..200).contains(&status) {
                    continue; // interim response: the final one follows
                }
                let Some(req) = self.pending.pop_front() else {
                    return Err("a response without a request");
                };
                let no_body = req.head || status == 204 || status == 304;
                self.resp.body = if no_body {
                    Body::Length(0)
                } else {
                    framing.unwrap_or(Body::UntilClose)
                };
                self.resp.size = 0;
                self.answering = Some((req, status));
            }
            let more = body_step(&mut self.resp)?;
            if self.resp.body == Body::Head {
                self.complete_response();
            }
            if !more {
                return Ok(());
            }
        }
    }

    fn complete_response(&mut self) {
        if let Some((req, status)) = self.answering.take() {
            self.done.push(Exchange {
                method: req.method,
                path: req.path,
                host: req.host,
                status,
                request_body: req.body,
                response_body: self.resp.size,
            });
        }
        self.resp.body = Body::Head;
        self.resp.size = 0;
    }
}

/// Consumes body bytes of `h`; `Ok(true)` when the message ended and more bytes may follow
/// (`h.body` is `Head` again), `Ok(false)` when it needs more input.
fn body_step(h: &mut Half) -> Result<bool, &'static str> {
    loop {
        match h.body {
            Body::Head => return Ok(true),
            Body::Length(0) => {
                h.body = Body::Head;
                return Ok(true);
            }
            Body::Length(n) => {
                let take = (h.buf.len() as u64).min(n);
                h.buf.drain(..take as usize);
                h.size += take;
                h.body = Body::Length(n - take);
                if n - take > 0 {
                    return Ok(false);
                }
            }
            Body::UntilClose => {
                h.size += h.buf.len() as u64;
                h.buf.clear();
                return Ok(false);
            }
            Body::ChunkSize => match httparse::parse_chunk_size(&h.buf) {
                Ok(httparse::Status::Complete((n, 0))) => {
                    h.buf.drain(..n);
                    h.body = Body::Trailers;
                }
                Ok(httparse::Status::Complete((n, size))) => {
                    h.buf.drain(..n);
                    h.body = Body::ChunkData(size);
                }
                Ok(httparse::Status::Partial) if h.buf.len() > 1024 => {
                    return Err("chunk size line too long")
                }
                Ok(httparse::Status::Partial) => return Ok(false),
                Err(_) => return Err("bad chunk size"),
            },
            Body::ChunkData(0) => h.body = Body::ChunkEnd,
            Body::ChunkData(n) => {
                let take = (h.buf.len() as u64).min(n);
                h.buf.drain(..take as usize);
                h.size += take;
                h.body = Body::ChunkData(n - take);
                if n - take > 0 {
                    return Ok(false);
                }
            }
            Body::ChunkEnd => {
                if h.buf.len() < 2 {
                    return Ok(false);
                }
                if &h.buf[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF");
                }
                h.buf.drain(..2);
                h.body = Body::ChunkSize;
            }
            Body::Trailers => {
                let Some(i) = h.buf.windows(2).position(|w| w == b"\r\n") else {
                    if h.buf.len() > MAX_HEAD {
                        return Err("trailers too long");
                    }
                    return Ok(false);
                };
                h.buf.drain(..i + 2);
                if i == 0 {
                    h.body = Body::Head;
                    return Ok(true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `reqs` and `resps` cut at the given points; returns what the observer saw.
    fn observe(reqs: &[u8], resps: &[u8], cuts: &[usize]) -> (Vec<Exchange>, Option<&'static str>) {
        let mut o = Observer::new();
        let feed = |bytes: &[u8], up: bool, o: &mut Observer| {
            let mut at = 0;
            for c in cuts {
                let c = (*c % (bytes.len() + 1)).max(at);
                if up {
                    o.request_bytes(&bytes[at..c]);
                } else {
                    o.response_bytes(&bytes[at..c]);
                }
                at = c;
            }
            if up {
                o.request_bytes(&bytes[at..]);
            } else {
                o.response_bytes(&bytes[at..]);
            }
        };
        feed(reqs, true, &mut o);
        feed(resps, false, &mut o);
        o.finish();
        (o.take(), o.broken())
    }

    fn message() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, (String, u16, u64, u64))> {
        (
            prop::sample::select(vec!["GET", "POST", "HEAD", "PUT"]),
            "/[a-z0-9/?=&]{0,20}",
            0usize..300,
            0usize..300,
            any::<bool>(),
            prop::sample::select(vec![200u16, 204, 304, 404, 500]),
        )
            .prop_map(|(m, path, qlen, rlen, chunked, status)| {
                let mut req = format!("{m} {path} HTTP/1.1\r\nHost: h\r\n").into_bytes();
                if chunked {
                    req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                    for c in vec![b'q'; qlen].chunks(77) {
                        req.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                        req.extend_from_slice(c);
                        req.extend_from_slice(b"\r\n");
                    }
                    req.extend_from_slice(b"0\r\n\r\n");
                } else {
                    req.extend_from_slice(format!("Content-Length: {qlen}\r\n\r\n").as_bytes());
                    req.extend(std::iter::repeat_n(b'q', qlen));
                }
                let bodyless = m == "HEAD" || status == 204 || status == 304;
                let mut resp = format!("HTTP/1.1 {status} X\r\nContent-Length: {rlen}\r\n\r\n").into_bytes();
                if !bodyless {
                    resp.extend(std::iter::repeat_n(b'r', rlen));
                }
                let want = (
                    format!("{m} {path}"),
                    status,
                    qlen as u64,
                    if bodyless { 0 } else { rlen as u64 },
                );
                (req, resp, want)
            })
    }

    proptest! {
        /// Well-formed keep-alive traffic gives one exchange per request with its exact
        /// method, path, status and body sizes, however the bytes are cut.
        #[test]
        fn exchanges_are_exact_whatever_the_cuts(msgs in prop::collection::vec(message(), 1..6), cuts in prop::collection::vec(any::<usize>(), 0..12)) {
            let mut reqs = Vec::new();
            let mut resps = Vec::new();
            for (q, r, _) in &msgs {
                reqs.extend_from_slice(q);
                resps.extend_from_slice(r);
            }
            let (got, broken) = observe(&reqs, &resps, &cuts);
            prop_assert_eq!(broken, None);
            let got: Vec<_> = got
                .into_iter()
                .map(|e| (format!("{} {}", e.method, e.path), e.status, e.request_body, e.response_body))
                .collect();
            let want: Vec<_> = msgs.into_iter().map(|m| m.2).collect();
            prop_assert_eq!(got, want);
        }

        /// Arbitrary bytes never panic, and cutting them differently never changes the verdict.
        #[test]
        fn arbitrary_bytes_are_observed_the_same_whatever_the_cuts(reqs in prop::collection::vec(any::<u8>(), 0..400), resps in prop::collection::vec(any::<u8>(), 0..400), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
            let whole = observe(&reqs, &resps, &[]);
            let cut = observe(&reqs, &resps, &cuts);
            prop_assert_eq!(whole, cut);
        }
    }

    #[test]
    fn pipelined_requests_with_each_framing_pair_with_their_responses() {
        let mut o = Observer::new();
        let reqs = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPOST /b?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloPUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-T: 1\r\n\r\nHEAD /d HTTP/1.1\r\n\r\n";
        // Byte by byte: every state must survive a split anywhere.
        for b in reqs.iter() {
            o.request_bytes(&[*b]);
        }
        let resps = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n";
        for b in resps.iter() {
            o.response_bytes(&[*b]);
        }
        assert_eq!(o.broken(), None);
        let got = o.take();
        let short: Vec<_> = got
            .iter()
            .map(|e| {
                (
                    e.method.as_str(),
                    e.path.as_str(),
                    e.status,
                    e.request_body,
                    e.response_body,
                )
            })
            .collect();
        assert_eq!(
            short,
            [
                ("GET", "/a", 200, 0, 3),
                ("POST", "/b?x=1", 201, 5, 4),
                ("PUT", "/c", 204, 5, 0),
                ("HEAD", "/d", 200, 0, 0),
            ]
        );
        assert_eq!(got[0].host.as_deref(), Some("h"));
    }

    #[test]
    fn gaps_inside_bodies_are_counted_elsewhere_they_stop_observation() {
        let mut o = Observer::new();
        o.request_bytes(b"GET /big HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
        o.response_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
        o.response_gap(80);
        o.response_bytes(b"0123456789HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n");
        let got = o.take();
        assert_eq!((got[0].path.as_str(), got[0].response_body), ("/big", 100));
        assert_eq!((got[1].path.as_str(), got[1].status), ("/next", 404));
        o.response_gap(5);
        assert_eq!(o.broken(), Some("response bytes went by undecrypted"));
    }

    #[test]
    fn a_response_until_close_completes_at_the_end() {
        let mut o = Observer::new();
        o.request_bytes(b"GET / HTTP/1.0\r\n\r\n");
        o.response_bytes(b"HTTP/1.0 200 OK\r\n\r\nsome bytes");
        assert!(o.take().is_empty());
        o.finish();
        assert_eq!(o.take()[0].response_body, 10);
    }

    #[test]
    fn other_protocols_and_oversized_heads_stop_observation() {
        let mut o = Observer::new();
        o.request_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00");
        o.request_bytes(b"\x00\x01\x02\x03\x04");
        assert!(o.broken().is_some());
        let mut o = Observer::new();
        o.request_bytes(b"\x16\x03\x01binary");
        assert!(o.broken().is_some());
        assert!(!o.saw_http());
        let mut o = Observer::new();
        o.request_bytes(b"GET /");
        o.request_bytes(&vec![b'a'; MAX_HEAD + 1]);
        assert_eq!(o.broken(), Some("request head too long"));
        let mut o = Observer::new();
        o.request_bytes(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n");
        assert_eq!(o.broken(), Some("bad content-length"));
    }
}
