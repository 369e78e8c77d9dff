//! An S3-compatible object store (AWS S3, Garage, MinIO, Ceph RGW) as lazyfs
//! reaches it: `s3://BUCKET/PREFIX`, the endpoint and credentials from the
//! standard `AWS_*` variables and profile (`profile.rs`), and the few requests
//! lazyfs makes (GET of a range or a whole object, HEAD, PUT), each bounded in
//! time. What lazyfs keeps there is in `index.rs`.
//!
//! The client is the `object_store` crate, driven by a small tokio runtime of
//! its own: callers are plain threads (the fetch lanes, the push), which wait
//! with [`Bucket::block_on`].

pub mod index;
pub mod pin;
mod profile;

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use crate::source::Limits;

/// `s3://BUCKET/PREFIX`: a bucket, and a key prefix in it (maybe empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without a leading or trailing `/`.
    pub prefix: String,
}

impl S3Url {
    /// `s3://BUCKET` or `s3://BUCKET/PREFIX` (a trailing `/` is dropped).
    pub fn parse(arg: &str) -> Result<S3Url, S3Error> {
        let rest = arg.strip_prefix("s3://").ok_or_else(|| S3Error::Config(format!("{arg}: not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(S3Error::Config(format!(
                "{arg}: {bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, '-' and '.')"
            )));
        }
        if !prefix.is_empty() && Key::parse(prefix).is_err() {
            return Err(S3Error::Config(format!(
                "{arg}: {prefix:?} is not a key prefix lazyfs can use (empty parts, `.` or `..`)"
            )));
        }
        Ok(S3Url { bucket: bucket.to_string(), prefix: prefix.to_string() })
    }

    /// The key of `name` below the prefix.
    pub fn key(&self, name: &str) -> String {
        match self.prefix.as_str() {
            "" => name.to_string(),
            prefix => format!("{prefix}/{name}"),
        }
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.as_str() {
            "" => write!(f, "s3://{}", self.bucket),
            prefix => write!(f, "s3://{}/{prefix}", self.bucket),
        }
    }
}

/// What went wrong with the store; each says it in one line, and never
/// shows a credential.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The URL, the environment or the profile is wrong (bad input).
    #[error("{0}")]
    Config(String),
    #[error("bucket {bucket} does not exist at {endpoint}")]
    NoBucket { bucket: String, endpoint: String },
    #[error("{what}: not in the store")]
    NotFound { what: String },
    /// The object ends before the range asked for (HTTP 416): it is shorter than it should be.
    #[error("{what}: the store holds fewer bytes than the range asked for")]
    OutOfRange { what: String },
    #[error(
        "{endpoint} refused the credentials ({reason}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the profile (AWS_PROFILE)"
    )]
    Denied { endpoint: String, reason: String },
    /// Credentials were to come from the EC2 instance metadata service, which gave none.
    #[error(
        "no AWS credentials: none set, and the EC2 instance metadata service ({metadata}) gave none ({reason}): {}",
        profile::SET_CREDENTIALS
    )]
    NoCredentials { metadata: String, reason: String },
    #[error("cannot connect to {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("{endpoint} did not answer within {:.1} s", waited.as_secs_f64())]
    TimedOut { endpoint: String, waited: Duration },
    #[error("{endpoint}: {reason}")]
    Other { endpoint: String, reason: String },
}

impl S3Error {
    /// Whether trying again (later, on a new request) may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, S3Error::Unreachable { .. } | S3Error::TimedOut { .. } | S3Error::Other { .. })
    }

    /// Bad input (exit 2) rather than a failure to reach or use the store
    /// (exit 1). No credentials at all is a setting to make; while a mount
    /// serves, it may be the metadata service passing (a role's keys renewed).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            S3Error::Config(_) | S3Error::NoBucket { .. } | S3Error::NotFound { .. } | S3Error::NoCredentials { .. }
        )
    }
}

/// What a listing or a HEAD says of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// Its ETag when that has the form of an MD5 (32 hex digits): the MD5 of
    /// its bytes for a single-part upload on most stores (not with SSE-KMS or
    /// SSE-C, where it is something else of the same form).
    pub md5: Option<[u8; 16]>,
}

