//! The job cache on the Lambda route: gitlab-runner's semantics (`ephemeral_core::cache`
//! decides keys, fallbacks, policy and when) and its archive format (a zip of the matched
//! paths, relative to the project directory), in the stack's bucket under the same objects an
//! EC2 runner uses (`cache/project/<id>/<key>`). S3 is two signed requests (GET, PUT) over
//! the runner's own HTTP client: SigV4 with `aws-sigv4`, already in the tree through the SSM
//! client, instead of the S3 SDK's megabytes. A cache problem is a warning in the job log,
//! never a job failure (as with gitlab-runner).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ephemeral_core::secrets::Secret;
use url::Url;

/// Where the cache is and how to sign for it; read once per cold start.
#[derive(Clone)]
pub struct CacheSettings {
    pub bucket: String,
    pub region: String,
    /// `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (a local S3): path-style requests.
    /// Unset: `https://<bucket>.s3.<region>.amazonaws.com`.
    pub endpoint: Option<Url>,
    pub credentials: S3Credentials,
}

impl std::fmt::Debug for CacheSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheSettings")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint.as_ref().map(Url::as_str))
            .finish_non_exhaustive()
    }
}

/// The credentials S3 requests are signed with (the function role's, from Lambda's
/// environment).
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

impl CacheSettings {
    /// `None`: no bucket (`CACHE_BUCKET_NAME` empty: the stack's RunnerCache off) or no
    /// credentials in the environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let bucket = get(ephemeral_core::cache::BUCKET_ENV)?;
        let region = get("AWS_REGION")
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = get("AWS_ENDPOINT_URL_S3")
            .or_else(|| get("AWS_ENDPOINT_URL"))
            .and_then(|u| Url::parse(&u).ok());
        Some(Self {
            bucket,
            region,
            endpoint,
            credentials: S3Credentials {
                access_key_id: get("AWS_ACCESS_KEY_ID")?,
                secret_access_key: Secret::new(get("AWS_SECRET_ACCESS_KEY")?),
                session_token: get("AWS_SESSION_TOKEN").map(Secret::new),
            },
        })
    }

    /// The object's URL: virtual-hosted on AWS, path-style on a configured endpoint.
    pub fn object_url(&self, key: &str) -> String {
        let key = encode_key(key);
        match &self.endpoint {
            Some(endpoint) => format!(
                "{}/{}/{key}",
                endpoint.as_str().trim_end_matches('/'),
                self.bucket
            ),
            None => format!(
                "https://{}.s3.{}.amazonaws.com/{key}",
                self.bucket, self.region
            ),
        }
    }

    /// SigV4 headers for an S3 request with an unsigned payload (S3 accepts
    /// `UNSIGNED-PAYLOAD`; the body streams from a file, TLS protects it in transit).
    fn signed_headers(&self, method: &str, url: &str) -> Result<Vec<(String, String)>, String> {
        use aws_sigv4::http_request::{
            PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
            SigningSettings, UriPathNormalizationMode, sign,
        };
        let credentials = aws_credential_types::Credentials::new(
            self.credentials.access_key_id.clone(),
            self.credentials.secret_access_key.expose().to_owned(),
            self.credentials
                .session_token
                .as_ref()
                .map(|t| t.expose().to_owned()),
            None,
            "lambda-environment",
        );
        let identity = credentials.into();
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| format!("signing: {e}"))?
            .into();
        let request = SignableRequest::new(
            method,
            url,
            std::iter::empty(),
            SignableBody::UnsignedPayload,
        )
        .map_err(|e| format!("signing: {e}"))?;
        let (instructions, _) = sign(request, &params)
            .map_err(|e| format!("signing: {e}"))?
            .into_parts();
        Ok(instructions
            .headers()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }
}

/// Each path segment percent-encoded (RFC 3986 unreserved characters kept), `/` kept.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The bucket, through the runner's HTTP client.
pub struct S3 {
    pub http: reqwest::Client,
    pub settings: CacheSettings,
}

