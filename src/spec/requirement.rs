//! One PEP 508 requirement, validated as untrusted input.
//!
//! A `Requirement` can only be built by [`Requirement::parse`], so everything downstream
//! (the env key, the installer's argv) sees a string that is exactly one requirement: a
//! name, optional extras, version specifiers or an `https://` direct URL, and optional
//! environment markers. Installer options, local paths, VCS URLs, shell-ish characters
//! and anything that could smuggle a second line are rejected here, once.

use std::fmt;

/// A validated, normalized requirement (`name[extra1,extra2]specifiers; marker`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    /// PEP 503 normalized project name (`Foo_Bar` → `foo-bar`).
    name: String,
    normalized: String,
}

impl Requirement {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn as_str(&self) -> &str {
        &self.normalized
    }

    /// Validates `raw` and returns its normalized form, or a message saying what is wrong.
    pub fn parse(raw: &str) -> Result<Requirement, String> {
        let quoted = quote(raw);
        if raw.chars().any(|c| c.is_control()) {
            return Err(format!(
                "newlines and control characters are not allowed in requirements ({quoted})"
            ));
        }
        let s = raw.trim();
        if s.is_empty() {
            return Err("expected a requirement, got an empty string".into());
        }
        if s.starts_with('-') {
            return Err(format!(
                "options are not allowed in requirements ({quoted}); index and install options are the operator's configuration"
            ));
        }
        if s.contains('$') {
            return Err(format!("`$` is not allowed in requirements ({quoted})"));
        }
        if s.contains('\\') {
            return Err(format!("backslashes are not allowed in requirements ({quoted})"));
        }
        let lower = s.to_ascii_lowercase();
        if ["git+", "hg+", "svn+", "bzr+"].iter().any(|p| lower.contains(p)) {
            return Err(format!("VCS requirements are not allowed ({quoted})"));
        }
        if lower.starts_with("file:") || lower.contains("@ file:") || lower.contains("@file:") {
            return Err(format!("file:// requirements are not allowed ({quoted})"));
        }
        if lower.contains("://") && !s.contains('@') {
            return Err(format!(
                "bare URLs are not allowed in requirements ({quoted}); write `name @ https://…`"
            ));
        }
        if s.starts_with(['.', '/', '~']) || (s.contains('/') && !s.contains('@')) {
            return Err(format!("local paths are not allowed in requirements ({quoted})"));
        }
        Parser { s, pos: 0 }
            .requirement()
            .map_err(|why| format!("{why} in requirement {quoted}"))
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.normalized)
    }
}