impl ObjectInfo {
    fn of(meta: &object_store::ObjectMeta) -> ObjectInfo {
        let e_tag = meta.e_tag.as_deref().unwrap_or_default().trim_matches('"');
        let md5 = (e_tag.len() == 32 && e_tag.is_ascii()).then(|| {
            let mut md5 = [0u8; 16];
            for (i, byte) in md5.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&e_tag[2 * i..2 * i + 2], 16).ok()?;
            }
            Some(md5)
        });
        ObjectInfo { size: meta.size, md5: md5.flatten() }
    }
}

/// How long a connection to the endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest any one request may take, start to end (a PUT of one
/// object, a GET of one).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A bucket of an S3-compatible store, with the runtime that drives its requests.
pub struct Bucket {
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
    pub url: S3Url,
    /// The endpoint, for messages: `AWS_ENDPOINT_URL`, or AWS's for the region.
    pub endpoint: String,
    /// The EC2 instance metadata service, when credentials are to come from it.
    instance_metadata: Option<String>,
}

impl Bucket {
    /// The bucket `url` names, as the `AWS_*` variables and the profile say
    /// to reach it. Nothing is sent yet.
    pub fn open(url: &S3Url) -> Result<Bucket, S3Error> {
        Self::open_with(url, &std::env::vars().collect())
    }

