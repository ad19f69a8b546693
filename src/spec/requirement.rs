//! One PEP 508 requirement, validated as untrusted input.
//!
//! Requirements are parsed by [`uv_pep508`], chosen over `pep508_rs` because it is the
//! maintained one (published with every uv release, and the parser of uv, the installer
//! renv drives), while `pep508_rs` has had no release since 0.9.2 and, unlike PyPA's
//! `packaging`, rejects `foo==1.0,`; its Rust API is declared unstable, so Cargo.toml pins
//! it to an exact version.
//!
//! A `Requirement` can only be built by [`Requirement::parse`], so everything downstream
//! (the env key, the installer's argv) sees exactly one requirement: a name, optional
//! extras, version specifiers or an `https://` direct URL, and an optional environment
//! marker. renv's policy is checked on top of the grammar, on the parsed structure where
//! there is one: installer options, local paths, `file://` and VCS URLs, `$` (environment
//! variable expansion), backslashes, control characters and over-complex markers are
//! rejected here, once.
//!
//! # Canonical form
//!
//! [`Requirement::canonical`] is the requirement's identity: two spellings of the same
//! requirement have the same canonical form, which is what dedup, the env description (and
//! so the env key) and the installer's command line use. It is built from the parsed
//! structure as `name[extras]specifiers ; marker` or `name[extras] @ url ; marker`:
//!
//! - the name is PEP 503 normalized (`Foo_Bar` → `foo-bar`); extras likewise, sorted and
//!   deduplicated (`[Socks,security]` → `[security,socks]`);
//! - each version is PEP 440 normalized as the crate prints it (`V1.0-1` → `1.0.post1`),
//!   and then, for the operators whose meaning pads the release with zeros (`==`, `!=`,
//!   `<=`, `>=`, `<`, `>` without a wildcard), trailing zero release segments are dropped,
//!   keeping at least one (`==2.26.0` → `==2.26`, `>=1.0.0rc1` → `>=1rc1`, `<0.0` → `<0`):
//!   PEP 440 compares releases zero-padded, including for the pre/post-release exclusions
//!   of `<` and `>`, so these match exactly the same versions. Versions are kept as they
//!   are for `~=` (`~=2.2` and `~=2.2.0` differ: `<3` against `<2.3`), for wildcards
//!   (`==2.26.*` and `==2.26.0.*` differ) and for `===` (string equality);
//! - specifiers are sorted (by version, then by text) and duplicates dropped;
//! - a direct URL is written as the `url` crate serializes it (credentials kept);
//! - the marker is written as the crate prints it: its marker algebra puts equivalent
//!   markers in one form (`python_version >= '3.9'` → `python_full_version >= '3.9'`,
//!   operands of `and`/`or` in a fixed order, single quotes).
//!
//! The canonical form means the same as what the user wrote, so it is also what the
//! installer gets; [`Requirement::given`] keeps the user's text for messages.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use uv_pep508::uv_pep440::{Operator, VersionSpecifier};
use uv_pep508::{MarkerTree, VerbatimUrl, VersionOrUrl};

use super::limits;

type Parsed = uv_pep508::Requirement<VerbatimUrl>;

/// A validated requirement: the user's text and its canonical form.
///
/// Equality, ordering and hashing are those of the canonical form.
#[derive(Clone, Debug)]
pub struct Requirement {
    /// PEP 503 normalized project name (`Foo_Bar` → `foo-bar`).
    name: String,
    /// The user's text, trimmed.
    given: String,
    canonical: String,
    /// `name @ https://…`: fetched from that URL, not from an index.
    direct_url: bool,
}

impl Requirement {
    /// The PEP 503 normalized project name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The requirement as the user wrote it (trimmed), for messages.
    pub fn given(&self) -> &str {
        &self.given
    }

    /// The canonical form (see the module doc): the requirement's identity for dedup and
    /// the env key, and what the installer is given.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// Whether it names its own URL (`name @ https://…`) instead of an index's versions.
    pub fn is_direct_url(&self) -> bool {
        self.direct_url
    }