fn quote(raw: &str) -> String {
    const MAX: usize = 80;
    let mut shown: String = raw.chars().take(MAX).collect();
    if raw.chars().count() > MAX {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// PEP 503 name normalization.
pub fn normalize_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            in_sep = true;
        } else {
            if in_sep && !out.is_empty() {
                out.push('-');
            }
            in_sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

const OPERATORS: [&str; 8] = ["===", "~=", "==", "!=", "<=", ">=", "<", ">"];

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.s.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn identifier(&mut self, what: &str) -> Result<String, String> {
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .unwrap_or(rest.len());
        let ident = &rest[..len];
        let valid = !ident.is_empty()
            && ident.starts_with(|c: char| c.is_ascii_alphanumeric())
            && ident.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid {
            return Err(format!("expected a {what} at position {}", self.pos));
        }
        self.pos += len;
        Ok(ident.to_string())
    }

    fn requirement(mut self) -> Result<Requirement, String> {
        let name = normalize_name(&self.identifier("package name")?);
        let mut out = name.clone();
        self.skip_ws();
        if self.eat("[") {
            let mut extras = Vec::new();
            loop {
                self.skip_ws();
                if self.eat("]") && extras.is_empty() {
                    break;
                }
                extras.push(normalize_name(&self.identifier("extra name")?));
                self.skip_ws();
                if self.eat("]") {
                    break;
                }
                if !self.eat(",") {
                    return Err(format!("expected `,` or `]` at position {}", self.pos));
                }
            }
            extras.sort();
            extras.dedup();
            if !extras.is_empty() {
                out.push_str(&format!("[{}]", extras.join(",")));
            }
            self.skip_ws();
        }
        if self.eat("@") {
            self.skip_ws();
            let rest = self.rest();
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let url = &rest[..end];
            if !url.starts_with("https://") || url.len() <= "https://".len() {
                return Err("direct URLs must be `https://…`".into());
            }
            if url
                .chars()
                .any(|c| matches!(c, '"' | '\'' | '<' | '>' | '`' | ';'))
            {
                return Err("unexpected character in direct URL".into());
            }
            out.push_str(" @ ");
            out.push_str(url);
            self.pos += end;
            self.skip_ws();
            if !self.rest().is_empty() && !self.eat(";") {
                return Err("expected `;` before markers after a direct URL".into());
            }
            if self.s[..self.pos].ends_with(';') {
                out.push_str(&self.marker()?);
            }
        } else {
            out.push_str(&self.specifiers()?);
            self.skip_ws();
            if self.eat(";") {
                out.push_str(&self.marker()?);
            }
        }
        self.skip_ws();
        if !self.rest().is_empty() {
            return Err(format!("unexpected {:?} at position {}", self.rest(), self.pos));
        }
        Ok(Requirement {
            name,
            normalized: out,
        })
    }

    /// `(>=1.0, <2)` or `>=1.0,<2`; returns the specifiers without whitespace.
    fn specifiers(&mut self) -> Result<String, String> {
        let parens = self.eat("(");
        let mut specs = Vec::new();
        loop {
            self.skip_ws();
            let Some(op) = OPERATORS.iter().find(|op| self.rest().starts_with(**op)) else {
                if specs.is_empty() && !parens {
                    return Ok(String::new());
                }
                return Err(format!("expected a version operator at position {}", self.pos));
            };
            self.pos += op.len();
            self.skip_ws();
            let rest = self.rest();
            let len = rest
                .find(|c: char| {
                    !(c.is_ascii_alphanumeric() || matches!(c, '.' | '*' | '+' | '!' | '-' | '_'))
                })
                .unwrap_or(rest.len());
            if len == 0 {
                return Err(format!(
                    "expected a version after `{op}` at position {}",
                    self.pos
                ));
            }
            specs.push(format!("{op}{}", &rest[..len]));
            self.pos += len;
            self.skip_ws();
            if !self.eat(",") {
                break;
            }
        }
        if parens && !self.eat(")") {
            return Err(format!("expected `)` at position {}", self.pos));
        }
        Ok(specs.join(","))
    }

    /// Environment markers: checked for shape (known variables, operators, quoted
    /// strings, `and`/`or`, parentheses) and returned with normalized spacing.
    fn marker(&mut self) -> Result<String, String> {
        const VARIABLES: [&str; 12] = [
            "python_version",
            "python_full_version",
            "os_name",
            "sys_platform",
            "platform_release",
            "platform_system",
            "platform_version",
            "platform_machine",
            "platform_python_implementation",
            "implementation_name",
            "implementation_version",
            "extra",
        ];
        const MARKER_OPS: [&str; 10] = ["===", "==", "!=", "<=", ">=", "~=", "<", ">", "not in", "in"];
        let mut tokens: Vec<String> = Vec::new();
        let mut depth = 0usize;
        let mut expect_value = true;
        loop {
            self.skip_ws();
            if self.rest().is_empty() {
                break;
            }
            if expect_value {
                if self.eat("(") {
                    depth += 1;
                    tokens.push("(".into());
                    continue;
                }
                // value op value
                let lhs = self.marker_value(&VARIABLES)?;
                self.skip_ws();
                let Some(op) = MARKER_OPS.iter().find(|op| self.rest().starts_with(**op)) else {
                    return Err(format!("expected a marker operator at position {}", self.pos));
                };
                self.pos += op.len();
                self.skip_ws();
                let rhs = self.marker_value(&VARIABLES)?;
                tokens.push(format!("{lhs} {op} {rhs}"));
                expect_value = false;
            } else if self.eat(")") {
                if depth == 0 {
                    return Err(format!("unbalanced `)` at position {}", self.pos));
                }
                depth -= 1;
                tokens.push(")".into());
            } else if self.eat("and") {
                tokens.push("and".into());
                expect_value = true;
            } else if self.eat("or") {
                tokens.push("or".into());
                expect_value = true;
            } else {
                return Err(format!("expected `and`, `or` or `)` at position {}", self.pos));
            }
        }
        if expect_value || depth != 0 {
            return Err("incomplete environment marker".into());
        }
        let mut out = String::from("; ");
        for (i, token) in tokens.iter().enumerate() {
            let glue = i > 0 && token != ")" && tokens[i - 1] != "(";
            if glue {
                out.push(' ');
            }
            out.push_str(token);
        }
        Ok(out)
    }

    fn marker_value(&mut self, variables: &[&str]) -> Result<String, String> {
        let rest = self.rest();
        if let Some(quote) = rest.chars().next().filter(|c| *c == '"' || *c == '\'') {
            let Some(end) = rest[1..].find(quote) else {
                return Err(format!("unterminated string at position {}", self.pos));
            };
            let value = &rest[1..1 + end];
            if value.contains(['"', '\'']) {
                return Err(format!("unexpected quote at position {}", self.pos));
            }
            self.pos += end + 2;
            return Ok(format!("\"{value}\""));
        }
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let ident = &rest[..len];
        if !variables.contains(&ident) {
            return Err(format!(
                "expected a marker variable or quoted string at position {}",
                self.pos
            ));
        }
        self.pos += len;
        Ok(ident.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalizes() {
        let cases = [
            ("requests", "requests"),
            ("Requests_Toolbelt==1.0", "requests-toolbelt==1.0"),
            (
                "requests [Security , socks] >= 2.0 , < 3",
                "requests[security,socks]>=2.0,<3",
            ),
            ("numpy (>=1.20)", "numpy>=1.20"),
            (
                "pandas; python_version>='3.9' and sys_platform == \"linux\"",
                "pandas; python_version >= \"3.9\" and sys_platform == \"linux\"",
            ),
            (
                "pkg @ https://example.org/pkg-1.0-py3-none-any.whl",
                "pkg @ https://example.org/pkg-1.0-py3-none-any.whl",
            ),
            ("torch==2.1.0+cu121", "torch==2.1.0+cu121"),
            ("foo[]", "foo"),
        ];
        for (raw, want) in cases {
            assert_eq!(Requirement::parse(raw).unwrap().as_str(), want, "{raw}");
        }
    }

    #[test]
    fn rejects_hostile_entries() {
        let cases = [
            ("--index-url https://evil", "options are not allowed"),
            ("-r other.txt", "options are not allowed"),
            ("-e .", "options are not allowed"),
            ("./local", "local paths"),
            ("/abs/path", "local paths"),
            ("pkg/sub", "local paths"),
            ("file:///tmp/x.whl", "file://"),
            ("x @ file:///tmp/x.whl", "file://"),
            ("git+https://github.com/a/b", "VCS"),
            ("b @ git+https://github.com/a/b", "VCS"),
            ("requests\n--index-url x", "control characters"),
            ("requests==${VERSION}", "`$`"),
            ("C:\\pkg", "backslashes"),
            ("https://example.org/x.whl", "bare URLs"),
            ("x @ http://example.org/x.whl", "https://"),
            ("requests==", "expected a version"),
            ("requests; evil()", "marker variable"),
            ("requests extra", "unexpected"),
            ("", "empty"),
        ];
        for (raw, want) in cases {
            let err = Requirement::parse(raw).unwrap_err();
            assert!(err.contains(want), "{raw:?}: {err}");
        }
    }
}