    /// [`open`](Bucket::open), with `vars` for the environment.
    pub fn open_with(url: &S3Url, vars: &HashMap<String, String>) -> Result<Bucket, S3Error> {
        let env = |name: &str| vars.get(name).filter(|v| !v.is_empty()).cloned();
        let settings = profile::settings(&env)?;
        let mut builder = AmazonS3Builder::new();
        // What `AmazonS3Builder::from_env` takes from the process's environment.
        for (name, value) in vars.iter().filter(|(name, value)| name.starts_with("AWS_") && !value.is_empty()) {
            if let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                builder = builder.with_config(key, value);
            }
        }
        let mut builder = builder
            .with_bucket_name(&url.bucket)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_allow_http(settings.allow_http),
            )
            // lazyfs bounds and retries requests itself (see `source::Limits`);
            // the client only smooths over a passing error.
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(5),
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
            });
        for (key, value) in settings.overrides {
            builder = builder.with_config(key, value);
        }
        // The one the client uses: `AWS_ENDPOINT_URL_S3` before `AWS_ENDPOINT_URL`.
        let endpoint = builder
            .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
            .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint))
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", settings.region));
        let instance_metadata = settings.instance_role.then(|| {
            builder
                .get_config_value(&AmazonS3ConfigKey::MetadataEndpoint)
                .unwrap_or_else(|| "http://169.254.169.254".into())
                .trim_end_matches('/')
                .to_string()
        });
        let store =
            builder.with_region(&settings.region).build().map_err(|e| S3Error::Config(format!("{url}: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lazyfs-s3")
            .enable_all()
            .build()
            .map_err(|e| S3Error::Config(format!("starting the S3 client: {e}")))?;
        Ok(Bucket { store, runtime, url: url.clone(), endpoint, instance_metadata })
    }

    /// Runs `future` on the bucket's runtime, from a thread outside it.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// The bytes of object `key` (`range` of them if given: fewer if the
    /// object ends sooner), at most `max` of them, waiting at most
    /// `limits.next_wait()` for each part of the answer: a silent endpoint
    /// is [`S3Error::TimedOut`], a slow but steady one is not.
    pub async fn get(&self, key: &str, range: Option<Range<u64>>, max: u64, limits: Limits) -> Result<Bytes, S3Error> {
        let location = self.location(key)?;
        let options = GetOptions { range: range.map(GetRange::Bounded), ..Default::default() };
        let started = Instant::now();
        let result = self.bounded(limits, started, self.store.get_opts(&location, options)).await?;
        let result = result.map_err(|e| self.error(e, key))?;
        let len = result.range.end - result.range.start;
        if len > max {
            return Err(self.other(format!("{key}: {len} bytes, more than the {max} expected")));
        }
        let mut body = result.into_stream();
        let mut bytes = BytesMut::with_capacity(len as usize);
        while let Some(part) = self.bounded(limits, started, body.next()).await? {
            bytes.extend_from_slice(&part.map_err(|e| self.error(e, key))?);
            if bytes.len() as u64 > len {
                break;
            }
        }
        if bytes.len() as u64 != len {
            return Err(self.other(format!("{key}: {} bytes arrived where {len} were announced", bytes.len())));
        }
        Ok(bytes.freeze())
    }

    /// What the store says of object `key`; `None` if there is none.
    pub async fn head(&self, key: &str, limits: Limits) -> Result<Option<ObjectInfo>, S3Error> {
        let location = self.location(key)?;
        match self.bounded(limits, Instant::now(), self.store.head(&location)).await? {
            Ok(meta) => Ok(Some(ObjectInfo::of(&meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(e, key)),
        }
    }

    /// Stores `bytes` as object `key`.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), S3Error> {
        let location = self.location(key)?;
        let limits = Limits { deadline: None, stall: REQUEST_TIMEOUT };
        match self.bounded(limits, Instant::now(), self.store.put(&location, PutPayload::from_bytes(bytes))).await? {
            Ok(_) => Ok(()),
            Err(e) => Err(self.error(e, key)),
        }
    }

    /// The objects below key prefix `prefix` (name after the prefix, and
    /// what the listing says of it), at most `max` of them; whether that was all.
    pub async fn list(
        &self,
        prefix: &str,
        max: usize,
        limits: Limits,
    ) -> Result<(Vec<(String, ObjectInfo)>, bool), S3Error> {
        let location = self.location(prefix.trim_end_matches('/'))?;
        let mut listing = self.store.list(Some(&location));
        let mut objects = Vec::new();
        let started = Instant::now();
        while let Some(meta) = self.bounded(limits, started, listing.next()).await? {
            if objects.len() == max {
                return Ok((objects, false));
            }
            let meta = meta.map_err(|e| self.error(e, prefix))?;
            let key = meta.location.as_ref();
            if let Some(name) = key.strip_prefix(prefix) {
                objects.push((name.to_string(), ObjectInfo::of(&meta)));
            }
        }
        Ok((objects, true))
    }

    /// Whether anything is stored below the prefix (an error if the bucket is missing).
    pub async fn anything_at_prefix(&self, limits: Limits) -> Result<bool, S3Error> {
        let prefix = (!self.url.prefix.is_empty()).then(|| Key::from(self.url.prefix.as_str()));
        let listed = self.bounded(limits, Instant::now(), self.store.list_with_delimiter(prefix.as_ref())).await?;
        let list = listed.map_err(|e| self.error(e, &self.url.prefix))?;
        Ok(!list.objects.is_empty() || !list.common_prefixes.is_empty())
    }

    fn location(&self, key: &str) -> Result<Key, S3Error> {
        Key::parse(key).map_err(|e| S3Error::Config(format!("{key}: {e}")))
    }

    /// `future`, given up once `limits` say the endpoint has been silent too long.
    async fn bounded<T>(
        &self,
        limits: Limits,
        started: Instant,
        future: impl Future<Output = T>,
    ) -> Result<T, S3Error> {
        let wait = limits.next_wait();
        tokio::time::timeout(wait, future)
            .await
            .map_err(|_| S3Error::TimedOut { endpoint: self.endpoint.clone(), waited: started.elapsed() })
    }

    fn other(&self, reason: String) -> S3Error {
        S3Error::Other { endpoint: self.endpoint.clone(), reason }
    }

    /// The one-line error an `object_store` error about `key` means.
    fn error(&self, error: object_store::Error, key: &str) -> S3Error {
        let endpoint = self.endpoint.clone();
        // A request that never went out: the client could not get the instance role's credentials.
        let text = chain_text(&error);
        let from_metadata = |m: &&String| {
            text.contains(&format!("{m}/latest/api/token")) || text.contains(&format!("{m}/latest/meta-data/"))
        };
        if let Some(metadata) = self.instance_metadata.as_ref().filter(from_metadata) {
            return S3Error::NoCredentials { metadata: metadata.clone(), reason: innermost(&error) };
        }
        let code = s3_code(&error);
        match code.as_deref() {
            Some("NoSuchBucket") => return S3Error::NoBucket { bucket: self.url.bucket.clone(), endpoint },
            Some("InvalidRange") => return S3Error::OutOfRange { what: format!("s3://{}/{key}", self.url.bucket) },
            _ => {}
        }
        match &error {
            object_store::Error::NotFound { .. } => {
                S3Error::NotFound { what: format!("s3://{}/{key}", self.url.bucket) }
            }
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                S3Error::Denied { endpoint, reason: code.unwrap_or_else(|| "access denied".into()) }
            }
            _ => match http_kind(&error) {
                Some(object_store::client::HttpErrorKind::Connect) => {
                    S3Error::Unreachable { endpoint, reason: innermost(&error) }
                }
                Some(object_store::client::HttpErrorKind::Timeout) => {
                    S3Error::TimedOut { endpoint, waited: REQUEST_TIMEOUT }
                }
                _ => match code {
                    Some(code) if is_credential_code(&code) => S3Error::Denied { endpoint, reason: code },
                    Some(code) => S3Error::Other { endpoint, reason: format!("{key}: {code}") },
                    None => S3Error::Other { endpoint, reason: format!("{key}: {}", innermost(&error)) },
                },
            },
        }
    }
}