impl S3 {
    /// Downloads the object to `to`. `Ok(false)`: there is none yet (404, or 403, which S3
    /// answers for a missing object to a role without ListBucket).
    pub async fn download(&self, key: &str, to: &Path) -> Result<bool, String> {
        let url = self.settings.object_url(key);
        let mut request = self.http.get(&url);
        for (name, value) in self.settings.signed_headers("GET", &url)? {
            request = request.header(name, value);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        match response.status().as_u16() {
            200 => {}
            403 | 404 => return Ok(false),
            other => return Err(format!("S3 answered {other}")),
        }
        let mut file = tokio::fs::File::create(to)
            .await
            .map_err(|e| format!("{}: {e}", to.display()))?;
        use tokio::io::AsyncWriteExt as _;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| e.without_url().to_string())?
        {
            file.write_all(&chunk)
                .await
                .map_err(|e| format!("{}: {e}", to.display()))?;
        }
        file.flush().await.map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// Uploads `from` as the object (one PUT: S3 takes up to 5 GB so).
    pub async fn upload(&self, key: &str, from: &Path) -> Result<(), String> {
        let url = self.settings.object_url(key);
        let file = tokio::fs::File::open(from)
            .await
            .map_err(|e| format!("{}: {e}", from.display()))?;
        let length = file.metadata().await.map_err(|e| e.to_string())?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let mut request = self
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_LENGTH, length)
            .header(reqwest::header::CONTENT_TYPE, "application/zip")
            .body(body);
        for (name, value) in self.settings.signed_headers("PUT", &url)? {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        match response.status().as_u16() {
            200..=299 => Ok(()),
            other => Err(format!("S3 answered {other}")),
        }
    }
}

/// A file of the project directory a cache may hold.
pub struct Candidate {
    pub rel: String,
    pub abs: PathBuf,
    pub untracked: bool,
}

/// Zips the files `paths` (or, with `untracked`, git's untracked files) select into `out`;
/// paths outside the project are refused by the caller ([`ephemeral_core::cache::path_problem`])
/// and only files under the project directory are candidates at all. Returns how many files.
pub fn archive(
    candidates: &[Candidate],
    paths: &[String],
    untracked: bool,
    out: &Path,
) -> std::io::Result<usize> {
    use std::os::unix::fs::PermissionsExt as _;
    let none: [&str; 0] = [];
    let mut zip = zip::ZipWriter::new(std::fs::File::create(out)?);
    let mut added = 0;
    for file in candidates {
        if !gitlab_runner::artifact_selects(
            Path::new(&file.rel),
            file.untracked,
            paths,
            untracked,
            none,
        ) {
            continue;
        }
        let Ok(mut source) = std::fs::File::open(&file.abs) else {
            continue;
        };
        let mode = source.metadata()?.permissions().mode();
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(mode & 0o777)
            .large_file(source.metadata()?.len() >= u32::MAX as u64);
        zip.start_file(file.rel.as_str(), options)
            .map_err(std::io::Error::other)?;
        std::io::copy(&mut source, &mut zip)?;
        added += 1;
    }
    zip.finish().map_err(std::io::Error::other)?.flush()?;
    Ok(added)
}

/// What an extraction did: files written, and entries skipped because they would leave the
/// project directory (`..`, absolute, through a symlink).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    pub files: usize,
    pub refused: Vec<String>,
}

