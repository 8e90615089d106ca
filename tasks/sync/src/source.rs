//! Where records come from: the [`CatalogSource`] trait (one page of a stream at a time, cursor pagination
//! handed back as an opaque continuation) and its Shopify Admin REST implementation: `limit` ≤ 250, the
//! `Link` header's `page_info`, filters on the first page only, `X-Shopify-Access-Token`, and Shopify's leaky
//! bucket (40 requests, 2/s) respected before it fills, cluster-wide. A GraphQL source would implement the
//! same trait with a cost-based throttle (`extensions.cost`); see the README for what is missing.

use celeriac_task::SharedLimiter;
use futures::future::BoxFuture;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// A stream of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Products (with variants and images).
    Products,
    /// Orders.
    Orders,
    /// Customers.
    Customers,
}

impl Stream {
    /// The name used in tables, tasks and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Products => "products",
            Self::Orders => "orders",
            Self::Customers => "customers",
        }
    }

    /// Parses a stream name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "products" => Some(Self::Products),
            "orders" => Some(Self::Orders),
            "customers" => Some(Self::Customers),
            _ => None,
        }
    }

    /// Every stream.
    pub const ALL: [Stream; 3] = [Self::Products, Self::Orders, Self::Customers];
}

/// Which page to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageRequest {
    /// The first page, filtered (`updated_at_min` for an incremental pass).
    First {
        /// RFC 3339, inclusive.
        updated_at_min: Option<String>,
    },
    /// A continuation the source handed back.
    Next(String),
}

/// One page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The records, in the source's order.
    pub records: Vec<Value>,
    /// The continuation, `None` on the last page.
    pub next: Option<String>,
}

/// Why a page could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceError {
    /// 401/403: the token is wrong or lacks a scope; the source is disabled until fixed.
    Unauthorized {
        /// HTTP status.
        status: u16,
        /// The shop's message.
        message: String,
    },
    /// 5xx, 429 that persisted, connection errors: try again later from the saved page.
    Transient {
        /// What happened.
        message: String,
    },
    /// Any other refusal (400, 404): a bug or a misconfiguration.
    Rejected {
        /// HTTP status.
        status: u16,
        /// The shop's message.
        message: String,
    },
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unauthorized { status, message } => {
                write!(f, "the shop refused the token ({status}): {message}")
            }
            Self::Transient { message } => write!(f, "{message}"),
            Self::Rejected { status, message } => {
                write!(f, "the shop refused the request ({status}): {message}")
            }
        }
    }
}

/// Counted events of a fetch, for metrics.
pub trait FetchObserver: Send + Sync {
    /// An API call answered with `status` (0: no answer).
    fn call(&self, stream: Stream, status: u16);
    /// A wait for the rate limit (bucket full, or 429).
    fn throttled(&self, seconds: f64);
    /// The bucket's fill level as the shop reported it.
    fn bucket(&self, used: u32, capacity: u32);
}

/// A source of records.
pub trait CatalogSource: Send + Sync {
    /// One page of `stream`.
    fn fetch<'a>(
        &'a self,
        stream: Stream,
        page: &'a PageRequest,
        limiter: Option<&'a Arc<dyn SharedLimiter>>,
        observer: &'a dyn FetchObserver,
    ) -> BoxFuture<'a, Result<Page, SourceError>>;
}

/// Shopify's Admin REST API for one shop.
pub struct Shopify {
    http: reqwest::Client,
    base: String,
    version: String,
    token: String,
    page_size: u32,
    bucket_key: String,
    capacity: u32,
    margin: u32,
    leak_per_s: f64,
    max_tries: u32,
}

impl std::fmt::Debug for Shopify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shopify")
            .field("base", &self.base)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// How a Shopify source is set up.
#[derive(Debug, Clone)]
pub struct ShopifySettings {
    /// `https://shop.myshopify.com` (any scheme and host; a trailing `/` is fine).
    pub url: String,
    /// Admin API version (`2024-07`).
    pub api_version: String,
    /// The access token.
    pub token: String,
    /// Records per page (≤ 250).
    pub page_size: u32,
    /// The bucket's capacity (40).
    pub capacity: u32,
    /// Requests kept free in the bucket (another client of the shop may use them).
    pub margin: u32,
    /// Leak rate per second (2).
    pub leak_per_s: f64,
    /// Tries of one page (5xx, connection errors, 429) before the run gives up and resumes later.
    pub max_tries: u32,
    /// Seconds one call may take.
    pub timeout: f64,
}