/// S3's error codes that mean the credentials are wrong.
fn is_credential_code(code: &str) -> bool {
    matches!(
        code,
        "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "AccessDenied"
            | "ExpiredToken"
            | "InvalidToken"
            | "AuthorizationHeaderMalformed"
    )
}

/// The `<Code>` of the S3 error document an error carries, if any.
fn s3_code(error: &object_store::Error) -> Option<String> {
    let text = chain_text(error);
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(crate::ui::printable(&text[start..start + len]))
}

/// The kind of HTTP failure behind an error, if it was one.
fn http_kind(error: &object_store::Error) -> Option<object_store::client::HttpErrorKind> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(http) = e.downcast_ref::<object_store::client::HttpError>() {
            return Some(http.kind());
        }
        cause = e.source();
    }
    None
}

fn chain_text(error: &object_store::Error) -> String {
    let mut text = String::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        text.push_str(&e.to_string());
        text.push('\n');
        cause = e.source();
    }
    text
}

/// The last cause of an error: the one that says what happened ("Connection
/// refused"); it may hold the endpoint's words, escaped.
fn innermost(error: &object_store::Error) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    crate::ui::printable(&cause.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_endpoint_the_client_uses() {
        let url = S3Url::parse("s3://ckpt-bucket/app").unwrap();
        let vars = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            let base = [("AWS_ACCESS_KEY_ID", "a"), ("AWS_SECRET_ACCESS_KEY", "b"), ("AWS_ALLOW_HTTP", "true")];
            base.iter().chain(pairs).map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let only_s3 = Bucket::open_with(&url, &vars(&[("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")])).unwrap();
        assert_eq!(only_s3.endpoint, "http://127.0.0.1:9001");
        let both = [("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001"), ("AWS_ENDPOINT_URL", "http://127.0.0.1:9002")];
        assert_eq!(Bucket::open_with(&url, &vars(&both)).unwrap().endpoint, "http://127.0.0.1:9001");
        let general = Bucket::open_with(&url, &vars(&[("AWS_ENDPOINT_URL", "http://127.0.0.1:9002")])).unwrap();
        assert_eq!(general.endpoint, "http://127.0.0.1:9002");
    }

    #[test]
    fn urls() {
        let url = S3Url::parse("s3://ckpt-bucket/app/one/").unwrap();
        assert_eq!((url.bucket.as_str(), url.prefix.as_str()), ("ckpt-bucket", "app/one"));
        assert_eq!(url.key("lazyfs.index"), "app/one/lazyfs.index");
        assert_eq!(url.to_string(), "s3://ckpt-bucket/app/one");
        let root = S3Url::parse("s3://ckpt").unwrap();
        assert_eq!((root.key("lazyfs.index").as_str(), root.to_string().as_str()), ("lazyfs.index", "s3://ckpt"));
        for bad in
            ["s3://", "s3://UPPER/x", "s3://ab", "s3://b_c/x", "s3://bucket/a//b", "s3://bucket/../x", "http://b/x"]
        {
            let err = S3Url::parse(bad).unwrap_err();
            assert!(matches!(err, S3Error::Config(_)), "{bad}: {err}");
        }
    }
}