    /// Validates `raw` against the grammar and renv's policy, or says what is wrong.
    pub fn parse(raw: &str) -> Result<Requirement, String> {
        let parsed = parse_checked(raw)?;
        let quoted = quote(raw);
        let mut canonical = parsed.name.to_string();
        let mut extras: Vec<String> = parsed.extras.iter().map(ToString::to_string).collect();
        extras.sort();
        extras.dedup();
        if !extras.is_empty() {
            canonical.push_str(&format!("[{}]", extras.join(",")));
        }
        match &parsed.version_or_url {
            None => {}
            Some(VersionOrUrl::VersionSpecifier(specifiers)) => {
                let mut specs: Vec<VersionSpecifier> = specifiers.iter().map(canonical_specifier).collect();
                specs.sort_by(|a, b| {
                    a.version()
                        .cmp(b.version())
                        .then_with(|| a.to_string().cmp(&b.to_string()))
                });
                let mut texts: Vec<String> = specs.iter().map(ToString::to_string).collect();
                texts.dedup();
                canonical.push_str(&texts.join(","));
            }
            Some(VersionOrUrl::Url(url)) => {
                // The full serialization: `Display` would hide a password.
                canonical.push_str(" @ ");
                canonical.push_str(url.as_str());
            }
        }
        if let Some(marker) = parsed.marker.contents() {
            let marker = marker.to_string();
            // The crate quotes every string with `'`; make sure that reads back the same.
            if MarkerTree::from_str(&marker).ok() != Some(parsed.marker) {
                return Err(format!(
                    "the environment marker cannot be written back unambiguously ({quoted})"
                ));
            }
            canonical.push_str(" ; ");
            canonical.push_str(&marker);
        }
        if canonical.len() > limits::MAX_REQUIREMENT_BYTES {
            return Err(format!(
                "the requirement's canonical form is longer than {} bytes; simplify its marker or URL ({quoted})",
                limits::MAX_REQUIREMENT_BYTES
            ));
        }
        Ok(Requirement {
            name: parsed.name.to_string(),
            given: raw.trim().to_string(),
            canonical,
            direct_url: matches!(parsed.version_or_url, Some(VersionOrUrl::Url(_))),
        })
    }
}

/// A `pip_version` / `uv_version` value (`==23.2.1`, `>=22;python_version<'3.12'`):
/// valid when `<tool><spec>` is a requirement with version specifiers. Returns it as the
/// crate prints it, versions PEP 440 normalized but not shortened (an exact installer
/// version is compared with what the installer reports).
pub fn installer_specifier(tool: &str, spec: &str) -> Option<String> {
    let spec = spec.trim();
    if !spec.starts_with(['=', '<', '>', '!', '~']) {
        return None;
    }
    let parsed = parse_checked(&format!("{tool}{spec}")).ok()?;
    let Some(VersionOrUrl::VersionSpecifier(specifiers)) = &parsed.version_or_url else {
        return None;
    };
    let mut out = specifiers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    if let Some(marker) = parsed.marker.contents() {
        out.push_str(&format!(" ; {marker}"));
    }
    Some(out)
}

impl PartialEq for Requirement {
    fn eq(&self, other: &Self) -> bool {
        self.canonical == other.canonical
    }
}

impl Eq for Requirement {}

impl Hash for Requirement {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.canonical.hash(state);
    }
}

