//! Remote URIs as a `runtime_env` names them (`s3://bucket/key.zip`, `gs://…`,
//! `https://host/path.zip`, `file:///shared/path`), and the operator's allow-list.
//!
//! A URI is accepted only in its canonical spelling (what the `url` crate would print for
//! it) and without anything a prefix check could be fooled by: no `.`/`..` segments, no
//! percent-encoded `.`, `/` or `\`, no empty segments, no user info, query or fragment.
//! So "starts with an allowed prefix" means what it says: the object the daemon fetches is
//! the one under the prefix, whatever the server or the object store would normalize.

use std::fmt;

/// How a remote is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    S3,
    Gcs,
    Https,
    /// Plain http: for servers on a trusted network, and tests.
    Http,
    /// A filesystem every node mounts (NFS, Lustre, …).
    File,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::S3 => "s3",
            Scheme::Gcs => "gs",
            Scheme::Https => "https",
            Scheme::Http => "http",
            Scheme::File => "file",
        }
    }
}

/// An object in remote storage, canonically spelled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteUri {
    text: String,
    scheme: Scheme,
    /// The bucket, or `host[:port]`; empty for `file://`.
    authority: String,
    /// The object's path under the authority, without its leading `/` (for `file://`,
    /// the absolute path without its leading `/`).
    key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UriError(String);

impl From<String> for UriError {
    fn from(message: String) -> Self {
        UriError(message)
    }
}

impl RemoteUri {
    /// Parses `text`, which must already be canonical (see the module doc).
    pub fn parse(text: &str) -> Result<RemoteUri, UriError> {
        let bad = |why: &str| UriError(format!("{text:?}: {why}"));
        let url = url::Url::parse(text).map_err(|e| bad(&format!("not a URI ({e})")))?;
        let scheme = match url.scheme() {
            "s3" => Scheme::S3,
            "gs" => Scheme::Gcs,
            "https" => Scheme::Https,
            "http" => Scheme::Http,
            "file" => Scheme::File,
            other => {
                return Err(bad(&format!(
                    "{other}:// is not a supported remote (s3://, gs://, https://, http://, file://)"
                )));
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "credentials in a URI are not accepted; they come from the fetching process's environment",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("a query or fragment is not accepted"));
        }
        if url.as_str() != text {
            return Err(bad(&format!(
                "expected its canonical spelling {:?}",
                url.as_str()
            )));
        }
        let authority = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or("")),
            None => url.host_str().unwrap_or("").to_string(),
        };
        match scheme {
            Scheme::File if !authority.is_empty() => {
                return Err(bad("expected file:///absolute/path (no host)"));
            }
            Scheme::File => {}
            _ if authority.is_empty() => return Err(bad("expected a bucket or host after ://")),
            _ => {}
        }
        let key = url.path().strip_prefix('/').unwrap_or(url.path()).to_string();
        if key.is_empty() {
            return Err(bad("expected an object path after the bucket or host"));
        }
        let lower = key.to_ascii_lowercase();
        // Encoded `.`, `/`, `\`, `%` (decoded twice by some servers) and `;` (path
        // parameters: `..;/` is `..` to some servers) could all take a request out of an
        // allowed prefix on the server's side.
        for encoded in ["%2e", "%2f", "%5c", "%25", "%00", ";"] {
            if lower.contains(encoded) {
                return Err(bad(&format!("{encoded} is not accepted in an object path")));
            }
        }
        if key
            .split('/')
            .any(|segment| segment.is_empty() || segment == "." || segment.starts_with(".."))
        {
            return Err(bad("empty, `.` and `..`-led path segments are not accepted"));
        }
        object_store::path::Path::from_url_path(&key)
            .map_err(|e| bad(&format!("not an object path ({e})")))?;
        Ok(RemoteUri {
            text: text.to_string(),
            scheme,
            authority,
            key,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The bucket, or `host[:port]`; empty for `file://`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The object's path (percent-encoded as in the URI), without the leading `/`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The last path segment (`x.zip`, `pkg-1.0-py3-none-any.whl`).
    pub fn file_name(&self) -> &str {
        self.key.rsplit('/').next().unwrap_or(&self.key)
    }

    /// The object `relative` (plain `a/b.zip` segments) under this URI taken as a prefix.
    pub fn join(&self, relative: &str) -> Result<RemoteUri, UriError> {
        RemoteUri::parse(&format!("{}/{relative}", self.text.trim_end_matches('/')))
    }
}

impl fmt::Display for RemoteUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Which remotes requests may name (`--allow-remote`): URIs under one of these prefixes.
/// A prefix is a whole path: `s3://team` allows `s3://team/x.zip`, not `s3://team-b/x.zip`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    prefixes: Vec<String>,
}