/// Extracts the archive at `from` into `dir`. Nothing is written outside `dir`: an entry
/// whose name leaves it, or whose way there passes a symlink, is refused and named.
pub fn extract(from: &Path, dir: &Path) -> std::io::Result<Extracted> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut zip =
        zip::ZipArchive::new(std::fs::File::open(from)?).map_err(std::io::Error::other)?;
    let mut done = Extracted::default();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(std::io::Error::other)?;
        let name = entry.name().to_owned();
        let Some(rel) = entry.enclosed_name() else {
            done.refused.push(name);
            continue;
        };
        let Some(rel_text) = rel.to_str().map(str::to_owned) else {
            done.refused.push(name);
            continue;
        };
        if !crate::no_symlink_on_the_way(dir, rel_text.trim_end_matches('/')) {
            done.refused.push(name);
            continue;
        }
        let target = dir.join(&rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&target)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // A file a checkout put there is replaced, not written through (it may be a link).
        let _ = std::fs::remove_file(&target);
        let mut out = std::fs::File::create(&target)?;
        let mut buffer = [0u8; 64 * 1024];
        loop {
            let n = entry.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            out.write_all(&buffer[..n])?;
        }
        if let Some(mode) = entry.unix_mode() {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o777))?;
        }
        done.files += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(endpoint: Option<&str>) -> CacheSettings {
        CacheSettings {
            bucket: "ci-cachebucket-1".into(),
            region: "eu-west-1".into(),
            endpoint: endpoint.map(|e| Url::parse(e).unwrap()),
            credentials: S3Credentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
                session_token: Some(Secret::new("session")),
            },
        }
    }

    #[test]
    fn objects_are_addressed_and_signed_for_s3() {
        let aws = settings(None);
        assert_eq!(
            aws.object_url("cache/project/4/deps main"),
            "https://ci-cachebucket-1.s3.eu-west-1.amazonaws.com/cache/project/4/deps%20main"
        );
        let local = settings(Some("http://127.0.0.1:5102/"));
        assert_eq!(
            local.object_url("cache/project/4/k"),
            "http://127.0.0.1:5102/ci-cachebucket-1/cache/project/4/k"
        );
        let headers = aws
            .signed_headers("GET", &aws.object_url("cache/project/4/k"))
            .unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
        };
        let authorization = header("authorization");
        assert!(
            authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
                && authorization.contains("/eu-west-1/s3/aws4_request"),
            "{authorization}"
        );
        assert_eq!(header("x-amz-content-sha256"), "UNSIGNED-PAYLOAD");
        assert_eq!(header("x-amz-security-token"), "session");
        // The secret itself is never sent, nor printed.
        assert!(!headers.iter().any(|(_, v)| v.contains("EXAMPLEKEY")));
        assert!(!format!("{aws:?}").contains("EXAMPLEKEY"));
    }

    #[test]
    fn settings_need_a_bucket_and_credentials() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(CacheSettings::from_lookup(env(&[("AWS_ACCESS_KEY_ID", "a")])).is_none());
        assert!(CacheSettings::from_lookup(env(&[("CACHE_BUCKET_NAME", "b")])).is_none());
        let s = CacheSettings::from_lookup(env(&[
            ("CACHE_BUCKET_NAME", "b"),
            ("AWS_REGION", "eu-central-1"),
            ("AWS_ACCESS_KEY_ID", "a"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1"),
        ]))
        .unwrap();
        assert_eq!(
            (s.bucket.as_str(), s.region.as_str()),
            ("b", "eu-central-1")
        );
        assert!(s.endpoint.is_some() && s.credentials.session_token.is_none());
    }

    #[test]
    fn archives_hold_the_selected_files_and_extraction_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("p");
        std::fs::create_dir_all(project.join("deps/sub")).unwrap();
        std::fs::write(project.join("deps/a"), "a").unwrap();
        std::fs::write(project.join("deps/sub/b"), "b").unwrap();
        std::fs::write(project.join("other"), "o").unwrap();
        let candidates: Vec<Candidate> = ["deps/a", "deps/sub/b", "other"]
            .iter()
            .map(|rel| Candidate {
                rel: (*rel).into(),
                abs: project.join(rel),
                untracked: false,
            })
            .collect();
        let zip = dir.path().join("cache.zip");
        assert_eq!(
            archive(&candidates, &["deps/".into()], false, &zip).unwrap(),
            2
        );
        let target = dir.path().join("q");
        std::fs::create_dir_all(&target).unwrap();
        let done = extract(&zip, &target).unwrap();
        assert_eq!(
            done,
            Extracted {
                files: 2,
                refused: vec![]
            }
        );
        assert_eq!(
            std::fs::read_to_string(target.join("deps/sub/b")).unwrap(),
            "b"
        );
        assert!(!target.join("other").exists());

        // A hostile archive: `..`, absolute, and through a symlink the checkout made.
        let evil = dir.path().join("evil.zip");
        let mut w = zip::ZipWriter::new(std::fs::File::create(&evil).unwrap());
        let o = zip::write::SimpleFileOptions::default();
        for name in ["../escaped", "/abs/escaped", "link/escaped", "fine"] {
            w.start_file(name, o).unwrap();
            w.write_all(b"x").unwrap();
        }
        w.finish().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, target.join("link")).unwrap();
        let done = extract(&evil, &target).unwrap();
        assert!(target.join("fine").exists(), "{done:?}");
        for refused in ["../escaped", "link/escaped"] {
            assert!(done.refused.iter().any(|r| r == refused), "{done:?}");
        }
        assert!(!dir.path().join("escaped").exists());
        assert!(!outside.join("escaped").exists());
        // `/abs/escaped` is refused or taken as relative: never written at /abs.
        assert!(!Path::new("/abs/escaped").exists());
    }
}