impl PartialOrd for Requirement {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Requirement {
    fn cmp(&self, other: &Self) -> Ordering {
        self.canonical.cmp(&other.canonical)
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

/// `==2.26.0` → `==2.26` where that matches the same versions (see the module doc).
fn canonical_specifier(spec: &VersionSpecifier) -> VersionSpecifier {
    let operator = *spec.operator();
    let pads_with_zeros = matches!(
        operator,
        Operator::Equal
            | Operator::NotEqual
            | Operator::LessThan
            | Operator::LessThanEqual
            | Operator::GreaterThan
            | Operator::GreaterThanEqual
    );
    let version = spec.version();
    let release: Vec<u64> = version.release().iter().copied().collect();
    let keep = release.iter().rposition(|n| *n != 0).map_or(1, |last| last + 1);
    if !pads_with_zeros || keep >= release.len() {
        return spec.clone();
    }
    let shortened = version.clone().with_release(&release[..keep]);
    VersionSpecifier::from_version(operator, shortened).unwrap_or_else(|_| spec.clone())
}

/// The grammar and renv's policy; the parsed requirement, or why not.
fn parse_checked(raw: &str) -> Result<Parsed, String> {
    let quoted = quote(raw);
    // Character rules come first: the crate would expand `${VAR}` in a URL and read `\`
    // as `/`, so there is no structure to check them on afterwards.
    if raw.chars().any(|c| c.is_control()) {
        return Err(format!(
            "newlines and control characters are not allowed in requirements ({quoted})"
        ));
    }
    let s = raw.trim();
    if s.is_empty() {
        return Err("expected a requirement, got an empty string".into());
    }
    if s.contains('$') {
        return Err(format!("`$` is not allowed in requirements ({quoted})"));
    }
    if s.contains('\\') {
        return Err(format!("backslashes are not allowed in requirements ({quoted})"));
    }
    check_marker_shape(s, &quoted)?;
    let parsed = match Parsed::from_str(s) {
        Ok(parsed) => parsed,
        Err(error) => {
            // Not a named requirement. Say why in renv's terms when it is one of the
            // forms renv refuses (an option, a path, a bare URL), else the parser's reason.
            return Err(refused_form(s, &quoted).unwrap_or_else(|| {
                format!(
                    "{} at position {} in requirement {quoted}",
                    error.message,
                    error.start + (raw.chars().count() - raw.trim_start().chars().count())
                )
            }));
        }
    };
    if let Some(VersionOrUrl::Url(url)) = &parsed.version_or_url {
        check_direct_url(url, &quoted)?;
    }
    Ok(parsed)
}

/// Direct URLs: `https://` only; no `file://` (a local path) and no VCS.
fn check_direct_url(url: &VerbatimUrl, quoted: &str) -> Result<(), String> {
    let scheme = url.scheme();
    if scheme == "file" {
        return Err(format!("file:// requirements are not allowed ({quoted})"));
    }
    if scheme
        .split_once('+')
        .is_some_and(|(vcs, _)| ["git", "hg", "svn", "bzr"].contains(&vcs))
    {
        return Err(format!("VCS requirements are not allowed ({quoted})"));
    }
    if scheme != "https" || url.host_str().is_none_or(str::is_empty) {
        return Err(format!("direct URLs must be `https://…` ({quoted})"));
    }
    // What the user wrote for the URL: no quoting or shell characters, no whitespace
    // (PEP 508 ends a URL at whitespace; the crate would percent-encode it).
    let given = url.given().unwrap_or(url.as_str());
    if given
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ';'))
    {
        return Err(format!("unexpected character in direct URL ({quoted})"));
    }
    Ok(())
}

/// For text the grammar refused: renv's reason, when it is a form renv never accepts.
fn refused_form(s: &str, quoted: &str) -> Option<String> {
    let lower = s.to_ascii_lowercase();
    // The URL part of `name @ url`, if there is an `@` before any marker.
    let head = s.split([';', '"', '\'']).next().unwrap_or(s);
    let after_at = head.split_once('@').map(|(_, url)| url.trim());
    if s.starts_with('-') {
        Some(format!(
            "options are not allowed in requirements ({quoted}); index and install options are the operator's configuration"
        ))
    } else if ["git+", "hg+", "svn+", "bzr+"].iter().any(|p| lower.contains(p)) {
        Some(format!("VCS requirements are not allowed ({quoted})"))
    } else if lower.starts_with("file:")
        || after_at.is_some_and(|u| u.to_ascii_lowercase().starts_with("file:"))
    {
        Some(format!("file:// requirements are not allowed ({quoted})"))
    } else if after_at.is_none() && lower.contains("://") {
        Some(format!(
            "bare URLs are not allowed in requirements ({quoted}); write `name @ https://…`"
        ))
    } else if s.starts_with(['.', '/', '~'])
        || (after_at.is_none() && s.contains('/'))
        || after_at.is_some_and(|u| u.starts_with(['.', '/', '~']))
    {
        Some(format!("local paths are not allowed in requirements ({quoted})"))
    } else if after_at.is_some_and(|u| !u.starts_with("https://")) {
        Some(format!("direct URLs must be `https://…` ({quoted})"))
    } else {
        None
    }
}

/// Bounds the marker before the crate sees it: its marker algebra costs time exponential
/// in the number of comparisons for some shapes, and its parser recurses per parenthesis.
/// Also refuses a quote inside a quoted string (`"it's"`), which the crate would write
/// back as `'it's'`.
fn check_marker_shape(s: &str, quoted: &str) -> Result<(), String> {
    let mut in_quote: Option<char> = None;
    let (mut depth, mut max_depth, mut joins) = (0usize, 0usize, 0usize);
    let mut word = String::new();
    for c in s.chars().chain([' ']) {
        if let Some(q) = in_quote {
            if c == q {
                in_quote = None;
            } else if matches!(c, '"' | '\'') {
                return Err(format!("quotes inside marker strings are not allowed ({quoted})"));
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
            word.push(c);
            continue;
        }
        if word.eq_ignore_ascii_case("and") || word.eq_ignore_ascii_case("or") {
            joins += 1;
        }
        word.clear();
        match c {
            '"' | '\'' => in_quote = Some(c),
            '(' => {
                depth += 1;
                max_depth = max_depth.max(depth);
            }
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if joins + 1 > limits::MAX_MARKER_COMPARISONS {
        return Err(format!(
            "an environment marker may have at most {} comparisons ({quoted})",
            limits::MAX_MARKER_COMPARISONS
        ));
    }
    if max_depth > limits::MAX_MARKER_NESTING {
        return Err(format!(
            "parentheses may nest at most {} deep in a requirement ({quoted})",
            limits::MAX_MARKER_NESTING
        ));
    }
    Ok(())
}

fn quote(raw: &str) -> String {
    const MAX: usize = 80;
    let mut shown: String = raw.chars().take(MAX).collect();
    if raw.chars().count() > MAX {
        shown.push('…');
    }
    format!("{shown:?}")
}

#[cfg(test)]
mod tests;