impl AllowList {
    /// Each prefix is `scheme://authority[/path]`, checked as a URI is.
    pub fn new(prefixes: &[String]) -> Result<AllowList, UriError> {
        let prefixes = prefixes
            .iter()
            .map(|prefix| {
                let trimmed = prefix.trim_end_matches('/');
                // Checked as the URI of an object under it would be.
                RemoteUri::parse(&format!("{trimmed}/x"))
                    .map_err(|e| UriError(format!("--allow-remote {prefix:?}: {e}")))?;
                Ok(format!("{trimmed}/"))
            })
            .collect::<Result<_, UriError>>()?;
        Ok(AllowList { prefixes })
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    pub fn allows(&self, uri: &RemoteUri) -> bool {
        self.prefixes
            .iter()
            .any(|prefix| uri.as_str().starts_with(prefix))
    }

    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_uris_parse() {
        let uri = RemoteUri::parse("s3://bucket/dir/pkg.zip").unwrap();
        assert_eq!(
            (uri.scheme(), uri.authority(), uri.key()),
            (Scheme::S3, "bucket", "dir/pkg.zip")
        );
        assert_eq!(uri.file_name(), "pkg.zip");
        let uri = RemoteUri::parse("http://127.0.0.1:8080/a.zip").unwrap();
        assert_eq!((uri.scheme(), uri.authority()), (Scheme::Http, "127.0.0.1:8080"));
        let uri = RemoteUri::parse("file:///shared/renv/pkgs/a.zip").unwrap();
        assert_eq!((uri.authority(), uri.key()), ("", "shared/renv/pkgs/a.zip"));
        assert_eq!(
            RemoteUri::parse("gs://b/p")
                .unwrap()
                .join("pkgs/d.zip")
                .unwrap()
                .as_str(),
            "gs://b/p/pkgs/d.zip"
        );
    }

    #[test]
    fn anything_a_prefix_check_could_be_fooled_by_is_refused() {
        for text in [
            "https://host/team/../other/x.zip",
            "https://host/team/%2e%2e/other/x.zip",
            "https://host/team/..%2Fother/x.zip",
            "https://host/team//x.zip",
            "https://user:pw@host/x.zip",
            "https://host/x.zip?sig=1",
            "https://host/x.zip#frag",
            "https://HOST/x.zip",
            "s3://bucket",
            "s3://bucket/",
            "file://host/x.zip",
            "ftp://host/x.zip",
            "https://host/a\\b.zip",
            "https://host/team/..;/other/x.zip",
            "https://host/team/%252e%252e/other/x.zip",
            "https://host/team/x.zip%00.zip",
            "https://host/team/...x/y.zip",
        ] {
            assert!(RemoteUri::parse(text).is_err(), "{text} was accepted");
        }
    }

    #[test]
    fn allow_list_prefixes_are_whole_segments() {
        let allow = AllowList::new(&["s3://team".into(), "https://artifacts.example/ml/".into()]).unwrap();
        let ok = |s: &str| allow.allows(&RemoteUri::parse(s).unwrap());
        assert!(ok("s3://team/x.zip"));
        assert!(!ok("s3://team-b/x.zip"));
        assert!(ok("https://artifacts.example/ml/a/b.zip"));
        assert!(!ok("https://artifacts.example/mlx/b.zip"));
        assert!(!ok("http://artifacts.example/ml/b.zip"));
        assert!(AllowList::new(&["nope".into()]).is_err());
    }
}