impl Shopify {
    /// A client for one shop.
    pub fn new(s: &ShopifySettings) -> Result<Self, String> {
        let url = s.url.trim_end_matches('/').to_string();
        let parsed = url::Url::parse(&url).map_err(|e| format!("source url {url:?}: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(s.timeout))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            http,
            bucket_key: format!("shopify-bucket:{}", parsed.host_str().unwrap_or_default()),
            base: url,
            version: s.api_version.clone(),
            token: s.token.clone(),
            page_size: s.page_size.clamp(1, 250),
            capacity: s.capacity.max(2),
            margin: s.margin.min(s.capacity.saturating_sub(1)),
            leak_per_s: s.leak_per_s,
            max_tries: s.max_tries.max(1),
        })
    }

    /// The shop's host (the peer's name in health reports).
    pub fn host(&self) -> String {
        url::Url::parse(&self.base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// A continuation URL on the configured shop's origin: the token is never sent to another host (a
    /// `Link` naming one is followed on the configured origin, path and query kept).
    fn rebase(&self, link: &str) -> String {
        match (url::Url::parse(link), url::Url::parse(&self.base)) {
            (Ok(l), Ok(b)) if l.origin() != b.origin() => {
                let mut out = b;
                out.set_path(l.path());
                out.set_query(l.query());
                out.to_string()
            }
            _ => link.to_string(),
        }
    }

    fn first_url(&self, stream: Stream, updated_at_min: Option<&str>) -> String {
        let mut u = url::Url::parse(&format!(
            "{}/admin/api/{}/{}.json",
            self.base,
            self.version,
            stream.as_str()
        ))
        .expect("a valid base");
        {
            let mut q = u.query_pairs_mut();
            q.append_pair("limit", &self.page_size.to_string());
            if stream == Stream::Orders {
                q.append_pair("status", "any");
            }
            if let Some(t) = updated_at_min {
                q.append_pair("updated_at_min", t);
            }
        }
        u.to_string()
    }

    /// Waits for room in the shop's bucket (shared by every worker through Redis).
    async fn wait_for_room(
        &self,
        limiter: Option<&Arc<dyn SharedLimiter>>,
        observer: &dyn FetchObserver,
    ) {
        let Some(limiter) = limiter else { return };
        let interval = Duration::from_secs_f64(1.0 / self.leak_per_s);
        let burst = self.capacity - self.margin;
        loop {
            match limiter.take(&self.bucket_key, interval, burst).await {
                Ok(None) => return,
                Ok(Some(wait)) => {
                    observer.throttled(wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "shared rate limiter unavailable; pacing this worker alone");
                    tokio::time::sleep(interval).await;
                    return;
                }
            }
        }
    }
}

/// The `rel="next"` URL of a `Link` header.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<f64> {
    headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
}

impl CatalogSource for Shopify {
    fn fetch<'a>(
        &'a self,
        stream: Stream,
        page: &'a PageRequest,
        limiter: Option<&'a Arc<dyn SharedLimiter>>,
        observer: &'a dyn FetchObserver,
    ) -> BoxFuture<'a, Result<Page, SourceError>> {
        Box::pin(async move {
            let url = match page {
                PageRequest::First { updated_at_min } => {
                    self.first_url(stream, updated_at_min.as_deref())
                }
                PageRequest::Next(u) => u.clone(),
            };
            let mut last = String::new();
            for attempt in 0..self.max_tries {
                self.wait_for_room(limiter, observer).await;
                let resp = self
                    .http
                    .get(&url)
                    .header("X-Shopify-Access-Token", &self.token)
                    .send()
                    .await;
                let resp = match resp {
                    Ok(r) => r,
                    Err(e) => {
                        observer.call(stream, 0);
                        last = format!("cannot reach the shop: {e}");
                        tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                        continue;
                    }
                };
                let status = resp.status().as_u16();
                observer.call(stream, status);
                let headers = resp.headers().clone();
                if let Some((used, cap)) = headers
                    .get("x-shopify-shop-api-call-limit")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split_once('/'))
                    .and_then(|(a, b)| {
                        Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?))
                    })
                {
                    observer.bucket(used, cap);
                    // The shop says the bucket is nearly full (another client spends it too): let it drain.
                    if used + self.margin >= cap {
                        let wait = f64::from(used + self.margin + 1 - cap) / self.leak_per_s;
                        observer.throttled(wait);
                        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                    }
                }
                // A connection cut while the body arrives is an outage, not a refusal: try again.
                let body = match resp.text().await {
                    Ok(b) => b,
                    Err(e) => {
                        last = format!("the shop's answer ({status}) was cut off: {e}");
                        tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                        continue;
                    }
                };
                match status {
                    200 => {
                        let v: Value = match serde_json::from_str(&body) {
                            Ok(v) => v,
                            // Cut short without an error from the connection (it closed early): again.
                            Err(e) if e.is_eof() => {
                                last = format!("the page was cut off: {e}");
                                tokio::time::sleep(Duration::from_millis(200 << attempt.min(5)))
                                    .await;
                                continue;
                            }
                            Err(e) => {
                                return Err(SourceError::Rejected {
                                    status,
                                    message: format!("the page is not JSON: {e}"),
                                });
                            }
                        };
                        let records = v[stream.as_str()].as_array().cloned().ok_or_else(|| {
                            SourceError::Rejected {
                                status,
                                message: format!("the page has no {:?} list", stream.as_str()),
                            }
                        })?;
                        let next = headers
                            .get("link")
                            .and_then(|l| l.to_str().ok())
                            .and_then(next_link)
                            .map(|n| self.rebase(&n));
                        return Ok(Page { records, next });
                    }
                    429 => {
                        let wait = retry_after(&headers).unwrap_or(2.0);
                        observer.throttled(wait);
                        last = format!("429 from the shop: {body}");
                        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                    }
                    401 | 403 => {
                        return Err(SourceError::Unauthorized {
                            status,
                            message: body,
                        });
                    }
                    500..=599 => {
                        last = format!("{status} from the shop: {body}");
                        tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                    }
                    _ => {
                        return Err(SourceError::Rejected {
                            status,
                            message: body,
                        });
                    }
                }
            }
            Err(SourceError::Transient { message: last })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Quiet;
    impl FetchObserver for Quiet {
        fn call(&self, _: Stream, _: u16) {}
        fn throttled(&self, _: f64) {}
        fn bucket(&self, _: u32, _: u32) {}
    }

    /// A shop whose first two answers are cut off (a 200 whose body stops early, then one whose connection
    /// closes before its promised length) and whose third is whole: the page arrives, nothing is refused.
    #[tokio::test]
    async fn an_answer_cut_off_mid_body_is_tried_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&served);
        let server = tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let n = s.fetch_add(1, Ordering::SeqCst);
                let whole = r#"{"products": [{"id": 1}]}"#;
                let answer = match n {
                    0 => "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"products\": [".to_string(),
                    1 => "HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"products\"".to_string(),
                    _ => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{whole}",
                        whole.len()
                    ),
                };
                sock.write_all(answer.as_bytes()).await.unwrap();
                let _ = sock.shutdown().await;
            }
        });
        let shop = Shopify::new(&ShopifySettings {
            url: format!("http://{addr}"),
            api_version: "2024-07".into(),
            token: "t".into(),
            page_size: 50,
            capacity: 40,
            margin: 0,
            leak_per_s: 1000.0,
            max_tries: 5,
            timeout: 5.0,
        })
        .unwrap();
        let page = shop
            .fetch(
                Stream::Products,
                &PageRequest::First {
                    updated_at_min: None,
                },
                None,
                &Quiet,
            )
            .await
            .unwrap();
        assert_eq!(page.records.len(), 1);
        assert_eq!(served.load(Ordering::SeqCst), 3);
        server.abort();
    }

    #[test]
    fn link_headers_give_the_next_page() {
        let link = "<https://s/admin/api/2024-07/products.json?limit=250&page_info=abc>; rel=\"previous\", \
                    <https://s/admin/api/2024-07/products.json?limit=250&page_info=def>; rel=\"next\"";
        assert_eq!(
            next_link(link).as_deref(),
            Some("https://s/admin/api/2024-07/products.json?limit=250&page_info=def")
        );
        assert_eq!(
            next_link("<https://s/x?page_info=abc>; rel=\"previous\""),
            None
        );
    }
}
